"""Semantic-irrelevant activation inertia: do the same few neurons win top-k whatever the text?

f_{l,j} = fraction of tokens with j in A_l(t) (the top-k of |z_t|), on unrelated sources:
natural prose, documentation/code (CPython's pydoc topics) and uniformly random tokens. Without
inertia f would be flat at 1 - s (Gini 0, the hottest 10% of neurons holding 10% of the hits).
The hottest 10% can hold at most 10% / (1 - s) of the hits (all of them at s >= 0.9), so the
share is reported with that ceiling, and with the fraction of "always-on" neurons (in the top-k
of at least 95% of tokens: what a static set would get for free).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import ClassVar

from moyu_exp.activations import run_with_hooks
from moyu_exp.config import Range
from moyu_exp.families import adapter_for
from moyu_exp.lazy import lazy_import
from moyu_exp.probes import common, figures
from moyu_exp.probes.base import Probe, ProbeOutput, register

torch = lazy_import("torch")


@register("hot_neurons")
@dataclass(eq=False)
class HotNeurons(Probe):
    name: str = "hot_neurons"
    tokens: int = 2048
    hot_fraction: float = 0.1
    always_on: float = 0.95

    RANGES: ClassVar[dict[str, Range]] = {
        **Probe.RANGES,
        "hot_fraction": Range(0, 1, low_open=True),
        "always_on": Range(0, 1, low_open=True),
    }

    question = "Do a few 'hot' neurons take most top-k slots across unrelated inputs?"

    def run(self, loaded, cfg) -> ProbeOutput:
        sources = {
            "prose": common.prose_ids(loaded.tokenizer, self.tokens),
            "docs": common.docs_ids(loaded.tokenizer, self.tokens),
            "random": common.random_ids(common.vocab(loaded), self.tokens),
        }
        freq = {name: self.frequencies(loaded, ids) for name, ids in sources.items()}
        layers = freq["prose"].shape[0]
        hot = {name: hot_set(f, self.hot_fraction) for name, f in freq.items()}
        numbers: dict = {"sources": {}, "jaccard_of_hot_sets": {}}
        for name, f in freq.items():
            g = gini(f)
            share = hot_share(f, self.hot_fraction)
            always = (f >= self.always_on).float().mean(-1)
            numbers["sources"][name] = {
                "gini_per_layer": g.tolist(),
                "gini_mean": float(g.mean()),
                "hot_share_per_layer": share.tolist(),
                "hot_share_mean": float(share.mean()),
                "always_on_fraction_per_layer": always.tolist(),
                "always_on_fraction_mean": float(always.mean()),
            }
        for a, b in combinations(freq, 2):
            j = common.jaccard(hot[a], hot[b])
            numbers["jaccard_of_hot_sets"][f"{a}-{b}"] = {
                "per_layer": j.tolist(),
                "mean": float(j.mean()),
            }
        chance = self.hot_fraction / (2 - self.hot_fraction)
        numbers["jaccard_if_independent"] = chance
        numbers["hot_share_if_flat"] = self.hot_fraction
        numbers["hot_share_ceiling"] = min(1.0, self.hot_fraction / (1 - self.sparsity))

        fig, axes = figures.figure(3, width=4.6, height=3.8)
        picks = sorted({0, layers // 2, layers - 1})
        for name, f in freq.items():
            for layer, style in zip(picks, ("-", "--", ":"), strict=False):
                ranked = f[layer].sort(descending=True).values
                axes[0].loglog(
                    torch.arange(1, len(ranked) + 1),
                    ranked.clamp_min(1e-4),
                    style,
                    label=f"{name}, layer {layer}",
                )
            axes[1].plot(numbers["sources"][name]["gini_per_layer"], label=name)
        axes[0].axhline(1 - self.sparsity, color="black", lw=1, ls=":", label="no inertia")
        axes[0].set(
            xlabel="neuron rank", ylabel="fraction of tokens in top-k", title="rank-frequency"
        )
        axes[0].legend(fontsize=6)
        axes[1].set(xlabel="layer", ylabel="Gini of f", title="concentration (0 = flat)")
        axes[1].legend()
        for pair, values in numbers["jaccard_of_hot_sets"].items():
            axes[2].plot(values["per_layer"], label=pair)
        axes[2].axhline(chance, color="black", lw=1, ls=":", label="independent sets")
        axes[2].set(xlabel="layer", ylabel="Jaccard", title=f"hot {self.hot_fraction:.0%} sets")
        axes[2].legend()
        return ProbeOutput(numbers, {"hot_neurons": figures.finish(fig, self.question)})

    def frequencies(self, loaded, ids) -> torch.Tensor:
        """(layers, d_ff): how often each neuron is in its token's top-k."""
        layers = len(adapter_for(loaded.model).layers(loaded.model))
        counts: dict[int, torch.Tensor] = {}

        def tap(layer: int):
            def fn(z):
                sets = common.topk_sets(z[0].float(), self.sparsity)
                counts[layer] = sets.float().mean(0).cpu()
                return z

            return fn

        run_with_hooks(
            loaded.model,
            [ids.to(loaded.device)],
            {(common.SITE, i): tap(i) for i in range(layers)},
            desc="hot neurons",
        )
        return torch.stack([counts[i] for i in range(layers)])


def gini(f: torch.Tensor) -> torch.Tensor:
    """Gini coefficient along the last dim (0: all equal, 1: one neuron takes everything)."""
    ordered = f.sort(dim=-1).values
    n = ordered.shape[-1]
    index = torch.arange(1, n + 1, dtype=ordered.dtype)
    total = ordered.sum(-1).clamp_min(1e-12)
    return ((2 * index - n - 1) * ordered).sum(-1) / (n * total)


def hot_share(f: torch.Tensor, fraction: float) -> torch.Tensor:
    """Share of all top-k hits that fall on the hottest ``fraction`` of neurons."""
    n = max(1, round(fraction * f.shape[-1]))
    return f.sort(dim=-1, descending=True).values[..., :n].sum(-1) / f.sum(-1).clamp_min(1e-12)


def hot_set(f: torch.Tensor, fraction: float) -> torch.Tensor:
    n = max(1, round(fraction * f.shape[-1]))
    keep = torch.zeros_like(f, dtype=torch.bool)
    return keep.scatter_(-1, f.topk(n, dim=-1).indices, True)
