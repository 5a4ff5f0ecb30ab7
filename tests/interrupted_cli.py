"""``python -m tests.interrupted_cli WHERE ARG ...``: the CLI (``python -m moyu_exp ARG ...``)
with a Ctrl-C at a moment a real one is hard to hit on purpose. WHERE is ``imports`` (while
the CLI imports Hydra) or ``swallowed`` (the Ctrl-C lands inside transformers' first import
and comes out as an error of that import, without the KeyboardInterrupt, as torch's own
import can turn it)."""

from __future__ import annotations

import builtins
import contextlib
import runpy
import sys

WHERE, sys.argv = sys.argv[1], ["moyu_exp", *sys.argv[2:]]
real_import = builtins.__import__


def interrupting_import(name, *args, **kwargs):
    if WHERE == "imports" and name == "hydra":
        raise KeyboardInterrupt
    if WHERE == "swallowed" and name == "transformers" and "transformers" not in sys.modules:
        from moyu_exp.errors import on_interrupt

        with contextlib.suppress(KeyboardInterrupt):  # the library swallows it
            on_interrupt(2, None)  # what the CLI's handler does on Ctrl-C
        raise AttributeError("module 'torch' has no attribute 'ops'")
    return real_import(name, *args, **kwargs)


builtins.__import__ = interrupting_import
runpy.run_module("moyu_exp", run_name="__main__", alter_sys=True)
