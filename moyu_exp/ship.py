"""Regenerate (or check) the calibration shipped with the package (:mod:`moyu_exp.shipped`).

Every shipped file holds one method's greedy paths for one built-in model, searched here up to
the YAML's ``greedy_max`` with the YAML defaults, never reading a shipped file (each layer is
cached as it is found, so an interrupted run resumes)::

    python -m moyu_exp.ship                          # every built-in model and method (hours)
    python -m moyu_exp.ship --model smollm2_135m --method teal
    python -m moyu_exp.ship --model gemma3_270m --reach 0.5   # paths to 0.5 (runs continue them)
    python -m moyu_exp.ship --check                  # which files match the code (no model)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from moyu_exp import calibration, models, shipped
from moyu_exp.cache import content_key
from moyu_exp.config import build
from moyu_exp.schemas import compose_config
from moyu_exp.strategies import STRATEGIES
from moyu_exp.strategies.greedy import SEARCH_VERSION

MODELS = ("smollm2_135m", "gemma3_270m")
METHODS = ("teal", "wina")
PART = "greedy"  # the part kind shipped: the greedy paths (prefix-closed, one per layer)


def expected_keys(meta: dict[str, str]) -> dict[str, str]:
    """The part keys the current code computes, with the YAML defaults of the file's method,
    for the model and tokens a shipped file's metadata names: equal to the file's keys while
    the file is current."""
    method = meta["method"]
    strategy = default_strategy(method)
    data_key = content_key(calibration.VERSION, meta["fingerprint"], meta["token_digest"])
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
    cfg = compose_config([f"strategy={method}"])
    cfg.strategy.sparsity = cfg.strategy.greedy_max if sparsity is None else sparsity
    return build(cfg.strategy)


def check() -> list[str]:
    """One line per shipped file: current, or what no longer matches."""
    lines = []
    for path, meta in shipped.files():
        keys = json.loads(meta.get("keys", "{}"))
        stale = []
        if meta.get("search_version") != str(SEARCH_VERSION):
            stale.append(f"search version {meta.get('search_version')} != {SEARCH_VERSION}")
        if meta.get("calibration_version") != str(calibration.VERSION):
            version = calibration.VERSION
            stale.append(f"calibration version {meta.get('calibration_version')} != {version}")
        if keys != expected_keys(meta):
            stale.append("its parameters differ from the YAML defaults' or the code's keys")
        state = "current" if not stale else "STALE: " + "; ".join(stale)
        lines.append(f"{path.name}: {state}")
    return lines


# --------------------------------------------------------------------------- regeneration
def regenerate(model: str, method: str, reach: float | None = None) -> Path:
    """Search ``method``'s greedy paths for ``model`` up to ``reach`` (the YAML's cap by
    default; never reading a shipped file) and write them as ``<model>-<method>.safetensors``.
    A path is prefix-closed: a run past its last row continues the search from it."""
    cfg = compose_config([f"model={model}", f"strategy={method}"])
    loaded = models.load(cfg.model)
    strategy = default_strategy(method, reach)
    documents = build(cfg.dataset)
    seq_len = min(cfg.calibration.seq_len, calibration.context_length(loaded.model))
    batches = calibration.token_batches(
        loaded.tokenizer, documents, cfg.calibration.tokens, seq_len
    )
    fingerprint = models.weights_fingerprint(loaded.model)
    digest = calibration.token_digest(batches)
    data_key = content_key(calibration.VERSION, fingerprint, digest)
    parts = calibration.Parts(data_key, strategy.name, use_shipped=False)
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
        "reach": str(min(float(part["path"][-1, 0]) for _, part in chosen.values())),
        "search_version": str(SEARCH_VERSION),
        "calibration_version": str(calibration.VERSION),
        "owner": owner,
        "params": params,
        "fingerprint": fingerprint,
        "token_digest": digest,
        "tokens": sum(b.numel() for b in batches),
        "seq_len": seq_len,
        "dataset": cfg.dataset.name,
        "dtype": str(cfg.model.dtype),
        "command": f"python -m moyu_exp.ship --model {model} --method {method}",
        "commit": short_commit(),
        "machine": machine_description(),
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(seconds, 1),
        "parts_found": parts.summary(),
    }
    path = shipped.FOLDER / f"{model}-{method}.safetensors"
    shipped.write(path, chosen, meta)
    return path


def short_commit() -> str:
    """This checkout's commit, short ("unknown" outside git)."""
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


def machine_description() -> str:
    """CPU model, core count, torch and OS: the machine a measurement ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {platform.system()}"


PROVENANCE = (
    "model", "method", "reach", "tokens", "token_digest", "fingerprint", "commit", "created",
    "seconds", "machine",
)  # fmt: skip


def provenance_csv(path: Path) -> None:
    """Write one row per shipped file: its name, size and where it came from (its metadata)."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["file", "kilobytes", *PROVENANCE])
        for file, meta in shipped.files():
            size = round(file.stat().st_size / 1000)
            out.writerow([file.name, size, *(meta.get(k, "") for k in PROVENANCE)])


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m moyu_exp.ship",
        description="Regenerate (or --check) the calibration shipped with the package.",
    )
    parser.add_argument("--model", action="append", choices=MODELS)
    parser.add_argument("--method", action="append", choices=METHODS)
    parser.add_argument("--check", action="store_true", help="compare the files with the code")
    parser.add_argument(
        "--reach", type=float, help="sparsity the paths go to (default: the YAML's greedy_max)"
    )
    parser.add_argument("--provenance", type=Path, help="write where each file came from (CSV)")
    args = parser.parse_args(argv)
    if args.provenance:
        provenance_csv(args.provenance)
        return 0
    if args.check:
        lines = check()
        print("\n".join(lines) or f"no shipped files in {shipped.FOLDER}")
        return 0 if all(line.endswith(": current") for line in lines) else 1
    for model in args.model or MODELS:
        for method in args.method or METHODS:
            print(f"{model} {method}: searching (cached parts are reused) ...", flush=True)
            print(f"wrote {regenerate(model, method, args.reach)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
