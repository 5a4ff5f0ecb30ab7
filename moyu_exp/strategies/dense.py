"""The dense reference: no site is touched."""

from __future__ import annotations

from dataclasses import dataclass

from moyu_exp.strategies.base import Strategy, register


@register("dense")
@dataclass(eq=False)
class Dense(Strategy):
    """Runs the model unchanged; ``sparsity`` is ignored and the achieved sparsity is 0."""

    name: str = "dense"

    @classmethod
    def key_sparsity(cls, sparsity: float) -> float:
        return 0.0
