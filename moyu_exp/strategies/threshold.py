"""Shared machinery of calibrated-threshold methods (CATS, TEAL, CHESS).

An entry is dropped when its *score* ``|x_i| * scale_i`` (scale 1 unless a method weighs
entries, as CHESS does) is below its (site, layer) threshold, the quantile of calibration scores
at the site's sparsity level. ``threshold_mode`` says how the calibration scores are gathered:

- ``dense`` (default, what the methods' own code does): the statistics of the dense model;
  thresholds are monotone in the sparsity and one calibration serves every sparsity. Once early
  layers are sparse, later ones see smaller inputs, so the achieved sparsity can drift from the
  target (measured on SmolLM2 at 0.7 with the earlier calibration text: TEAL 0.747, CHESS 0.689).
- ``progressive`` (an option of ours): in one pass in execution order, every site seeing the
  inputs the thresholds before it leave, so that the achieved sparsity meets the target.
  Thresholds then depend on the sparsity (part of the calibration key); a site downstream of
  others can need a *lower* threshold at a higher sparsity, since its inputs shrink.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from moyu_exp.activations import calibrate_thresholds, threshold_at
from moyu_exp.config import check_choice
from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import KernelRule, Strategy

torch = lazy_import("torch")

THRESHOLD_MODES = ("progressive", "dense")


@dataclass(eq=False)
class ThresholdStrategy(Strategy):
    threshold_mode: str = "dense"  # the methods' own: the dense model's statistics

    needs_calibration = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("strategy.threshold_mode", self.threshold_mode, THRESHOLD_MODES)

    @property
    def in_order(self) -> bool:
        return self.threshold_mode == "progressive"

    def site_levels(self, calibration: dict, layer: int) -> dict[str, float]:
        """The fraction of entries each site of ``layer`` drops (uniform by default)."""
        return dict.fromkeys(self.sites, self.sparsity)

    def calibration_key(self) -> dict[str, Any]:
        key = super().calibration_key() | {"threshold_mode": self.threshold_mode}
        return key | ({"sparsity": self.sparsity} if self.in_order else {})

    def calibration_scales(self, model, layers: list[int]) -> tuple[list, dict]:
        """Hooks for the calibration pass that measure each (site, layer)'s score scale, and
        the dict they fill ({(site, layer): tensor}); none by default."""
        return [], {}

    def calibrate_first(self, model, batches, cached) -> dict[str, torch.Tensor]:
        """State the levels depend on, computed before the thresholds (TEAL's greedy path)."""
        return {}

    def calibrate(self, model, batches, cached) -> dict[str, torch.Tensor]:
        layers = self.layer_ids(model)
        state = self.calibrate_first(model, batches, cached)
        levels = {
            (site, layer): level
            for layer in layers
            for site, level in self.site_levels(state, layer).items()
        }
        taps, scales = self.calibration_scales(model, layers)

        def score(site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
            scale = scales.get((site, layer))
            return x.abs() if scale is None else x.abs() * scale.to(x.device, x.dtype)

        if not self.in_order and all(f"table.{s}.{i}" in state for s, i in levels) and not taps:
            return state  # the dense tables are already there (TEAL's greedy statistics)
        ids = torch.cat(batches, dim=0)
        tables, thresholds = calibrate_thresholds(model, ids, levels, score, taps, self.in_order)
        state |= {f"table.{site}.{layer}": table for (site, layer), table in tables.items()}
        state |= {f"scale.{site}.{layer}": scale for (site, layer), scale in scales.items()}
        if self.in_order:
            state |= {f"threshold.{s}.{i}": torch.tensor([t]) for (s, i), t in thresholds.items()}
        return state

    def prepare(self, model, adapter, layers, calibration) -> SimpleNamespace:
        device = next(model.parameters()).device
        rules = {}
        for layer in layers:
            for site, level in self.site_levels(calibration, layer).items():
                threshold = self.threshold(calibration, site, layer, level)
                scale = calibration.get(f"scale.{site}.{layer}")
                scale = None if scale is None else scale.to(device)
                rules[(site, layer)] = KernelRule(threshold=max(threshold, 0.0), scale=scale)
        return SimpleNamespace(rules=rules)

    def threshold(self, calibration: dict, site: str, layer: int, level: float) -> float:
        """The threshold of (site, layer) at ``level``: found in order during calibration, or the
        ``level``-quantile of the dense model's scores."""
        if self.in_order:
            return float(calibration[f"threshold.{site}.{layer}"])
        return threshold_at(calibration[f"table.{site}.{layer}"], level)

    def kernel_rule(self, state, site: str, layer: int) -> KernelRule:
        return state.rules[(site, layer)]
