"""Small plotting helpers shared by the probes (matplotlib, headless)."""

from __future__ import annotations


def figure(panels: int = 1, width: float = 5.4, height: float = 4.0, rows: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = -(-panels // rows)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def heatmap(fig, ax, values, xlabel: str, ylabel: str, title: str, xticks=None, **kwargs):
    """A (rows, cols) matrix as an image with a colour bar; rows are layers by convention."""
    image = ax.imshow(values, aspect="auto", origin="lower", interpolation="nearest", **kwargs)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if xticks is not None:
        positions, labels = xticks
        ax.set_xticks(positions, labels, fontsize=7)
    return image


def finish(fig, title: str):
    fig.suptitle(title)
    fig.tight_layout()
    return fig
