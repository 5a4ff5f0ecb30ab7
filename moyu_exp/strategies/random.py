"""Random: keep a random (1 - s) fraction of a site's entries per token (a control).

Every token keeps exactly k = round((1 - s) * d) entries drawn uniformly (selection sampling in
the native kernels, seeded per call from the strategy's seeded generator; top-k of uniform
scores where the kernels are not built): the same seed gives the same sets for the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from moyu_exp.lazy import lazy_import
from moyu_exp.masking import random_keep
from moyu_exp.strategies.base import Strategy, keep_count, register

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

    def keep(self, state, site, layer, x, where) -> torch.Tensor | None:
        k = keep_count(self.sparsity, x.shape[-1])
        return None if k >= x.shape[-1] else random_keep(x.shape, k, state.generator)
