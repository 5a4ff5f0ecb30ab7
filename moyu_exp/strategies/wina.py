"""WINA: per token, keep the top-k of |x_i| * ||W[:, i]||_2 at the input of every linear layer.

The score weighs an input entry by the column norm of the weight that reads it (Microsoft,
2025). Where one input feeds several linears (q, k, v; gate, up) the column norm is taken over
their stacked weights, so one mask serves the shared input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import KernelRule, Strategy, register, topk_rule
from moyu_exp.strategies.teal import TEAL_SITES

torch = lazy_import("torch")


@register("wina")
@dataclass(eq=False)
class Wina(Strategy):
    name: str = "wina"
    sites: list[str] = field(default_factory=lambda: list(TEAL_SITES))

    allowed_sites = TEAL_SITES

    def prepare(self, model, adapter, layers, calibration) -> SimpleNamespace:
        blocks = adapter.layers(model)
        norms = {
            (site, layer): column_norms(adapter.readers(blocks[layer], site))
            for site in self.sites
            for layer in layers
        }
        return SimpleNamespace(norms=norms)

    def kernel_rule(self, state, site: str, layer: int) -> KernelRule:
        norms = state.norms[(site, layer)]
        return topk_rule(self.sparsity, norms.numel(), scale=norms)


def column_norms(linears) -> torch.Tensor:
    """||W[:, i]||_2 over the stacked weights of linears that share their input."""
    return torch.stack([lin.weight.float().square().sum(0) for lin in linears]).sum(0).sqrt()
