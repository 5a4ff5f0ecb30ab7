"""Shared fixtures: composed configs, a tiny random LLaMA, an isolated cache dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from moyu_exp import models, schemas

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = Path(os.environ.get("MOYU_TEST_DATA_DIR", ROOT.parent / "shared" / "data"))

schemas.register_configs()


def pytest_configure(config) -> None:
    """Parallel workers (``pytest -n``) share the cores: each, and every process it starts, gets
    its share of threads (oversubscribed OpenMP threads make everything several times slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cores or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


TINY = [
    "model=tiny_llama",
    "bench=quick",
    "logger=none",
]


def run_module(
    *args: str,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    module: str = "moyu_exp",
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in a subprocess, as a user runs it: this test's environment
    (its cache dir) plus ``env``, without HYDRA_FULL_ERROR so errors print as users see them."""
    environment = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def compose_config(*overrides: str) -> DictConfig:
    return schemas.compose_config(overrides)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, tmp_path_factory, monkeypatch):
    """Every test gets its own cache root, so no finished sweep point leaks between tests; the
    content-keyed model and calibration caches are shared by the whole session."""
    shared = _session_cache(tmp_path_factory)
    root = tmp_path / "moyu_cache"
    root.mkdir()
    for sub in ("models", "calibration"):
        (shared / sub).mkdir(parents=True, exist_ok=True)
        (root / sub).symlink_to(shared / sub)
    monkeypatch.setenv("MOYU_CACHE_DIR", str(root))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MOYU_DATA_DIR", raising=False)


_CACHE: list[Path] = []


def _session_cache(factory) -> Path:
    """One cache per test session (shared by parallel workers, which build each entry once under
    the cache's locks), unless MOYU_TEST_CACHE_DIR points at a warm one."""
    if not _CACHE:
        warm = os.environ.get("MOYU_TEST_CACHE_DIR")
        if warm:
            _CACHE.append(Path(warm))
        elif os.environ.get("PYTEST_XDIST_WORKER"):
            shared = factory.getbasetemp().parent / "moyu_cache"  # the run's, not the worker's
            shared.mkdir(exist_ok=True)
            _CACHE.append(shared)
        else:
            _CACHE.append(factory.mktemp("moyu_cache"))
    return _CACHE[0]


# Test-sized calibration (tiny models; a key given in the test's overrides wins).
TEST_CALIBRATION = {
    "calibration.tokens": "4096",
    "calibration.seq_len": "512",
    "strategy.train_tokens": "2048",
}


def calibration_sizes(name: str, overrides: tuple[str, ...]) -> list[str]:
    """TEST_CALIBRATION's keys that ``overrides`` do not set (the predictor's for it only)."""
    given = {o.split("=", 1)[0] for o in overrides}
    return [
        f"{key}={value}"
        for key, value in TEST_CALIBRATION.items()
        if key not in given and (key != "strategy.train_tokens" or name == "predictor")
    ]


def attach(name: str, loaded, *overrides: str):
    """The strategy ``name`` (its config with ``overrides``), calibrated on ``loaded`` when it
    needs it, as an Attachment to enter: ``with attach("topk", tiny) as live:``. On tiny models
    calibration is test-sized (TEST_CALIBRATION)."""
    from moyu_exp import calibration
    from moyu_exp.config import build

    tiny = str(loaded.info.get("name")).startswith("tiny")
    sized = calibration_sizes(name, overrides) if tiny else []
    cfg = compose_config(f"strategy={name}", *sized, *overrides)  # only dataset keys are read
    strategy = build(cfg.strategy)
    state, _ = calibration.prepare(strategy, loaded, cfg)
    return strategy.attach(loaded.model, state)


@pytest.fixture
def tiny_cfg() -> DictConfig:
    return compose_config(*TINY)


@pytest.fixture
def tiny():
    """A tiny random LLaMA (2 layers, d_ff 160) and its byte tokenizer."""
    return models.load(compose_config(*TINY).model)


@pytest.fixture
def own_tiny():
    """A tiny random LLaMA of this test's own, outside the process's model cache: a test may
    change its weights without the others seeing it."""
    from moyu_exp.config import build

    cfg = compose_config(*TINY).model
    loaded = build(cfg)
    loaded.model.eval()
    loaded.info["name"] = cfg.name
    return loaded


@pytest.fixture
def tiny_batch(tiny) -> torch.Tensor:
    ids = tiny.tokenizer(["The quick brown fox jumps over the lazy dog."] * 2).input_ids
    return torch.tensor(ids)


def require_data() -> Path:
    """The benchmark data folder; a test without it skips, or fails where MOYU_REQUIRE_DATA is
    set (.ci/run sets it: a CI without the data must not be green)."""
    if not (SHARED_DATA / "piqa" / "validation.jsonl").is_file():
        message = f"benchmark data not found at {SHARED_DATA}"
        if os.environ.get("MOYU_REQUIRE_DATA"):
            pytest.fail(message + " (MOYU_REQUIRE_DATA is set)")
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    return require_data()
