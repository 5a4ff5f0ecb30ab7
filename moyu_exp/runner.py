"""One experiment: load -> calibrate -> apply -> eval -> bench -> log.

:func:`run` is what every Hydra job (single run or sweep point) calls. It always writes
``results.json`` (status ``ok``, or ``failed`` with the error) and finishes its W&B run. A point
whose resolved config already finished (see :mod:`moyu_exp.points`) is not run again: its stored
results are written and nothing heavy is even imported.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moyu_exp import points, results
from moyu_exp.config import build, validate
from moyu_exp.errors import check_interrupt, interrupted


def run(cfg: DictConfig, run_dir: Path, group: str | None = None) -> dict[str, Any]:
    """Run the experiment ``cfg`` describes; results go to ``run_dir/results.json`` and W&B."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with failures_recorded(cfg, run_dir):
        validate(cfg)
        config = results.redact(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        key = points.point_key(config)
    done = points.load(key) if cfg.resume else None
    if done is not None and points.restore(key, done, run_dir):
        current = {"sparsity": config["sparsity"], "strategy": config["strategy"]["name"]}
        payload = {**done, **current, "config": config, "run_dir": str(run_dir)}
        payload["resumed_from"] = done.get("run_dir")
        results.write(run_dir, payload)
        return payload

    from moyu_exp import cache, evaluation, tracking

    probing = cfg.get("probe") is not None
    with failures_recorded(cfg, run_dir):
        cache.check_writable()
        if not probing:
            evaluation.check(cfg.eval)
    subject = f"probe-{cfg.probe.name}" if probing else cfg.strategy.name
    name = f"{subject}-s{(cfg.probe.sparsity if probing else cfg.sparsity):g}"
    tags = [subject, cfg.model.name]
    header = {"point_key": key, "run_dir": str(run_dir)}
    timings: dict[str, float] = {}
    with tracking.start(cfg.logger, run_dir, config, name, group or cfg.name, tags) as tracker:
        try:
            fields = (
                probe_experiment(cfg, timings, run_dir) if probing else experiment(cfg, timings)
            )
            payload = results.build(status="ok", config=config, **header, **fields)
        except Exception as err:
            if interrupted(err):  # Ctrl-C, surfaced as a library's error: not a failed point
                raise
            error = f"{type(err).__name__}: {err}"
            payload = results.build(
                status="failed", config=config, error=error, **header, timings=timings
            )
            results.write(run_dir, payload)
            tracker.log_results(payload)
            raise
        results.write(run_dir, payload)
        tracker.log_results(payload)
        for figure in (payload.get("probe") or {}).get("figures", []):
            tracker.log_image(figure, run_dir / figure)
    points.save(key, payload, run_dir)
    return payload


@contextlib.contextmanager
def failures_recorded(cfg: DictConfig, run_dir: Path) -> Iterator[None]:
    """On an error before the experiment starts, leave a ``failed`` results.json, then re-raise."""
    try:
        yield
    except Exception as err:
        if interrupted(err):
            raise
        config = results.redact(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True))
        error = f"{type(err).__name__}: {err}"
        payload = results.build(status="failed", config=config, error=error, runtime=False)
        results.write(run_dir, payload)
        raise


def experiment(cfg: DictConfig, timings: dict[str, float]) -> dict[str, Any]:
    """The pipeline itself; ``timings`` is filled in as phases finish (kept on failure)."""
    from moyu_exp import bench, calibration, evaluation, models
    from moyu_exp.strategies import Strategy

    seed_everything(cfg.seed)
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    with stopwatch(timings, "load"):
        loaded = models.load(cfg.model)
    strategy: Strategy = build(cfg.strategy)
    with stopwatch(timings, "calibrate"):
        state, calibrated = calibration.prepare(strategy, loaded, cfg)
    with strategy.attach(loaded.model, state) as live, models.finite_logits_guard(loaded.model):
        with stopwatch(timings, "eval"), live.measuring() as eval_meter:
            metrics, details = evaluation.run(loaded, cfg.eval, live, cfg.seed)
        with stopwatch(timings, "bench"), live.measuring() as bench_meter:
            timing = bench.run(loaded, cfg.bench, live)
    meters = {"eval": eval_meter, "bench": bench_meter}
    phases = {phase: meter.summary() for phase, meter in meters.items()}
    # the headline is the evaluation's, else the bench's; dense has nothing to count
    measured = [phase for phase, meter in meters.items() if meter.measured]
    measured = measured or ([] if strategy.sites else ["eval"])
    headline = (phases[measured[0]] if measured else None) or {}
    return {
        # model-level: the share of the blocks' linear weights a kernel skips per sparse token
        "achieved_sparsity": headline.get("model_sparsity"),
        "site_sparsity": headline.get("site_sparsity"),  # at the strategy's own sites
        "weight_bytes_per_token": headline.get("weight_bytes_per_token"),
        "ideal_speedup": headline.get("ideal_speedup"),
        "headline_phase": measured[0] if measured else None,
        "sparsity_detail": phases,
        "model": {**loaded.info, "loads_in_process": models.load_count()},
        "calibration": calibrated,
        "eval": metrics,
        "eval_details": details,
        "bench": timing,
        "timings": timings,
    }


def probe_experiment(cfg: DictConfig, timings: dict[str, float], run_dir: Path) -> dict[str, Any]:
    """A MOYU probe instead of eval and bench: its numbers, and its figures saved as PNGs."""
    from moyu_exp import models
    from moyu_exp.plots import save_png

    seed_everything(cfg.seed)
    with stopwatch(timings, "load"):
        loaded = models.load(cfg.model)
    probe = build(cfg.probe)
    with stopwatch(timings, "probe"), models.finite_logits_guard(loaded.model):
        output = probe.run(loaded, cfg)
    files = []
    for figure_name, figure in output.figures.items():
        files.append(f"{probe.name}_{figure_name}.png")
        save_png(figure, run_dir / files[-1])
    return {
        "strategy": None,
        "sparsity": probe.sparsity,
        "model": {**loaded.info, "loads_in_process": models.load_count()},
        "probe": {
            "name": probe.name,
            "question": probe.question,
            "numbers": output.numbers,
            "figures": files,
        },
        "timings": timings,
    }


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def stopwatch(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Time a phase into ``timings``; a Ctrl-C that a library swallowed stops the run here."""
    check_interrupt()
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[f"{phase}_s"] = round(time.perf_counter() - start, 3)
