"""Shared machinery of calibrated-threshold methods (CATS, TEAL, CHESS).

An entry is zeroed when its *score* (|x| by default) is below its (site, layer) threshold, the
quantile of calibration scores at the site's sparsity level. ``threshold_mode`` says how the
calibration scores are gathered:

- ``progressive`` (default): in one pass in execution order, every site seeing the inputs the
  thresholds before it leave. The achieved sparsity then meets the target; calibrating on the
  dense model instead overshoots it as sparsified layers feed later ones (measured on SmolLM2 at
  0.7: TEAL 0.747, CHESS 0.689 on held-out text with dense statistics). Thresholds depend on the
  sparsity (part of the calibration key); a site downstream of others can need a *lower*
  threshold at a higher sparsity, since its inputs shrink.
- ``dense``: the statistics of the dense model, as the methods' own code does; thresholds are
  monotone in the sparsity and one calibration serves every sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moyu_exp.activations import calibrate_thresholds, threshold_at
from moyu_exp.errors import ConfigError
from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import KernelRule, Strategy

torch = lazy_import("torch")

THRESHOLD_MODES = ("progressive", "dense")


@dataclass(eq=False)
class ThresholdStrategy(Strategy):
    threshold_mode: str = "progressive"

    needs_calibration = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threshold_mode not in THRESHOLD_MODES:
            raise ConfigError(
                f"strategy.threshold_mode='{self.threshold_mode}' is unknown: "
                f"accepted are {', '.join(THRESHOLD_MODES)}"
            )

    @property
    def in_order(self) -> bool:
        return self.threshold_mode == "progressive"

    def score(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """What is compared with the threshold (|x| unless a method weighs entries)."""
        return x.abs()

    def site_levels(self, layer: int) -> dict[str, float]:
        """The fraction of entries each site of ``layer`` drops (uniform by default)."""
        return dict.fromkeys(self.sites, self.sparsity)

    def calibration_key(self) -> dict[str, Any]:
        key = super().calibration_key() | {"threshold_mode": self.threshold_mode}
        return key | ({"sparsity": self.sparsity} if self.in_order else {})

    def calibration_taps(self, model, layers: list[int]) -> dict:
        """Extra hooks for the calibration pass (statistics a score needs)."""
        return {}

    def calibrate(self, model, batches, cached) -> dict[str, torch.Tensor]:
        layers = self.layer_ids_for(model)
        levels = {
            (site, layer): level
            for layer in layers
            for site, level in self.site_levels(layer).items()
        }
        ids = torch.cat(batches, dim=0)
        taps = self.calibration_taps(model, layers)
        tables, thresholds = calibrate_thresholds(
            model, ids, levels, self.score, taps, self.in_order
        )
        state = {f"table.{site}.{layer}": table for (site, layer), table in tables.items()}
        if self.in_order:
            state |= {f"threshold.{s}.{i}": torch.tensor([t]) for (s, i), t in thresholds.items()}
        return state | self.extra_state()

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Statistics gathered during calibration that inference needs too."""
        return {}

    def prepare(self, model, adapter) -> None:
        self._threshold = {}
        for layer in self.layer_ids:
            for site, level in self.site_levels(layer).items():
                if self.in_order:
                    threshold = float(self.calibration[f"threshold.{site}.{layer}"])
                else:
                    threshold = threshold_at(self.calibration[f"table.{site}.{layer}"], level)
                self._threshold[(site, layer)] = threshold

    def score_scale(self, site: str, layer: int) -> torch.Tensor | None:
        """The per-entry factor of :meth:`score` (None: the score is |x|)."""
        return None

    def kernel_rule(self, site: str, layer: int) -> KernelRule:
        scale = self.score_scale(site, layer)
        return KernelRule(threshold=self._threshold[(site, layer)], scale=scale)

    def kept(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        threshold = self._threshold[(site, layer)]
        if threshold <= 0:
            return torch.ones_like(x, dtype=torch.bool)
        return self.score(site, layer, x) >= threshold

    def sparsify(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        threshold = self._threshold[(site, layer)]
        if threshold <= 0:
            return x
        return x.masked_fill(self.score(site, layer, x) < threshold, 0.0)
