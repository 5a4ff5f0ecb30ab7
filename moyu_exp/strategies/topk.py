"""Top-k: per token, keep the k = round((1 - s) * d) largest-magnitude entries of a site."""

from __future__ import annotations

from dataclasses import dataclass, field

from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import KernelRule, Strategy, keep_count, register

torch = lazy_import("torch")


def topk_mask(x: torch.Tensor, k: int, magnitude: bool = True) -> torch.Tensor:
    """Bool mask with exactly ``k`` True entries per row: the largest |x| (or x) on the last dim."""
    keep = torch.zeros_like(x, dtype=torch.bool)
    score = x.abs() if magnitude else x
    return keep.scatter_(-1, score.topk(k, dim=-1, sorted=False).indices, True)


@register("topk")
@dataclass(eq=False)
class TopK(Strategy):
    """Oracle per-token top-k of |h| on the MLP intermediate h = act(gate(x)) * up(x) by default."""

    name: str = "topk"
    sites: list[str] = field(default_factory=lambda: ["mlp_intermediate"])

    def kernel_rule(self, site: str, layer: int) -> KernelRule:
        return KernelRule(k=keep_count(self.sparsity, self.dims[site]))

    def prepare(self, model, adapter) -> None:
        self.dims = {site: adapter.dim(model, site) for site in self.sites}

    def kept(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        k = keep_count(self.sparsity, x.shape[-1])
        return torch.ones_like(x, dtype=torch.bool) if k >= x.shape[-1] else topk_mask(x, k)

    def sparsify(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        k = keep_count(self.sparsity, x.shape[-1])
        if k >= x.shape[-1]:
            return x
        return x.masked_fill(~topk_mask(x, k), 0.0)
