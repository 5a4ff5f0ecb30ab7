"""How sparse are activations natively? Per layer and site, P(|a| <= tau) over a grid of tau and
the s-quantile thresholds, for prefill (prompt) tokens and decode (generated) tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from moyu_exp.config import SPARSITY, Range
from moyu_exp.lazy import lazy_import
from moyu_exp.probes import common, figures
from moyu_exp.probes.base import Probe, ProbeOutput, register

torch = lazy_import("torch")

SITES = ("mlp_input", "gate_act", "mlp_intermediate", "attn_input")


@register("sparsity_profile")
@dataclass(eq=False)
class SparsityProfile(Probe):
    name: str = "sparsity_profile"
    prompt_tokens: int = 256
    decode_tokens: int = 64
    levels: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9])
    tau_min: float = 1e-4
    tau_max: float = 1e2
    tau_points: int = 61

    RANGES: ClassVar[dict[str, Range]] = {
        **Probe.RANGES,
        "levels": SPARSITY,
        "tau_min": Range(0, low_open=True),
        "tau_max": Range(0, low_open=True),
    }
    question = "What fraction of each site's entries is already near zero, per layer and phase?"

    def run(self, loaded, cfg) -> ProbeOutput:
        prompt = common.prose_ids(loaded.tokenizer, self.prompt_tokens)
        _, prefill, decode = common.generate(loaded, prompt, self.decode_tokens, SITES)
        layers = sorted({layer for _, layer in prefill})
        taus = torch.logspace(
            torch.log10(torch.tensor(self.tau_min)),
            torch.log10(torch.tensor(self.tau_max)),
            self.tau_points,
        )
        numbers: dict = {"tau": taus.tolist(), "levels": self.levels, "sites": {}}
        fig, axes = figures.figure(2 * len(SITES), width=4.2, height=3.4, rows=len(SITES))
        for row, site in enumerate(SITES):
            numbers["sites"][site] = {}
            for col, (phase, acts) in enumerate((("prefill", prefill), ("decode", decode))):
                cdf = torch.stack([cdf_at(acts[(site, i)].abs(), taus) for i in layers])
                thresholds = torch.stack(
                    [
                        torch.quantile(acts[(site, i)].abs().flatten(), torch.tensor(self.levels))
                        for i in layers
                    ]
                )
                numbers["sites"][site][phase] = {
                    "cdf": cdf.tolist(),  # [layer][tau]
                    "thresholds": thresholds.tolist(),  # [layer][level]
                    "mean_fraction_below_1e-2": float(cdf[:, _index(taus, 1e-2)].mean()),
                }
                ticks = (
                    [0, len(taus) // 2, len(taus) - 1],
                    [f"{taus[0]:.0e}", f"{taus[len(taus) // 2]:.0e}", f"{taus[-1]:.0e}"],
                )
                figures.heatmap(
                    fig,
                    axes[2 * row + col],
                    cdf.numpy(),
                    "tau",
                    "layer",
                    f"{site} ({phase}): P(|a| <= tau)",
                    ticks,
                    vmin=0,
                    vmax=1,
                )
        thr_fig, thr_axes = figures.figure(len(SITES), width=4.2, height=3.4)
        middle = self.levels.index(0.5) if 0.5 in self.levels else 0
        for ax, site in zip(thr_axes, SITES, strict=True):
            for phase, style in (("prefill", "-"), ("decode", "--")):
                values = [row[middle] for row in numbers["sites"][site][phase]["thresholds"]]
                ax.plot(layers, values, style, label=phase)
            ax.set_xlabel("layer")
            ax.set_ylabel(f"threshold at s={self.levels[middle]}")
            ax.set_yscale("log")
            ax.set_title(site)
            ax.legend()
        return ProbeOutput(
            numbers,
            {
                "cdf": figures.finish(fig, "activation magnitude CDF per layer"),
                "thresholds": figures.finish(thr_fig, "s-quantile thresholds, prefill vs decode"),
            },
        )


def cdf_at(values: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """P(values <= tau) for every tau."""
    ordered = values.flatten().sort().values
    return torch.searchsorted(ordered, taus, right=True).float() / ordered.numel()


def _index(taus: torch.Tensor, value: float) -> int:
    return int((taus - value).abs().argmin())
