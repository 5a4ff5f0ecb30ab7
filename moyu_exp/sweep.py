"""Sweeps: the Hydra callback that aggregates a multirun, and per-job device placement.

When a multirun ends, :class:`AggregateCallback` writes ``summary.csv``, ``tradeoff.png`` and
``pareto.png`` (and ``generation.png`` when the points measured generation fidelity) into the
sweep dir (see :mod:`moyu_exp.report`) and logs them to W&B as one
aggregate run in the sweep's group (a ``wandb.Table``, line and scatter plots, the images). It
also counts failed points; the command's exit code reports them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from moyu_exp import report

log = logging.getLogger(__name__)

FAILED: list[str] = []  # failed points of the multirun that just ended in this process


class AggregateCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table, directions = report.summarize([sweep_dir], sweep_dir)
        failed = [
            f"{r['label']} s={r['sparsity']}: {r['error']}" for r in table if r["status"] != "ok"
        ]
        FAILED[:] = failed
        text = report.format_table(table)
        log.info("sweep summary (%d points, %d failed):\n%s", len(table), len(failed), text)
        figures = ", ".join(report.figures(table))
        log.info("wrote %s/summary.csv, %s", sweep_dir, figures)
        trinity_files = write_trinity(config, sweep_dir)
        logger = config.get("logger")
        if logger is not None and logger.name != "none" and str(logger.mode) != "disabled":
            log_aggregate(table, directions, logger, sweep_dir, trinity_files)


def write_trinity(config: DictConfig, sweep_dir: Path) -> list[Path]:
    """The trinity report of a trinity sweep (``hydra/sweeper=trinity``), into the sweep dir
    and the sweeper's ``report_dir``; nothing for other sweeps."""
    sweeper = config.hydra.get("sweeper") or {}
    if not str(sweeper.get("_target_", "")).endswith("TrinitySweeper"):
        return []
    from moyu_exp import trinity

    levels = [float(v) for v in sweeper.levels]
    result = trinity.build([sweep_dir], levels, str(sweeper.axis), float(sweeper.target))
    commands = trinity.commands(sweep_dir, result)
    written = trinity.write(result, sweep_dir, commands)
    if sweeper.get("report_dir"):
        written = trinity.write(result, Path(str(sweeper.report_dir)), commands)
    log.info("trinity:\n%s", "\n".join(trinity.verdicts(result)))
    log.info("wrote %s", ", ".join(map(str, written)))
    return written


def log_aggregate(
    table: list[dict[str, Any]],
    directions: dict[str, bool],
    logger: DictConfig,
    sweep_dir: Path,
    trinity_files: list[Path] = (),
) -> None:
    """One W&B run for the whole sweep, in the group of its point runs: the summary table,
    trade-off lines, quality against measured and ideal speedup with their frontiers, the
    figures (and a trinity sweep's table and figure)."""
    import wandb

    from moyu_exp.plots import frontier
    from moyu_exp.tracking import wandb_mode

    group = logger.group or sweep_dir.name
    cols = report.columns(table)
    metrics = report.headline_metrics(table)
    settings = wandb.Settings(console="off", silent=True)
    with wandb.init(
        project=logger.project,
        entity=logger.entity,
        group=group,
        name=f"{group}-summary",
        job_type="sweep-summary",
        dir=str(sweep_dir),
        mode=wandb_mode(logger),
        config={"points": len(table), "sweep_dir": str(sweep_dir)},
        settings=settings,
    ) as run:
        data = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in table])
        logged: dict[str, Any] = {"summary": data}
        ok = [r for r in table if r["status"] == "ok"]
        for metric in metrics:
            series = {}
            for r in ok:
                if r.get(metric) is not None and r.get("achieved_sparsity") is not None:
                    series.setdefault(r["label"], []).append((r["achieved_sparsity"], r[metric]))
            if series:
                keys = sorted(series)
                xs = [[x for x, _ in sorted(series[k])] for k in keys]
                ys = [[y for _, y in sorted(series[k])] for k in keys]
                logged[f"tradeoff/{metric}"] = wandb.plot.line_series(
                    xs=xs,
                    ys=ys,
                    keys=keys,
                    title=f"{metric} vs model-level sparsity",
                    xname="model-level sparsity",
                )
        for speed, _ in report.SPEED_AXES if metrics else ():
            metric = metrics[0]
            points = [
                (r[speed], r[metric]) for r in ok if r.get(speed) and r.get(metric) is not None
            ]
            if not points:
                continue
            logged[f"pareto/{speed}"] = wandb.plot.scatter(
                data, speed, metric, title=f"{metric} vs {speed}"
            )
            lower = not directions.get(metric, True)
            front = wandb.Table(columns=[speed, metric], data=frontier(points, lower))
            logged[f"frontier/{speed}"] = wandb.plot.line(
                front, speed, metric, title=f"Pareto frontier: {metric} vs {speed}"
            )
        for image in report.figures(table):
            if (sweep_dir / image).is_file():
                logged[image.removesuffix(".png")] = wandb.Image(str(sweep_dir / image))
        for path in trinity_files:
            if path.suffix == ".csv":
                logged["trinity/table"] = _csv_table(wandb, path)
            elif path.suffix == ".png":
                logged["trinity/figure"] = wandb.Image(str(path))
        run.log(logged)
        run.summary.update({"points": len(table), "failed": len(table) - len(ok)})


def _csv_table(wandb, path: Path):
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return wandb.Table(columns=rows[0], data=rows[1:])


def job_device(device: str, job_num: int, launcher_target: str) -> str:
    """``device=auto`` under a parallel launcher: job n takes GPU n mod count (not all GPU 0)."""
    parallel = "BasicLauncher" not in launcher_target
    if device != "auto" or not parallel:
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    count = torch.cuda.device_count()
    return f"cuda:{job_num % count}" if count > 1 else "cuda"
