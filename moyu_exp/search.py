"""The objective of a ``hydra/sweeper=optuna`` search: high sparsity at bounded quality loss.

A point scores its achieved sparsity when ``search.metric`` stays within ``search.budget`` of the
dense model on the same evaluation, and that sparsity minus 1 otherwise, so every feasible point
outranks every infeasible one and the sweeper (direction: maximize) climbs to the highest
feasible sparsity. The dense reference is itself a point: computed once, then cached.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from moyu_exp.report import directions


def metric_value(payload: dict[str, Any], metric: str) -> float:
    task, name = metric.split("/")
    value = (payload.get("eval") or {}).get(task, {}).get(name)
    return float("nan") if value is None else float(value)


def within_budget(value: float, reference: float, higher_is_better: bool, budget: float) -> bool:
    if math.isnan(value) or math.isnan(reference):
        return False
    loss = reference - value if higher_is_better else value - reference
    return loss <= budget


def objective(cfg: DictConfig, payload: dict[str, Any], run_dir: Path) -> float:
    """The number the Optuna sweeper maximises for this point."""
    from moyu_exp import runner

    if payload.get("status") != "ok" or payload.get("achieved_sparsity") is None:
        return -1.0
    from moyu_exp.config import schema_for
    from moyu_exp.strategies import STRATEGIES

    reference_cfg = cfg.copy()
    with open_dict(reference_cfg):
        reference_cfg.strategy = OmegaConf.structured(schema_for(STRATEGIES["dense"]))
        reference_cfg.bench.enabled = False
    reference = runner.run(reference_cfg, run_dir / "dense_reference")
    metric = cfg.search.metric
    achieved = float(payload["achieved_sparsity"])
    higher = directions([payload]).get(metric, True)  # lm-eval's higher_is_better
    ok = within_budget(
        metric_value(payload, metric), metric_value(reference, metric), higher, cfg.search.budget
    )
    return achieved if ok else achieved - 1.0
