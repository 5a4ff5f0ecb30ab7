"""MOYU probes: one module per measurement of history-related activation uncertainty and
semantic-irrelevant activation inertia, run as ``python -m moyu_exp probe=<name>``."""

from moyu_exp.probes import (  # noqa: F401  (registration side effects)
    first_tokens,
    history_recall,
    hot_neurons,
    lag_overlap,
    predictor_shift,
    reconstruction,
    semantic_vs_positional,
    sparsity_profile,
    sparsity_variance,
)
from moyu_exp.probes.base import PROBES, Probe, ProbeOutput, register

__all__ = ["PROBES", "Probe", "ProbeOutput", "register"]
