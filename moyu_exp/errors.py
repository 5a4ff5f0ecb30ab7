"""Errors that end a run with a one-line message instead of a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing configuration mistake; its message is one actionable line."""


class NonFiniteLogits(RuntimeError):
    """A forward pass produced NaN or inf logits."""


def is_known(err: BaseException) -> bool:
    """Errors whose message is the whole story: bad input, numerical failure, out of memory."""
    known = isinstance(err, ConfigError | NonFiniteLogits)
    return known or type(err).__name__ == "OutOfMemoryError"
