"""Reading run folders: every ``results.json`` under some folders, one payload per point, and
the labels that tell a strategy's points apart (for :mod:`moyu_exp.report` and
:mod:`moyu_exp.trinity`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from moyu_exp import results


def collect(dirs: list[Path], unique: bool = True) -> list[dict[str, Any]]:
    """Payloads of every results.json under ``dirs``, one per point (``unique``: the best of
    the folders that hold the same point key) or one per folder."""
    best: dict[str, dict[str, Any]] = {}
    for folder in dirs:
        for path in sorted(Path(folder).rglob("results.json")):
            try:
                payload = results.read(path)
            except (OSError, ValueError) as err:  # a foreign, damaged or older file
                print(f"moyu_exp.report: skipping {path}: {err}", file=sys.stderr)
                continue
            payload.setdefault("run_dir", str(path.parent))
            key = (payload.get("point_key") if unique else None) or str(path.parent)
            if key not in best or rank(payload) >= rank(best[key]):
                best[key] = payload
    return list(best.values())


def rank(payload: dict[str, Any]) -> tuple[bool, str]:
    return payload.get("status") == "ok", str(payload.get("created", ""))


# Config keys that never tell points apart in a label (the x axis, bookkeeping, paths).
UNLABELLED = (
    "sparsity",
    "strategy.sparsity",
    "strategy._target_",
    "strategy.name",
    "name",
    "resume",
    "threads",
    "logger.",
    "data_dir",
    "eval.data_dir",
    "model.device",
)


def labels(payloads: list[dict[str, Any]], ignore: tuple[str, ...] = ()) -> list[str]:
    """Strategy names, plus ``key=value`` for the config keys that vary within a strategy
    (except those starting with ``ignore``)."""
    flats = [flatten(p.get("config") or {}) for p in payloads]
    names = [str(p.get("strategy")) for p in payloads]
    varying: dict[str, set[str]] = {}
    for name, flat in zip(names, flats, strict=True):
        for other_name, other in zip(names, flats, strict=True):
            if other_name == name:
                # a key one of them lacks (a result from before the key existed) is no difference
                keys = {k for k in set(flat) & set(other) if flat[k] != other[k]}
                varying.setdefault(name, set()).update(
                    k for k in keys if not k.startswith((*UNLABELLED, *ignore))
                )
    labels = []
    for name, flat in zip(names, flats, strict=True):
        extra = [
            f"{k.removeprefix('strategy.')}={short(flat.get(k))}"
            for k in sorted(varying.get(name, ()))
        ]
        labels.append(f"{name} ({', '.join(extra)})" if extra else name)
    return labels


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def short(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(map(str, value))
    return str(value)
