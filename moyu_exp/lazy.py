"""Deferred imports, so that composing configs and skipping finished sweep points stay fast.

Strategy modules define dataclasses (the config schemas) at import time but need torch only when
they run; ``torch = lazy_import("torch")`` makes the real import happen at first use. The CLI
can then compose a config, report a config mistake or resume a finished point in well under a
second of imports instead of torch's ~1.3 s.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    """``name`` as a module whose code runs on first attribute access (a top-level package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named '{name}'")
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
