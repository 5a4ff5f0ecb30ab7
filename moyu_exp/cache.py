"""One cache root for everything reusable: converted models, calibration, finished sweep points.

Entries are keyed by a hash of what determines their content, and every write is atomic (a
temporary name in the same folder, then ``os.replace``), so a killed process never leaves a
half-written file behind under a final name. Entries that are expensive to build (a converted
model, calibration) are built under an exclusive lock, so parallel jobs on a cold cache (a joblib
or SLURM sweep, parallel tests) build each once and the others wait for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no locks; parallel jobs may then build an entry twice
    fcntl = None

log = logging.getLogger(__name__)


def root() -> Path:
    """``$MOYU_CACHE_DIR``, or ``~/.cache/moyu_exp``."""
    return Path(os.environ.get("MOYU_CACHE_DIR") or Path.home() / ".cache" / "moyu_exp")


def check_writable() -> Path:
    """The cache root, created if need be; a one-line EnvironmentFault when it cannot be
    written (every run writes converted models, calibration or finished points there)."""
    from moyu_exp.errors import EnvironmentFault

    folder = root()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        raise EnvironmentFault(
            f"cannot write the cache directory '{folder}' ({err.strerror or err}): set "
            "MOYU_CACHE_DIR to a writable folder"
        ) from None
    return folder


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def exclusive(entry: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache entry ``entry`` (a hidden ``.lock`` file beside it) for
    the block; the OS releases it if the process dies. Build an entry inside this block after
    checking again that no other process built it while this one waited."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name}.lock", "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def entry(kind: str, key: str) -> Path:
    """The file of a tensor cache entry: ``calibration/<kind>-<key>.safetensors``."""
    return root() / "calibration" / f"{kind}-{key}.safetensors"


def cached_tensors(
    kind: str,
    key: str,
    compute: Callable[[], dict],
    valid: Callable[[dict], bool] | None = None,
    meta: Callable[[], dict[str, str]] | None = None,
) -> tuple[dict, bool]:
    """Tensors stored as ``calibration/<kind>-<key>.safetensors``: read, or computed and written
    (once, when parallel jobs ask for the same entry). Returns (tensors, hit). An unreadable file
    (truncated, say) is rebuilt, with a warning; so is one that ``valid`` refuses (an entry that
    can grow, such as a greedy path searched only as far as an earlier run needed). ``meta``
    gives string metadata stored with a computed entry (:func:`read_meta`)."""
    path = entry(kind, key)

    def usable(found: dict | None) -> bool:
        return found is not None and (valid is None or valid(found))

    found = _read_tensors(path)
    if usable(found):
        return found, True
    with exclusive(path):
        found = _read_tensors(path, quiet=True)  # written by another job while this one waited
        if usable(found):
            return found, True
        tensors = write_cached(kind, key, compute(), meta() if meta is not None else None)
    return tensors, False


def read_cached(kind: str, key: str) -> dict | None:
    """The tensors of an entry, or None (missing or unreadable)."""
    return _read_tensors(entry(kind, key), quiet=True)


def write_cached(kind: str, key: str, tensors: dict, meta: dict[str, str] | None = None) -> dict:
    """Store an entry atomically; returns the tensors as stored (on the CPU, contiguous)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    write_bytes_atomic(entry(kind, key), save(tensors, metadata=meta))
    return tensors


def read_meta(kind: str, key: str) -> dict[str, str]:
    """The string metadata stored with an entry ({} if none)."""
    return safetensors_meta(entry(kind, key))


def safetensors_meta(path: Path) -> dict[str, str]:
    """A safetensors file's header metadata, read without its tensors ({} if none)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return {}
    return header.get("__metadata__") or {}


def _read_tensors(path: Path, quiet: bool = False) -> dict | None:
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not path.is_file():
        return None
    try:
        return load(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as err:
        if not quiet:
            log.warning("cache file %s is unreadable (%s); rebuilding it", path, err)
        return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, sort_keys=False, allow_nan=True, default=str)
    write_bytes_atomic(path, (text + "\n").encode())


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; it becomes ``final`` if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
