"""Dynamic-activation strategies: one module per method, registered by name."""

from moyu_exp.strategies import (  # noqa: F401  (registration side effects)
    cats,
    cett,
    chess,
    dense,
    griffin,
    predictor,
    random,
    static,
    tda,
    teal,
    topk,
    wina,
)
from moyu_exp.strategies.attachment import Attachment, TokenRoles
from moyu_exp.strategies.base import STRATEGIES, KernelRule, Strategy, keep_count, register

__all__ = [
    "STRATEGIES",
    "Attachment",
    "KernelRule",
    "Strategy",
    "TokenRoles",
    "keep_count",
    "register",
]
