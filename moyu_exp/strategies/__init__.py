"""Dynamic-activation strategies: one module per method, registered by name."""

from moyu_exp.strategies import (  # noqa: F401  (registration side effects)
    cats,
    cett,
    chess,
    clada,
    dense,
    griffin,
    larosa,
    moyu,
    predictor,
    random,
    rsparse,
    static,
    tda,
    teal,
    topk,
    wina,
)
from moyu_exp.strategies.attachment import Attachment
from moyu_exp.strategies.base import STRATEGIES, KernelRule, Strategy, keep_count, register
from moyu_exp.strategies.protocol import Positions, TokenRoles

__all__ = [
    "STRATEGIES",
    "Attachment",
    "KernelRule",
    "Positions",
    "Strategy",
    "TokenRoles",
    "keep_count",
    "register",
]
