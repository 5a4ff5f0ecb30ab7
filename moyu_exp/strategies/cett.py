"""CETT: a per-layer threshold set by a target cumulative error of tail truncation.

For a token's MLP intermediate z, entry j contributes z_j * W_down[:, j] to the block output. The
layer's threshold eps zeroes entries with |z_j| * ||W_down[:, j]|| < eps; it is chosen so that,
averaged over calibration tokens, CETT = ||W_down (z * 1[small])|| / ||W_down z|| equals
``target`` (0.2 in "Dynamic Activation Pitfalls", Ma et al. 2024, and ProSparse). The sparsity is
therefore an outcome, reported, not a setting: ``sparsity`` only switches the method on (0 keeps
the model dense); ``strategy.target`` is the knob.

Departures: eps is solved by bisection on the first ``max_tokens`` calibration tokens of each
layer (no public reference implementation fixes this); every position runs sparse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

from moyu_exp.activations import observe
from moyu_exp.config import FRACTION, Range
from moyu_exp.families import adapter_for
from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import KernelRule, Strategy, register

torch = lazy_import("torch")

SITE = "mlp_intermediate"


@register("cett")
@dataclass(eq=False)
class Cett(Strategy):
    name: str = "cett"
    sites: list[str] = field(default_factory=lambda: [SITE])
    target: float = 0.2
    max_tokens: int = 1024  # calibration tokens per layer used to solve for eps

    RANGES: ClassVar[dict[str, Range]] = {**Strategy.RANGES, "target": FRACTION}
    allowed_sites = (SITE,)
    needs_calibration = True
    calibration_passes = 2.0  # one pass, and the bisections cost about another

    @classmethod
    def key_sparsity(cls, sparsity: float) -> float | str:
        return 0.0 if sparsity == 0 else "on"

    def calibration_key(self) -> dict[str, Any]:
        return super().calibration_key() | {"target": self.target, "max_tokens": self.max_tokens}

    def calibrate(self, model, batches: list[torch.Tensor], cached) -> dict[str, torch.Tensor]:
        adapter = adapter_for(model)
        blocks = adapter.layers(model)
        layers = self.layer_ids(model)
        rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

        def keep(_site: str, layer: int, x: torch.Tensor) -> None:
            have = sum(r.shape[0] for r in rows[layer])
            if have < self.max_tokens:
                rows[layer].append(x.reshape(-1, x.shape[-1])[: self.max_tokens - have].float())

        observe(model, batches, [(SITE, layer) for layer in layers], keep)
        state = {}
        for layer in layers:
            (down,) = adapter.readers(blocks[layer], SITE)
            eps = solve_epsilon(torch.cat(rows[layer]), down.weight.float(), self.target)
            state[f"epsilon.{layer}"] = torch.tensor([eps])
        return state

    def prepare(self, model, adapter, layers, calibration) -> SimpleNamespace:
        blocks = adapter.layers(model)
        rules = {}
        for layer in layers:
            (down,) = adapter.readers(blocks[layer], SITE)
            norm = down.weight.float().norm(dim=0).to(down.weight.dtype)
            eps = float(calibration[f"epsilon.{layer}"]) if self.sparsity else 0.0
            rules[layer] = KernelRule(threshold=eps, scale=norm)
        return SimpleNamespace(rules=rules)

    def kernel_rule(self, state, site: str, layer: int) -> KernelRule:
        return state.rules[layer]


def mean_cett(z: torch.Tensor, weight: torch.Tensor, contribution: torch.Tensor, eps: float):
    """Mean over tokens of ||W (z * 1[contribution < eps])|| / ||W z||."""
    full = (z @ weight.T).norm(dim=-1).clamp_min(1e-12)
    tail = ((z * (contribution < eps)) @ weight.T).norm(dim=-1)
    return float((tail / full).mean())


def solve_epsilon(z: torch.Tensor, weight: torch.Tensor, target: float, steps: int = 40) -> float:
    """Bisection for eps with mean CETT(eps) = target (CETT grows with eps)."""
    contribution = z.abs() * weight.norm(dim=0)
    low, high = 0.0, float(contribution.max()) * 1.0001
    for _ in range(steps):
        mid = (low + high) / 2
        if mean_cett(z, weight, contribution, mid) < target:
            low = mid
        else:
            high = mid
    return low
