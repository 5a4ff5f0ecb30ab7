"""The native CPU mat-vec kernels (``csrc/sparse_gemv.c``), compiled once and loaded with ctypes.

Why native: at batch 1, torch's CPU mat-vec (``F.linear``) streamed weights at about 11 GB/s
on this 2-core machine, while a plain OpenMP loop reached 27-40 GB/s; a sparse kernel compared
with a slow dense baseline would flatter itself. The same kernels therefore run the dense and
the sparse decode. The library is built with the system C compiler at first use (well under a
second) into ``$MOYU_CACHE_DIR/kernels/<key>/``, keyed by the source, the compiler and the
CPU's flags (``-march=native`` code must not travel to another CPU). Without a compiler, or
with ``MOYU_KERNELS=torch``, or on CUDA, the stock-PyTorch ops of :mod:`moyu_exp.kernels.ops`
run instead.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from moyu_exp import cache
from moyu_exp.lazy import lazy_import

torch = lazy_import("torch")
log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "sparse_gemv.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


class Native:
    """The compiled library with its C signatures declared (pointers are ``data_ptr()``s)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        matvec = [ptr, i64, ptr, i64, ptr, ptr]
        signatures = {
            "dot": (matvec, None),
            "dot_masked": ([*matvec, ptr], None),
            "axpy_masked": ([*matvec, ptr, ptr], i64),
        }
        for kind, (args, result) in signatures.items():
            for suffix in ("f32", "bf16"):
                fn = getattr(lib, f"{kind}_{suffix}")
                fn.argtypes, fn.restype = args, result
        for suffix in ("f32", "bf16"):
            fn = getattr(lib, f"axpy_rule_{suffix}")
            fn.argtypes = [ptr, i64, i64, ptr, ptr, ptr, f32, i64, ptr, ptr, ptr, ptr]
            fn.restype = i64
            fn = getattr(lib, f"gated_rule_{suffix}")
            fn.argtypes = [
                ptr,
                ptr,
                i64,
                i64,
                ptr,
                ptr,
                ptr,
                ptr,
                f32,
                i64,
                ptr,
                ptr,
                ptr,
                ptr,
                ptr,
            ]
            fn.restype = i64
        lib.rmsnorm.argtypes, lib.rmsnorm.restype = [ptr, ptr, i64, f32, ptr], None
        lib.silu_mul.argtypes, lib.silu_mul.restype = [ptr, i64, ptr], None
        lib.attend.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, f32, ptr, ptr]
        lib.attend.restype = None
        lib.mask_rows.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr, f32, i64, i64, ptr]
        lib.mask_rows.restype = i64
        lib.select_entries.argtypes = [ptr, i64, ptr, ptr, f32, i64, ptr, ptr]
        lib.select_entries.restype = i64
        lib.random_keep.argtypes = [ptr, i64, i64, i64, ctypes.c_uint64, i64]
        lib.random_keep.restype = None
        lib.apply_keep.argtypes = [ptr, ptr, i64, i64, i64, ptr, i64, i64, ptr, i64]
        lib.apply_keep.restype = i64

    def fn(self, kind: str, weight):
        """The ``kind`` kernel for ``weight``'s dtype (fp32 or bf16)."""
        suffix = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(weight.dtype)
        if suffix is None:
            raise TypeError(f"native kernels take fp32 or bf16 weights, not {weight.dtype}")
        return getattr(self.lib, f"{kind}_{suffix}")


def load() -> Native | None:
    """The compiled kernels, or None (then the stock-PyTorch ops run)."""
    if os.environ.get("MOYU_KERNELS", "native") == "torch":
        return None
    return build(SOURCE)


@functools.cache
def build(source: Path) -> Native | None:
    """The kernels compiled from ``source`` (the package's own, or another version of it for a
    benchmark's comparison), cached by content; None when no compiler can build them."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: sparse kernels fall back to stock PyTorch ops")
        return None
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
        key = cache.content_key(
            source.read_text(), version, FLAGS, platform.machine(), _cpu_flags()
        )
        path = cache.root() / "kernels" / key / "sparse_gemv.so"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
            os.close(fd)
            try:
                subprocess.run(
                    [compiler, *FLAGS, str(source), "-o", tmp],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return Native(ctypes.CDLL(str(path)))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or err
        log.warning("native kernels unavailable (%s): stock PyTorch ops run instead", detail)
        return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()
