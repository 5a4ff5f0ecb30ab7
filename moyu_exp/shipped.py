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

Regenerate every shipped file (hours on a 2-core CPU; each part is cached as it is found, so an
interrupted run resumes)::

    python -m moyu_exp.shipped                       # every built-in model and method
    python -m moyu_exp.shipped --model smollm2_135m --method teal
    python -m moyu_exp.shipped --check               # which files match the code (no model)
"""

from __future__ import annotations

import functools
import json
import platform
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from moyu_exp.lazy import lazy_import

torch = lazy_import("torch")

FOLDER = Path(__file__).parent / "data" / "shipped"
FORMAT = "moyu_exp.shipped/1"
MODELS = ("smollm2_135m", "gemma3_270m")
METHODS = ("teal", "wina")
PART = "greedy"  # the part kind shipped: the greedy paths (prefix-closed, one per layer)


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


# ---------------------------------------------------------------------- keys from the code
def expected_keys(meta: dict[str, str]) -> dict[str, str]:
    """The part keys the current code computes, with the YAML defaults of the file's method,
    for the model and tokens a shipped file's metadata names: equal to the file's keys while
    the file is current."""
    from moyu_exp.cache import content_key
    from moyu_exp.calibration import VERSION
    from moyu_exp.strategies import STRATEGIES

    method = meta["method"]
    strategy = default_strategy(method)
    data_key = content_key(VERSION, meta["fingerprint"], meta["token_digest"])
    layers = range(int(meta["num_layers"]))
    owner, params = strategy.shipped_part()
    assert owner in STRATEGIES
    labels = {layer: f"{PART}-{layer}" for layer in layers}
    return {
        label: content_key(data_key, owner, label, params | {"layer": layer})
        for layer, label in labels.items()
    }


def default_strategy(method: str, sparsity: float | None = None):
    """``strategy=<method>`` as its YAML composes it (at its greedy path's cap by default)."""
    from moyu_exp.config import build, compose_config

    cfg = compose_config([f"strategy={method}"])
    cfg.strategy.sparsity = cfg.strategy.greedy_max if sparsity is None else sparsity
    return build(cfg.strategy)


def check() -> list[str]:
    """One line per shipped file: current, or what no longer matches."""
    from moyu_exp.calibration import VERSION
    from moyu_exp.strategies.greedy import SEARCH_VERSION

    lines = []
    for path, meta in files():
        keys = json.loads(meta.get("keys", "{}"))
        stale = []
        if meta.get("search_version") != str(SEARCH_VERSION):
            stale.append(f"search version {meta.get('search_version')} != {SEARCH_VERSION}")
        if meta.get("calibration_version") != str(VERSION):
            stale.append(f"calibration version {meta.get('calibration_version')} != {VERSION}")
        if keys != expected_keys(meta):
            stale.append("its parameters differ from the YAML defaults' or the code's keys")
        state = "current" if not stale else "STALE: " + "; ".join(stale)
        lines.append(f"{path.name}: {state}")
    return lines


# --------------------------------------------------------------------------- regeneration
def regenerate(model: str, method: str, cache_only: bool = False) -> Path:
    """Search ``method``'s greedy paths for ``model`` up to the YAML's cap (never reading a
    shipped file) and write them as ``<model>-<method>.safetensors``."""
    from moyu_exp import calibration, models
    from moyu_exp.cache import content_key
    from moyu_exp.calibration import VERSION, Parts, token_batches, token_digest
    from moyu_exp.config import build, compose_config
    from moyu_exp.strategies.greedy import SEARCH_VERSION

    cfg = compose_config([f"model={model}", f"strategy={method}"])
    loaded = models.load(cfg.model)
    strategy = default_strategy(method)
    documents = build(cfg.dataset)
    seq_len = min(cfg.calibration.seq_len, calibration.context_length(loaded.model))
    batches = token_batches(loaded.tokenizer, documents, cfg.calibration.tokens, seq_len)
    fingerprint = models.weights_fingerprint(loaded.model)
    digest = token_digest(batches)
    parts = Parts(content_key(VERSION, fingerprint, digest), strategy.name, use_shipped=False)
    parts.keep = {}  # every part the calibration reads or computes, with its key
    start = time.perf_counter()
    with torch.inference_mode():
        strategy.calibrate(loaded.model, batches, parts)
    seconds = time.perf_counter() - start
    owner, params = strategy.shipped_part()
    chosen = {lb: v for lb, v in parts.keep.items() if lb.startswith(f"{PART}-")}
    meta = {
        "method": method,
        "model": model,
        "num_layers": len(chosen),
        "search_version": str(SEARCH_VERSION),
        "calibration_version": str(VERSION),
        "owner": owner,
        "params": params,
        "fingerprint": fingerprint,
        "token_digest": digest,
        "tokens": sum(b.numel() for b in batches),
        "seq_len": seq_len,
        "dataset": cfg.dataset.name,
        "dtype": str(cfg.model.dtype),
        "command": f"python -m moyu_exp.shipped --model {model} --method {method}",
        "commit": _commit(),
        "machine": _machine(),
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(seconds, 1),
        "parts_found": parts.summary(),
    }
    path = FOLDER / f"{model}-{method}.safetensors"
    write(path, chosen, meta)
    return path


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {platform.system()}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m moyu_exp.shipped",
        description="Regenerate (or --check) the calibration shipped with the package.",
    )
    parser.add_argument("--model", action="append", choices=MODELS)
    parser.add_argument("--method", action="append", choices=METHODS)
    parser.add_argument("--check", action="store_true", help="compare the files with the code")
    args = parser.parse_args(argv)
    if args.check:
        lines = check()
        print("\n".join(lines) or f"no shipped files in {FOLDER}")
        return 0 if all(line.endswith(": current") for line in lines) else 1
    for model in args.model or MODELS:
        for method in args.method or METHODS:
            print(f"{model} {method}: searching (cached parts are reused) ...", flush=True)
            print(f"wrote {regenerate(model, method)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
