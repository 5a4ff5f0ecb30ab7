"""WINA: per token, keep the top-k of |x_i| * ||W[:, i]||_2 at the input of every linear layer.

The score weighs an input entry by the column norm of the weight that reads it (Microsoft,
2025). Where one input feeds several linears (q, k, v; gate, up) the column norm is taken over
their stacked weights, so one mask serves the shared input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import KernelRule, Strategy, keep_count, register
from moyu_exp.strategies.teal import TEAL_SITES
from moyu_exp.strategies.topk import topk_mask

torch = lazy_import("torch")


@register("wina")
@dataclass(eq=False)
class Wina(Strategy):
    name: str = "wina"
    sites: list[str] = field(default_factory=lambda: list(TEAL_SITES))

    allowed_sites = TEAL_SITES

    def prepare(self, model, adapter) -> None:
        blocks = adapter.layers(model)
        self._norms = {
            (site, layer): column_norms(adapter.readers(blocks[layer], site))
            for site in self.sites
            for layer in self.layer_ids
        }

    def kernel_rule(self, site: str, layer: int) -> KernelRule:
        norms = self._norms[(site, layer)]
        return KernelRule(k=keep_count(self.sparsity, norms.numel()), scale=norms)

    def kept(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        k = keep_count(self.sparsity, x.shape[-1])
        if k >= x.shape[-1]:
            return torch.ones_like(x, dtype=torch.bool)
        return topk_mask(x.abs() * self._norms[(site, layer)].to(x.dtype), k)

    def sparsify(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        k = keep_count(self.sparsity, x.shape[-1])
        if k >= x.shape[-1]:
            return x
        score = x.abs() * self._norms[(site, layer)].to(x.dtype)
        return x.masked_fill(~topk_mask(score, k), 0.0)


def column_norms(linears) -> torch.Tensor:
    """||W[:, i]||_2 over the stacked weights of linears that share their input."""
    return torch.stack([lin.weight.float().square().sum(0) for lin in linears]).sum(0).sqrt()
