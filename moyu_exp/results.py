"""``results.json``: the schema every run writes, atomically, into its Hydra output dir.

Metric names follow lm-eval without the ``,none`` filter suffix (``acc``, ``acc_norm``,
``word_perplexity``); a metric under another filter keeps it (``exact_match,strict-match``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from moyu_exp.cache import write_json_atomic
from moyu_exp.errors import ResultsNotWritten

SCHEMA = 1
FILENAME = "results.json"
PACKAGES = ("moyu_exp", "torch", "transformers", "lm_eval", "hydra-core", "wandb", "datasets")


# a key part (between _ or -) that names a secret: hf_token, api_key, WANDB_API_KEY, secret_key;
# not prompt_tokens or tokenizer
SECRET_KEY = re.compile(
    r"(^|[_-])(api[_-]?key|token|secret|passw(or)?d|credentials?|auth)($|[_-])", re.IGNORECASE
)
REDACTED = "<redacted>"


def redact(value: Any) -> Any:
    """The config with every value under a secret-looking key (token, api_key, ...) hidden."""
    if isinstance(value, dict):
        return {
            k: (REDACTED if SECRET_KEY.search(str(k)) and v is not None else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def write(run_dir: Path, payload: dict[str, Any]) -> Path:
    """Write ``results.json`` atomically: a failed write leaves the previous file untouched."""
    path = Path(run_dir) / FILENAME
    try:
        write_json_atomic(path, payload)
    except OSError as err:
        raise ResultsNotWritten(f"cannot write {path}: {err.strerror or err}") from err
    return path


def read(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def build(*, status: str, config: dict[str, Any], error: str | None = None, **fields: Any):
    """A results payload: the fixed header, the given fields, then config and env."""
    return {
        "schema": SCHEMA,
        "status": status,
        "error": error,
        "strategy": (config.get("strategy") or {}).get("name"),
        "sparsity": config.get("sparsity"),
        **fields,
        "config": config,
        "env": environment(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


@cache
def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_sha": _git_sha(),
        "device": _device_name(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def _git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=here,
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
