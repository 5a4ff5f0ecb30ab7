"""One experiment: load -> calibrate -> apply -> eval -> bench -> log.

:func:`run` is what every Hydra job (single run or sweep point) calls. It always writes
``results.json`` (status ``ok``, or ``failed`` with the error) and finishes its W&B run.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from moyu_exp import bench, calibration, evaluation, models, results, tracking
from moyu_exp.config import build, validate
from moyu_exp.strategies import Strategy


def run(cfg: DictConfig, run_dir: Path, group: str | None = None) -> dict[str, Any]:
    """Run the experiment ``cfg`` describes; results go to ``run_dir/results.json`` and W&B."""
    validate(cfg)
    evaluation.check(cfg.eval)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"{cfg.strategy.name}-s{cfg.sparsity:g}"
    tags = [cfg.strategy.name, cfg.model.name]
    timings: dict[str, float] = {}
    with tracking.start(cfg.logger, run_dir, config, name, group or cfg.name, tags) as tracker:
        try:
            fields = experiment(cfg, timings)
            payload = results.build(status="ok", config=config, **fields)
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
            payload = results.build(status="failed", config=config, error=error, timings=timings)
            results.write(run_dir, payload)
            tracker.log_results(payload)
            raise
        results.write(run_dir, payload)
        tracker.log_results(payload)
    return payload


def experiment(cfg: DictConfig, timings: dict[str, float]) -> dict[str, Any]:
    """The pipeline itself; ``timings`` is filled in as phases finish (kept on failure)."""
    seed_everything(cfg.seed)
    with stopwatch(timings, "load"):
        loaded = models.load(cfg.model)
    strategy: Strategy = build(cfg.strategy)
    with stopwatch(timings, "calibrate"):
        calibrated = calibration.prepare(strategy, loaded, cfg)
    with strategy.attach(loaded.model) as live:
        with stopwatch(timings, "eval"):
            metrics, details = evaluation.run(loaded, cfg.eval, live, cfg.seed)
        eval_stats = live.take_stats()
        with stopwatch(timings, "bench"):
            timing = bench.run(loaded, cfg.bench, live)
        bench_stats = live.take_stats()
    total = eval_stats + bench_stats
    measured = bool(total.counts) or not strategy.sites
    return {
        "achieved_sparsity": total.overall if measured else None,
        "sparsity_detail": {"eval": eval_stats.to_dict(), "bench": bench_stats.to_dict()},
        "model": {**loaded.info, "loads_in_process": models.load_count()},
        "calibration": calibrated,
        "eval": metrics,
        "eval_details": details,
        "bench": timing,
        "timings": timings,
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def stopwatch(timings: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[f"{phase}_s"] = round(time.perf_counter() - start, 3)
