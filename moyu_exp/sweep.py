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
        logger = config.get("logger")
        if logger is not None and logger.name != "none" and str(logger.mode) != "disabled":
            log_aggregate(table, directions, logger, sweep_dir)


def log_aggregate(
    table: list[dict[str, Any]], directions: dict[str, bool], logger: DictConfig, sweep_dir: Path
) -> None:
    """One W&B run for the whole sweep, in the group of its point runs: the summary table,
    trade-off lines, quality against measured and ideal speedup with their frontiers, the
    figures."""
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
        run.log(logged)
        run.summary.update({"points": len(table), "failed": len(table) - len(ok)})


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
