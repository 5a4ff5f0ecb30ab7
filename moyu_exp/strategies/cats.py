"""CATS: a per-layer threshold on |SiLU(gate(x))| at the s-quantile of calibration activations.

Entries below the threshold are zeroed, so the matching rows of up_proj and columns of down_proj
can be skipped (Lee et al., COLM 2024; ScalingIntelligence/CATS). As in its code, the threshold
comes from the dense model's activations (``threshold_mode=dense``) and every position runs
sparse (``SparseSiLU`` applies to all of them).

Departures: the quantile is taken over a random sample of the calibration values (2^20) where
CATS's code reads it off a histogram; CATS fine-tunes nothing here (its training-free variant).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moyu_exp.strategies.base import register
from moyu_exp.strategies.threshold import ThresholdStrategy


@register("cats")
@dataclass(eq=False)
class Cats(ThresholdStrategy):
    name: str = "cats"
    sites: list[str] = field(default_factory=lambda: ["gate_act"])

    allowed_sites = ("gate_act",)
