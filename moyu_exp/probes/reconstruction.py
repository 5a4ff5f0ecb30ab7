"""How much does each method's dropping cost, block by block?

Per layer: the CETT of top-k selection (||W_down (z * 1[dropped])|| / ||W_down z||) at several
sparsities, and for each token-level strategy the local relative error of every decoder block,
||y_sparse - y_dense|| / ||y_dense||, both outputs computed from the same block input (so errors
do not compound across layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from moyu_exp.activations import capture_block_inputs
from moyu_exp.config import SPARSITY, Range
from moyu_exp.families import adapter_for
from moyu_exp.lazy import lazy_import
from moyu_exp.probes import common, figures
from moyu_exp.probes.base import Probe, ProbeOutput, register
from moyu_exp.strategies import STRATEGIES

torch = lazy_import("torch")


@register("reconstruction")
@dataclass(eq=False)
class Reconstruction(Probe):
    name: str = "reconstruction"
    tokens: int = 256
    sparsities: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9])
    strategies: list[str] = field(
        default_factory=lambda: ["topk", "random", "static", "cats", "teal", "chess", "wina"]
    )

    RANGES: ClassVar[dict[str, Range]] = {**Probe.RANGES, "sparsities": SPARSITY}
    question = "Which methods keep each block's output closest to dense, as sparsity grows?"

    def run(self, loaded, cfg) -> ProbeOutput:
        ids = common.prose_ids(loaded.tokenizer, self.tokens)
        z = common.intermediates(loaded, ids)
        adapter = adapter_for(loaded.model)
        blocks = adapter.layers(loaded.model)
        cett = torch.zeros(len(self.sparsities), len(blocks))
        for layer, zl in z.items():
            (down,) = adapter.readers(blocks[layer], common.SITE)
            weight = down.weight.detach().float().cpu()
            full = (zl @ weight.T).norm(dim=-1).clamp_min(1e-12)
            for i, s in enumerate(self.sparsities):
                dropped = zl * ~common.topk_sets(zl, s)
                cett[i, layer] = ((dropped @ weight.T).norm(dim=-1) / full).mean()
        errors = {}
        for name in self.strategies:
            errors[name] = torch.stack(
                [self.block_errors(loaded, cfg, name, s, ids) for s in self.sparsities]
            )  # (sparsities, layers)
        numbers = {
            "sparsities": self.sparsities,
            "topk_cett": {"per_layer": cett.tolist(), "mean": cett.mean(1).tolist()},
            "block_error": {
                name: {"per_layer": e.tolist(), "mean": e.mean(1).tolist()}
                for name, e in errors.items()
            },
        }
        fig, axes = figures.figure(2, width=5.4, height=4.0)
        for i, s in enumerate(self.sparsities):
            axes[0].plot(cett[i], label=f"s={s}")
        axes[0].set(xlabel="layer", ylabel="CETT of top-k", title="tail truncation error")
        axes[0].legend()
        for name, e in errors.items():
            axes[1].plot(self.sparsities, e.mean(1), marker="o", label=name)
        axes[1].set(
            xlabel="target sparsity",
            ylabel="mean ||y_s - y|| / ||y|| per block",
            yscale="log",
            title="local block error",
        )
        axes[1].legend(fontsize=7)
        return ProbeOutput(numbers, {"reconstruction": figures.finish(fig, self.question)})

    def block_errors(self, loaded, cfg, name: str, sparsity: float, ids) -> torch.Tensor:
        """(layers,) mean relative error of each block's output under strategy ``name``, the
        sparse and the dense block fed the same input (what the sparse model gives it)."""
        from moyu_exp import calibration

        strategy = STRATEGIES[name](sparsity=sparsity)
        state, _ = calibration.prepare(strategy, loaded, cfg)
        blocks = adapter_for(loaded.model).layers(loaded.model)
        errors = torch.zeros(len(blocks))
        with strategy.attach(loaded.model, state) as live, torch.inference_mode():
            inputs = capture_block_inputs(loaded.model, list(range(len(blocks))), ids)
            for layer, (args, kwargs) in inputs.items():
                sparse = _hidden(blocks[layer](*args, **kwargs))
                with live.paused():
                    dense = _hidden(blocks[layer](*args, **kwargs)).float()
                diff = (sparse.float() - dense).norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-12)
                errors[layer] = diff.mean().cpu()
        return errors


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output
