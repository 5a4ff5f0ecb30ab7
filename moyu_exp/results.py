"""``results.json``: the schema every run writes, atomically, into its Hydra output dir.

The payload is typed (:class:`Results` and the TypedDicts it nests) and checked against those
types when it is written and when it is read back (by the report, the sweep resume), so a field
of the wrong type fails where it is produced, with its path. Metric names follow lm-eval
without the ``,none`` filter suffix (``acc``, ``acc_norm``, ``word_perplexity``); a metric
under another filter keeps it (``exact_match,strict-match``). Which metrics are better high is
lm-eval's own ``higher_is_better``, kept per task in ``eval_details``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import types
import typing
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from moyu_exp.cache import write_json_atomic
from moyu_exp.errors import ResultsNotWritten

# 3: each field in one place (the bench's bytes and ideal in sparsity_detail.bench only; the
# headline names its phase); 2: model-level counts, per-phase meters, paired kernel speed
SCHEMA = 3


class PhaseSparsity(TypedDict):
    """What one phase (eval, bench) kept, from its SparsityMeter (see moyu_exp.meter)."""

    site_sparsity: float
    entry_fraction: float
    entries: int
    dense_prompt_entries: int
    sparse_positions: int
    dense_positions: int
    by_site: dict[str, float]
    by_layer: dict[str, float]
    model_sparsity: NotRequired[float]
    weight_bytes_per_token: NotRequired[float]
    dense_weight_bytes_per_token: NotRequired[int]
    lm_head_bytes_per_token: NotRequired[int]
    ideal_speedup: NotRequired[float]


class Bench(TypedDict, total=False):
    """Timing of the bench phase (simulated: medians of repeats; kernel: paired windows)."""

    mode: str
    device: str
    dtype: str
    prompt_tokens: int
    decode_tokens: int
    repeats: int
    rounds: int
    prefill_ms: float
    decode_tokens_per_s: float
    decode_ms_per_token: float
    dense_tokens_per_s: float
    speedup: float
    speedup_q25: float
    speedup_q75: float
    speedup_iqr: float
    efficiency: float  # speedup over sparsity_detail.bench.ideal_speedup
    kernel_backend: str
    peak_memory_mb: float
    memory_kind: str


class TaskDetails(TypedDict, total=False):
    n_samples: dict[str, int] | None
    version: Any
    higher_is_better: dict[str, bool]
    sparse_scored_fraction: float | None  # scored positions that ran sparse (the protocol)
    by_distance: dict[str, list[float]]  # generation: KL and top-1 at each generated distance
    items: dict[str, list[float]]  # each item's scores: {"doc_id": [...], metric: [...]}


class Probe(TypedDict):
    name: str
    question: str
    numbers: dict[str, Any]
    figures: list[str]


class Results(TypedDict, total=False):
    """One point's results.json."""

    schema: int
    status: str  # ok | failed
    error: str | None
    strategy: str | None
    sparsity: float | None
    # the headline: sparsity_detail[headline_phase]'s (the evaluation's, else the bench's)
    achieved_sparsity: float | None  # model-level (share of block linear weights skipped)
    site_sparsity: float | None  # at the strategy's own sites
    weight_bytes_per_token: float | None
    ideal_speedup: float | None
    headline_phase: str | None
    sparsity_detail: dict[str, PhaseSparsity]
    model: dict[str, Any]
    calibration: dict[str, Any] | None
    eval: dict[str, dict[str, float]]
    eval_details: dict[str, TaskDetails]
    bench: Bench
    probe: Probe
    timings: dict[str, float]
    point_key: str
    run_dir: str
    resumed_from: str | None
    config: dict[str, Any]
    env: dict[str, Any]
    created: str


REQUIRED = ("schema", "status", "error", "strategy", "sparsity", "config", "env", "created")


class InvalidResults(ValueError):
    """A results payload that does not match the schema."""


def validate(payload: Any) -> Results:
    """Check ``payload`` against :class:`Results` (raises :class:`InvalidResults` naming the
    field); returns it typed."""
    if not isinstance(payload, dict):
        raise InvalidResults(f"results must be an object, not {type(payload).__name__}")
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise InvalidResults(f"results lack {', '.join(missing)}")
    _check(payload, Results, "results")
    if payload["status"] not in ("ok", "failed"):
        raise InvalidResults(f"results.status={payload['status']!r}: expected ok or failed")
    return typing.cast(Results, payload)


def _check(value: Any, kind: Any, path: str) -> None:
    """``value`` against the annotation ``kind`` (TypedDicts, dict/list, unions, scalars)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return
    if origin is NotRequired:
        return _check(value, args[0], path)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _check(value, option, path)
            except InvalidResults as err:
                errors.append(str(err))
        raise InvalidResults(errors[0])
    if typing.is_typeddict(kind):
        if not isinstance(value, dict):
            raise InvalidResults(f"{path} should be an object, not {type(value).__name__}")
        hints = typing.get_type_hints(kind, include_extras=True)
        for key in kind.__required_keys__:
            if key not in value:
                raise InvalidResults(f"{path}.{key} is missing")
        for key, item in value.items():
            if key in hints:
                _check(item, hints[key], f"{path}.{key}")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise InvalidResults(f"{path} should be an object, not {type(value).__name__}")
        for key, item in value.items():
            _check(item, args[1], f"{path}.{key}")
        return
    if origin is list:
        if not isinstance(value, list):
            raise InvalidResults(f"{path} should be a list, not {type(value).__name__}")
        for i, item in enumerate(value):
            _check(item, args[0], f"{path}[{i}]")
        return
    if kind is type(None):
        if value is not None:
            raise InvalidResults(f"{path} should be null, not {value!r}")
        return
    accepted = (int, float) if kind is float else (kind,)
    if not isinstance(value, accepted) or (isinstance(value, bool) and kind is not bool):
        raise InvalidResults(f"{path} should be {kind.__name__}, not {type(value).__name__}")


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
    """Write ``results.json`` atomically, after checking it against the schema: a failed write
    leaves the previous file untouched."""
    validate(json.loads(json.dumps(payload, default=str)))  # as it will be read back
    path = Path(run_dir) / FILENAME
    try:
        write_json_atomic(path, payload)
    except OSError as err:
        raise ResultsNotWritten(f"cannot write {path}: {err.strerror or err}") from err
    return path


def read(path: Path) -> Results:
    """A results.json, checked against the schema (:class:`InvalidResults` if it does not
    match; :class:`OSError` or :class:`ValueError` if it cannot be read or parsed)."""
    return validate(json.loads(Path(path).read_text()))


def build(
    *,
    status: str,
    config: dict[str, Any],
    error: str | None = None,
    runtime: bool = True,
    **fields: Any,
):
    """A results payload: the fixed header, the given fields, then config and env (without
    torch's threads and device when ``runtime`` is false: a run that failed before it started
    need not import torch to say so)."""
    return {
        "schema": SCHEMA,
        "status": status,
        "error": error,
        "strategy": (config.get("strategy") or {}).get("name"),
        "sparsity": config.get("sparsity"),
        **fields,
        "config": config,
        "env": environment(runtime),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def environment(runtime: bool = True) -> dict[str, Any]:
    """Package versions, Python, platform and git commit; with ``runtime``, also the device and
    torch's thread count (which import torch). Each part is gathered once per process."""
    return {**_static_environment(), **(_runtime_environment() if runtime else {})}


@cache
def _static_environment() -> dict[str, Any]:
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
        "cpu_count": os.cpu_count(),
    }


@cache
def _runtime_environment() -> dict[str, Any]:
    import torch

    return {"device": _device_name(), "torch_threads": torch.get_num_threads()}


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
