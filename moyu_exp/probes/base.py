"""The probe contract: a dataclass of parameters whose ``run`` measures one MOYU phenomenon.

``run(loaded, cfg)`` returns a :class:`ProbeOutput`: JSON-ready numbers (they go to
``results.json`` under ``probe`` and, where scalar, to the W&B summary) and matplotlib figures
(saved as PNGs in the run dir and logged to W&B). Probes know nothing of W&B or files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from omegaconf import DictConfig

from moyu_exp.config import SPARSITY, Range, check_fields
from moyu_exp.registry import registrar

if TYPE_CHECKING:
    from moyu_exp.models import LoadedModel

PROBES: dict[str, type[Probe]] = {}
register = registrar(PROBES, "probe")  # class decorator: ``probe=<name>``


@dataclass
class ProbeOutput:
    numbers: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # name -> matplotlib Figure


@dataclass(eq=False)
class Probe:
    name: str = "probe"
    sparsity: float = 0.5  # s in A_l(t) = top-k of |z_t|, k = round((1 - s) * d_ff)

    question: ClassVar[str] = ""
    # numeric fields' accepted values (other integer fields: >= 1, a seed and offsets >= 0)
    RANGES: ClassVar[dict[str, Range]] = {"sparsity": SPARSITY}

    def __post_init__(self) -> None:
        check_fields(self, "probe.", self.RANGES)

    def run(self, loaded: LoadedModel, cfg: DictConfig) -> ProbeOutput:
        raise NotImplementedError
