"""Finished sweep points, keyed by their resolved config, so a rerun skips them.

The key hashes the resolved config minus what does not change a result (``logger``, ``name``,
``resume``), plus the results schema and the package's code (its version and a hash of its
files, so a point measured before a strategy, a kernel or the evaluation text was edited is
not served after). The modules that only read finished points (:data:`REPORTING`: reports,
tables, the trinity) are left out of that hash, so a change to a report does not measure the
points again (an import-linter contract keeps every module a point runs from importing them).
Only points with status ``ok`` are stored; failed ones run again. Entries live in
``$MOYU_CACHE_DIR/points/<key>.json``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from moyu_exp import cache, results
from moyu_exp.results import SCHEMA

IGNORED_KEYS = ("logger", "name", "resume", "verbose")
BUILT = (".pyc", ".so", ".o")  # build products next to the sources are not part of the key
REPORTING = ("report.py", "runs.py", "tables.py", "trinity.py")  # read points, never make them
log = logging.getLogger(__name__)


def point_key(config: dict[str, Any]) -> str:
    """The content key of a resolved config (a plain dict). A strategy that ignores the
    sparsity (dense) or only switches on with it (cett) gets the same key at every value."""
    relevant = {k: v for k, v in config.items() if k not in IGNORED_KEYS}
    relevant["data_dir"] = _real(relevant.get("data_dir"))
    if isinstance(relevant.get("eval"), dict):
        relevant["eval"] = {**relevant["eval"], "data_dir": _real(relevant["eval"].get("data_dir"))}
    strategy = dict(relevant.get("strategy") or {})
    if "_target_" in strategy and "sparsity" in relevant:
        from hydra.utils import get_class

        effective = get_class(strategy["_target_"]).key_sparsity(relevant["sparsity"])
        relevant["sparsity"] = effective
        strategy["sparsity"] = effective
        relevant["strategy"] = strategy
    return cache.content_key(SCHEMA, _version(), relevant)


def load(key: str) -> dict[str, Any] | None:
    """The stored payload of a finished point, or None (also when the file is unreadable)."""
    path = cache.root() / "points" / f"{key}.json"
    try:
        payload = results.read(path)
    except (OSError, ValueError):  # missing, truncated or of another schema: recompute
        return None
    return payload if payload.get("status") == "ok" else None


def artefacts(payload: dict[str, Any]) -> list[str]:
    """Files of the run dir that results.json refers to (relative paths): probe figures."""
    return list((payload.get("probe") or {}).get("figures") or [])


def save(key: str, payload: dict[str, Any], run_dir: Path | None = None) -> None:
    """Store a finished point, with the artefacts its results refer to (copied from
    ``run_dir``); a cache that cannot be written only costs the resume."""
    if payload.get("status") != "ok":
        return
    folder = cache.root() / "points"
    try:
        files = artefacts(payload)
        if files and run_dir is not None:
            with cache.atomic_dir(folder / f"{key}.files") as tmp:
                for name in files:
                    shutil.copy2(Path(run_dir) / name, tmp / name)
        cache.write_json_atomic(folder / f"{key}.json", payload)
    except OSError as err:
        log.warning("could not store the finished point (%s): a rerun will recompute it", err)


def restore(key: str, payload: dict[str, Any], run_dir: Path) -> bool:
    """Copy a stored point's artefacts into a new run dir; False when one is missing (then the
    point runs again rather than leave results.json pointing at nothing)."""
    stored = cache.root() / "points" / f"{key}.files"
    files = artefacts(payload)
    if not all((stored / name).is_file() for name in files):
        return False
    for name in files:
        shutil.copy2(stored / name, Path(run_dir) / name)
    return True


def _real(path: str | None) -> str | None:
    """One spelling per folder (``../shared/data`` and its absolute path key alike)."""
    return os.path.realpath(os.path.expanduser(path)) if path else path


@functools.cache
def _version() -> str:
    """The package version and a hash of the package's files (Python and C sources, texts)."""
    try:
        version = metadata.version("moyu_exp")
    except metadata.PackageNotFoundError:
        version = "unknown"
    package = Path(__file__).parent
    code = hashlib.sha256()
    for source in hashed_files():
        code.update(str(source.relative_to(package)).encode() + b"\0" + source.read_bytes())
    return f"{version}+{code.hexdigest()[:16]}"


def hashed_files() -> list[Path]:
    """The package's files a point's key depends on: sources and texts, not build products
    nor the modules that only read finished points."""
    package = Path(__file__).parent
    return [
        source
        for source in sorted(package.rglob("*"))
        if source.is_file()
        and "__pycache__" not in source.parts
        and source.suffix not in BUILT
        and str(source.relative_to(package)) not in REPORTING
    ]
