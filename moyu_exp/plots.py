"""Figures of a comparison: accuracy/sparsity trade-off curves, the speed Pareto plots and the
generation-fidelity curves.

Whether a metric is better high or low comes from the results themselves (lm-eval's
``higher_is_better`` of each task, and the fidelity metrics' own), passed in as ``directions``
({"task/metric": higher is better}); a metric they do not name is taken as higher-is-better.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Directions = dict[str, bool]


def _direction(metric: str, directions: Directions) -> str:
    return "higher is better" if directions.get(metric, True) else "lower is better"


def _log_scale(metric: str) -> bool:
    """Perplexity and KL span orders of magnitude across sparsities: plot them on a log axis."""
    return metric.split("/")[-1] in ("perplexity", "word_perplexity", "byte_perplexity", "kl")


def frontier(points: list[tuple[float, float]], lower_is_better: bool) -> list[tuple[float, float]]:
    """Non-dominated (speed, quality) points, fastest first: nothing is faster and better."""
    best: list[tuple[float, float]] = []
    for speed, value in sorted(points, key=lambda p: (-p[0], p[1] if lower_is_better else -p[1])):
        if not best or (value < best[-1][1] if lower_is_better else value > best[-1][1]):
            best.append((speed, value))
    return best


def _ok(table: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    return [r for r in table if r.get("status") == "ok" and r.get(metric) is not None]


def _x(row: dict[str, Any]) -> float:
    achieved = row.get("achieved_sparsity")
    return float(achieved if achieved is not None else row.get("sparsity") or 0.0)


def _dense(rows: list[dict[str, Any]], metric: str) -> float | None:
    """The dense reference: a dense run, else any run at sparsity 0."""
    for test in (lambda r: r.get("strategy") == "dense", lambda r: (r.get("sparsity") or 0) == 0):
        values = [r[metric] for r in rows if test(r)]
        if values:
            return float(values[0])
    return None


def _shared_legend(fig, axes) -> None:
    """One legend beside the figure: every label drawn on some panel, once."""
    legend = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=8)  # fmt: skip


def save_png(fig, path: Path) -> None:
    """Write a figure as PNG, atomically, and close it."""
    from moyu_exp.cache import write_bytes_atomic

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(Path(path), buffer.getvalue())


def tradeoff(
    table: list[dict[str, Any]], metrics: list[str], path: Path, directions: Directions
) -> None:
    """One panel per metric: metric against achieved sparsity, a line per strategy label."""
    panels = max(1, len(metrics))
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics or ["(no metric)"], strict=False):
        rows = _ok(table, metric)
        dense = _dense(rows, metric)
        log_scale = _log_scale(metric)
        # every curve starts from the dense model at sparsity 0 (not drawable at 0 on a log axis)
        start = [(0.0, dense)] if dense is not None and (dense > 0 or not log_scale) else []
        for label in sorted({r["label"] for r in rows if r.get("strategy") != "dense"}):
            points = sorted({(_x(r), r[metric]) for r in rows if r["label"] == label})
            ax.plot(*zip(*(start + points), strict=True), marker="o", ms=4, label=label)
        if start:
            ax.axhline(dense, color="black", ls="--", lw=1, label="dense")
        ax.set_xlabel("model-level sparsity (share of block weights skipped per token)")
        ax.set_ylabel(f"{metric} ({_direction(metric, directions)})")
        if log_scale:
            ax.set_yscale("log")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    _shared_legend(fig, axes[0])
    fig.suptitle("accuracy / sparsity trade-off")
    fig.tight_layout()
    save_png(fig, path)


def pareto(
    table: list[dict[str, Any]],
    metrics: list[str],
    path: Path,
    directions: Directions,
    speeds: tuple[tuple[str, str], ...],
) -> None:
    """The first metric against each speed column in ``speeds`` ((column, axis label): the
    measured speedup of kernel-mode points, the bytes-bound ideal of every point): a line per
    strategy through its sparsities (each marked with its target), dense as a star, each
    panel's Pareto frontier dashed."""
    metric = metrics[0] if metrics else None
    fig, axes = plt.subplots(1, len(speeds), figsize=(6.2 * len(speeds), 4.6), squeeze=False)
    for ax, (speed, label) in zip(axes[0], speeds, strict=True):
        _pareto_panel(ax, table, metric, speed, directions)
        ax.set_xlabel(label)
    fig.suptitle("Pareto: quality against decode speed")
    fig.tight_layout()
    save_png(fig, path)


def at_levels(
    table: list[dict[str, Any]],
    metrics: list[str],
    path: Path,
    directions: Directions,
    levels: list[float],
    speed: tuple[str, str],
) -> None:
    """Each metric against a speed column (``speed``: (column, axis label)), a panel per metric
    (+sweep=frontier's figure): a line per method, the frontier dashed, the speedup levels read
    as vertical lines."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.2 * len(metrics), 4.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        _pareto_panel(ax, table, metric, speed[0], directions)
        for level in levels:
            ax.axvline(level, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(speed[1])
    fig.suptitle("Quality against decode speed (dotted: the levels read)")
    fig.tight_layout()
    save_png(fig, path)


def _pareto_panel(ax, table, metric: str | None, speed: str, directions: Directions) -> None:
    rows = [r for r in _ok(table, metric) if r.get(speed)] if metric else []
    labels = sorted({r["label"] for r in rows})
    if len(labels) > 10:  # more lines than the default cycle has colours
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for label in labels:
        mine = sorted(
            (r for r in rows if r["label"] == label), key=lambda r: r.get("sparsity") or 0
        )
        speeds, values = [r[speed] for r in mine], [r[metric] for r in mine]
        if label == "dense":
            ax.scatter(speeds, values, label=label, marker="*", s=140, color="black", zorder=3)
            continue
        ax.plot(speeds, values, marker="o", ms=4, lw=1, label=label)
        for r in mine:
            ax.annotate(f"{r['sparsity']:g}", (r[speed], r[metric]), fontsize=6)
    if rows:
        lower = not directions.get(metric, True)
        front = frontier([(r[speed], r[metric]) for r in rows], lower)
        ax.step(
            *zip(*front, strict=True), where="post", color="grey", ls="--", lw=1, label="frontier"
        )
        if _log_scale(metric) and all(r[metric] > 0 for r in rows):
            ax.set_yscale("log")
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, f"no point has {speed}", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel(f"{metric} ({_direction(metric, directions)})" if metric else "")
    ax.grid(alpha=0.3)


def generality(
    models: list[str],
    metrics: list[str],
    wide: list[dict[str, Any]],
    path: Path,
    directions: Directions,
) -> None:
    """One panel per metric: a group of bars per method (and target), one bar per model."""
    import numpy as np

    panels = max(1, len(metrics))
    names = [
        r["method"] if r["sparsity"] is None else f"{r['method']} @ {r['sparsity']}" for r in wide
    ]
    fig, axes = plt.subplots(
        1, panels, figsize=(4.2 * panels, 0.32 * len(wide) + 1.8), squeeze=False
    )
    y = np.arange(len(wide))
    height = 0.8 / max(1, len(models))
    for ax, metric in zip(axes[0], metrics, strict=False):
        for i, model in enumerate(models):
            values = [r.get(f"{model}: {metric}") for r in wide]
            drawn = [np.nan if v is None else float(v) for v in values]
            ax.barh(y + i * height, drawn, height, label=model)
        ax.set_yticks(y + height * (len(models) - 1) / 2, names if ax is axes[0][0] else [])
        ax.invert_yaxis()
        if _log_scale(metric):
            ax.set_xscale("log")
        if metric == "achieved_sparsity":
            title = "achieved sparsity\n(model level)"
        else:
            title = f"{metric}\n({_direction(metric, directions)})"
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(models))
    fig.suptitle("the same methods on each model", y=1.08)
    fig.tight_layout()
    save_png(fig, path)


SMOOTHING = 9  # distances in the centred running mean of the generation curves


def running_mean(values: list[float], window: int = SMOOTHING) -> list[float]:
    """The centred running mean of ``values`` over ``window`` entries (fewer at the ends)."""
    half = window // 2
    spans = (values[max(0, i - half) : i + half + 1] for i in range(len(values)))
    return [sum(span) / len(span) for span in spans]


def generation(curves: list[dict[str, Any]], path: Path, edges: tuple[int, ...]) -> None:
    """KL(dense || sparse) and top-1 agreement against the distance along the generated
    continuation, a column per model, a line per run (``curves``: dicts with label, method,
    model, kl and top1, one value per distance; a method keeps its colour in every column),
    smoothed over SMOOTHING distances; the buckets' ``edges`` as dotted lines."""
    models = list(dict.fromkeys(c["model"] for c in curves))
    methods = list(dict.fromkeys(c["method"] for c in curves))  # one colour each, every column
    fig, axes = plt.subplots(
        2, len(models), figsize=(6.4 * len(models), 7.2), squeeze=False, sharex="col"
    )
    for column, model in enumerate(models):
        kl_ax, top1_ax = axes[0][column], axes[1][column]
        drawn: list[str] = []
        for curve in (c for c in curves if c["model"] == model):
            distance = range(1, len(curve["kl"]) + 1)
            style = {
                "color": f"C{methods.index(curve['method']) % 10}",
                "ls": ("-", "--", ":", "-.")[drawn.count(curve["method"]) % 4],  # its next run
            }
            drawn.append(curve["method"])
            kl_ax.plot(distance, running_mean(curve["kl"]), label=curve["label"], **style)
            top1_ax.plot(distance, running_mean(curve["top1"]), **style)
        kl_ax.set_yscale("log")
        kl_ax.set_ylabel("KL(dense || sparse), nats (lower is better)")
        top1_ax.set_ylabel("top-1 agreement (higher is better)")
        top1_ax.set_xlabel("distance along the dense model's greedy continuation (tokens)")
        kl_ax.set_title(model)
        for ax in (kl_ax, top1_ax):
            for edge in edges:
                ax.axvline(edge + 0.5, color="grey", lw=0.8, ls=":")
            ax.grid(alpha=0.3)
        kl_ax.legend(fontsize=8)
    fig.suptitle(f"Generation fidelity by distance (running mean over {SMOOTHING} tokens)")
    fig.tight_layout()
    save_png(fig, path)


def trinity(t: Any, path: Path) -> None:
    """The trinity at a glance (``t``: a :class:`moyu_exp.trinity.Trinity`): one panel per model,
    each method's retention (± its standard error) against its measured speedup at each level,
    the target as a line; a last panel draws each method's spread of retention across models at
    each level (a bar from the worst model to the best)."""
    import numpy as np

    panels = len(t.models) + (1 if len(t.models) > 1 else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.2), squeeze=False, sharey=True)
    colours = {m: plt.cm.tab20(i % 20) for i, m in enumerate(t.methods)}
    for ax, model in zip(axes[0], t.models, strict=False):
        for method in t.methods:
            cells = [t.cell(method, level, model) for level in t.levels]
            cells = [c for c in cells if c.retention is not None]
            if not cells:
                continue
            xs = [c.speedup if c.speedup is not None else c.ideal for c in cells]
            ys = [c.retention for c in cells]
            errors = [c.retention_se or 0.0 for c in cells]
            ax.errorbar([1.0, *xs], [1.0, *ys], yerr=[0.0, *errors], marker="o", ms=3,
                        capsize=2, lw=1, color=colours[method], label=method)  # fmt: skip
        for level in t.levels:
            ax.axvline(level, color="0.7", lw=0.8, ls=":")
        ax.axhline(t.target, color="0.3", lw=0.8, ls="--")
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("measured decode speedup at the level's sparsity")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy retention (suite mean / dense)")
    if panels > len(t.models):
        ax = axes[0][-1]
        width = 0.8 / max(1, len(t.methods))
        for i, method in enumerate(t.methods):
            for j, level in enumerate(t.levels):
                values = [t.cell(method, level, m).retention for m in t.models]
                values = [v for v in values if v is not None]
                if len(values) == len(t.models):
                    x = j + (i - (len(t.methods) - 1) / 2) * width
                    ax.plot([x, x], [min(values), max(values)], color=colours[method], lw=3)
        ax.set_xticks(np.arange(len(t.levels)), [f"{lv:g}x" for lv in t.levels])
        ax.axhline(t.target, color="0.3", lw=0.8, ls="--")
        ax.set_title("across models: worst to best retention", fontsize=10)
        ax.set_xlabel("speedup level")
        ax.grid(alpha=0.3, axis="y")
    _shared_legend(fig, axes[0])
    fig.suptitle("accuracy x speed x generality (dashed: target retention)", fontsize=11)
    fig.tight_layout()
    save_png(fig, path)
