"""Top-k: per token, keep the k = round((1 - s) * d) largest-magnitude entries of a site.

An oracle reference, not a published method: it needs the whole site vector (for the MLP
intermediate, the full gate and up products) before it can choose, so a kernel skips only the
readers of the site (down_proj). Every position runs sparse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import KernelRule, Strategy, register, topk_rule

torch = lazy_import("torch")


@register("topk")
@dataclass(eq=False)
class TopK(Strategy):
    """Oracle per-token top-k of |h| on the MLP intermediate h = act(gate(x)) * up(x) by default."""

    name: str = "topk"
    sites: list[str] = field(default_factory=lambda: ["mlp_intermediate"])

    def prepare(self, model, adapter, layers, calibration) -> SimpleNamespace:
        return SimpleNamespace(dims={site: adapter.dim(model, site) for site in self.sites})

    def kernel_rule(self, state, site: str, layer: int) -> KernelRule:
        return topk_rule(self.sparsity, state.dims[site])

    def select(self, x: torch.Tensor, prompt=None, state=None, layer: int = 0) -> torch.Tensor:
        """The kept set of every token of ``x`` (..., dim): bool, k per row (probes use it)."""
        return topk_rule(self.sparsity, x.shape[-1]).mask(x)
