"""How long does a token's top-k set persist? J_l(D) = mean_t Jaccard(A_l(t), A_l(t + D)), on
natural text, the same tokens shuffled (no order, same unigram content) and random tokens."""

from __future__ import annotations

from dataclasses import dataclass

from moyu_exp.lazy import lazy_import
from moyu_exp.probes import common, figures
from moyu_exp.probes.base import Probe, ProbeOutput, register

torch = lazy_import("torch")


@register("lag_overlap")
@dataclass(eq=False)
class LagOverlap(Probe):
    name: str = "lag_overlap"
    tokens: int = 1024
    max_lag: int = 512
    seed: int = 0

    question = "How fast does the top-k set of later tokens drift from earlier ones?"

    def run(self, loaded, cfg) -> ProbeOutput:
        natural = common.prose_ids(loaded.tokenizer, self.tokens)
        generator = torch.Generator().manual_seed(self.seed)
        sources = {
            "natural": natural,
            "shuffled": natural[:, torch.randperm(self.tokens, generator=generator)],
            "random": common.random_ids(common.vocab(loaded), self.tokens, self.seed),
        }
        curves = {name: self.lag_curves(loaded, ids) for name, ids in sources.items()}
        chance = (1 - self.sparsity) / (1 + self.sparsity)
        numbers: dict = {"chance": chance, "lags": list(range(1, self.max_lag + 1))}
        for name, curve in curves.items():
            mean = curve.mean(0)
            numbers[name] = {
                "jaccard_by_lag": mean.tolist(),
                "at_lag": {str(d): float(mean[d - 1]) for d in (1, 16, 256) if d <= self.max_lag},
                "by_layer_at_lag_1": curve[:, 0].tolist(),
            }
        fig, axes = figures.figure(2, width=5.4, height=4.0)
        lags = torch.arange(1, self.max_lag + 1)
        for name, curve in curves.items():
            axes[0].plot(lags, curve.mean(0), label=name)
        axes[0].axhline(chance, color="black", lw=1, ls=":", label="independent sets")
        axes[0].set(
            xscale="log",
            xlabel="lag D (tokens)",
            ylabel="mean Jaccard",
            title="J(D), mean over layers",
        )
        axes[0].legend()
        figures.heatmap(
            fig, axes[1], curves["natural"].numpy(), "lag D", "layer", "J_l(D), natural text"
        )
        return ProbeOutput(numbers, {"lag_overlap": figures.finish(fig, self.question)})

    def lag_curves(self, loaded, ids) -> torch.Tensor:
        """(layers, lags) of mean Jaccard at each lag."""
        z = common.intermediates(loaded, ids)
        rows = []
        for layer in sorted(z):
            sets = common.topk_sets(z[layer], self.sparsity).float()
            k = sets.sum(-1)[0]
            overlap = sets @ sets.T  # |A_t ∩ A_t'|; every set has k members
            jac = overlap / (2 * k - overlap)
            rows.append(torch.stack([jac.diagonal(d).mean() for d in range(1, self.max_lag + 1)]))
        return torch.stack(rows)
