"""Random: keep a random (1 - s) fraction of a site's entries per token (a control)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import Strategy, keep_count, register, topk_mask

torch = lazy_import("torch")


@register("random")
@dataclass(eq=False)
class Random(Strategy):
    """Exactly k = round((1 - s) * d) uniformly random entries kept per token (seeded)."""

    name: str = "random"
    sites: list[str] = field(default_factory=lambda: ["mlp_intermediate"])
    seed: int = 0

    def prepare(self, model, adapter, layers, calibration) -> SimpleNamespace:
        device = next(model.parameters()).device
        return SimpleNamespace(generator=torch.Generator(device=device).manual_seed(self.seed))

    def keep(self, state, site, layer, x, roles) -> torch.Tensor | None:
        k = keep_count(self.sparsity, x.shape[-1])
        if k >= x.shape[-1]:
            return None
        scores = torch.rand(x.shape, generator=state.generator, device=x.device)
        return topk_mask(scores, k)
