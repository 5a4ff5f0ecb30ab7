"""CATS: a per-layer threshold on |SiLU(gate(x))| at the s-quantile of calibration activations.

Entries below the threshold are zeroed, so the matching rows of up_proj and columns of down_proj
can be skipped (Lee et al., COLM 2024).
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
