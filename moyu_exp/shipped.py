"""Calibration shipped with the package: the slow, model-specific parts of the built-in models.

TEAL's repository ships its greedy lookup tables for every model it supports, so that nobody
searches them again; moyu_exp does the same for its built-in real models (``smollm2_135m``,
``gemma3_270m``): TEAL's and WINA's greedy paths, a few KB per layer, in
``moyu_exp/data/shipped/<model>-<method>.safetensors``.

A shipped tensor stands for one calibration part (:class:`moyu_exp.calibration.Parts`) and is
stored under that part's full key: a digest of the model's weights, of the calibration token ids,
the method, the search version and every parameter that changes the search. A run uses it only
when the key it computes is the same, i.e. when every one of these matches; otherwise it
searches (and caches) its own. The file's metadata spells the key's parts out (and how, where
and when the file was computed) for people and for the test that fails when a shipped file no
longer matches the code's search version or the YAML defaults.

``python -m moyu_exp.ship`` regenerates them (:mod:`moyu_exp.ship`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from moyu_exp.lazy import lazy_import

torch = lazy_import("torch")

FOLDER = Path(__file__).parent / "data" / "shipped"
FORMAT = "moyu_exp.shipped/1"


@functools.cache
def _index() -> dict[str, tuple[Path, str]]:
    """{part key: (file, label)} over every shipped file (metadata only)."""
    from moyu_exp.cache import safetensors_meta

    index = {}
    for path in sorted(FOLDER.glob("*.safetensors")):
        meta = safetensors_meta(path)
        if meta.get("format") != FORMAT:
            continue
        for label, key in json.loads(meta.get("keys", "{}")).items():
            index[key] = (path, label)
    return index


def find(key: str) -> dict[str, torch.Tensor] | None:
    """The tensors of the shipped part stored under ``key``, or None."""
    hit = _index().get(key)
    if hit is None:
        return None
    from safetensors import safe_open

    path, label = hit
    prefix = f"{label}/"
    with safe_open(str(path), framework="pt") as f:
        names = [n for n in f.keys() if n.startswith(prefix)]  # noqa: SIM118 (not iterable)
        return {n[len(prefix) :]: f.get_tensor(n) for n in names}


def files() -> list[tuple[Path, dict[str, str]]]:
    """Every shipped file with its metadata."""
    from moyu_exp.cache import safetensors_meta

    return [(p, safetensors_meta(p)) for p in sorted(FOLDER.glob("*.safetensors"))]


def write(path: Path, parts: dict[str, tuple[str, dict[str, Any]]], meta: dict[str, Any]) -> None:
    """A shipped file: ``parts`` {label: (key, tensors)}, ``meta`` (values JSON-encoded unless
    strings)."""
    from safetensors.torch import save

    from moyu_exp.cache import write_bytes_atomic

    tensors = {
        f"{label}/{name}": t.detach().to("cpu").contiguous()
        for label, (_, part) in parts.items()
        for name, t in part.items()
    }
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    header |= {"format": FORMAT, "keys": json.dumps({lb: k for lb, (k, _) in parts.items()})}
    write_bytes_atomic(path, save(tensors, metadata=header))
    _index.cache_clear()
