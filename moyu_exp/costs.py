"""Saying what a slow step will cost before paying it (calibration searches, training)."""

from __future__ import annotations

import logging

log = logging.getLogger("moyu_exp")

SLOW = 60.0  # seconds: a step expected to take longer says so before it starts


def announce(what: str, seconds: float, avoid: str) -> None:
    """One line, when ``seconds`` is a minute or more: the estimate on this machine, that the
    work resumes where it stopped, and the option that avoids it."""
    if seconds >= SLOW:
        log.info(
            "%s: about %s on this machine (estimated); an interrupted run resumes where it "
            "stopped; %s avoids it",
            what,
            duration(seconds),
            avoid,
        )


def duration(seconds: float) -> str:
    """``42 s``, ``17 min``, ``2 h 10 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60} min"
