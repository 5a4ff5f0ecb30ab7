"""Weights & Biases: one run per job, always finished; offline unless ``logger.mode=online``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)


class Tracker:
    """What the runner logs through; the no-op base is ``logger=none``."""

    run: Any = None

    def log_results(self, payload: dict[str, Any]) -> None:
        """Put a results payload's numbers into the run summary."""

    def log_image(self, name: str, path: Path) -> None:
        """Attach a figure (a PNG file) to the run."""


class WandbTracker(Tracker):
    def __init__(self, run: Any):
        self.run = run

    def log_results(self, payload: dict[str, Any]) -> None:
        summary = summary_metrics(payload)
        self.run.summary.update(summary)
        self.run.log(summary)

    def log_image(self, name: str, path: Path) -> None:
        import wandb

        self.run.log({name.removesuffix(".png"): wandb.Image(str(path))})


def summary_metrics(payload: dict[str, Any]) -> dict[str, Any]:
    """Flat ``section/task/metric`` numbers of a results payload."""
    flat: dict[str, Any] = {"status": payload.get("status")}
    for key in (
        "sparsity",
        "achieved_sparsity",
        "site_sparsity",
        "ideal_speedup",
        "weight_bytes_per_token",
    ):
        if payload.get(key) is not None:
            flat[key] = payload[key]
    for task, metrics in (payload.get("eval") or {}).items():
        for metric, value in metrics.items():
            flat[f"eval/{task}/{metric}"] = value
    for key, value in (payload.get("bench") or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"bench/{key}"] = value
    probe = payload.get("probe") or {}
    flat.update(_scalars(probe.get("numbers") or {}, f"probe/{probe.get('name')}"))
    return flat


def _scalars(tree: Any, prefix: str) -> dict[str, float]:
    """Every scalar leaf of nested dicts, by slash-joined path (lists stay in results.json)."""
    if isinstance(tree, dict):
        out: dict[str, float] = {}
        for key, value in tree.items():
            out |= _scalars(value, f"{prefix}/{key}")
        return out
    if isinstance(tree, int | float) and not isinstance(tree, bool):
        return {prefix: tree}
    return {}


@contextlib.contextmanager
def start(
    cfg: DictConfig,
    run_dir: Path,
    config: dict[str, Any],
    name: str,
    group: str | None,
    tags: list[str],
) -> Iterator[Tracker]:
    """A tracker for one job; the W&B run is finished when the block exits, also on errors."""
    if cfg.name == "none" or wandb_mode(cfg) == "disabled":
        yield Tracker()
        return
    import wandb

    def init(mode: str):
        return wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            dir=str(run_dir),
            config=config,
            name=name,
            group=cfg.group or group,
            tags=[*tags, *cfg.tags],
            mode=mode,
            settings=wandb.Settings(console="off", silent=True, init_timeout=cfg.init_timeout),
        )

    mode = wandb_mode(cfg)
    try:
        run = init(mode)
    except Exception as err:
        if mode != "online":
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning(
            "W&B online logging is unavailable (%s); logging offline instead: upload later with "
            "`wandb sync %s/wandb/offline-run-*`",
            reason,
            run_dir,
        )
        run = init("offline")
    try:
        yield WandbTracker(run)
    except BaseException:
        # what `with run:` does, without the traceback W&B prints there: the CLI reports the
        # error (or the Ctrl-C) in one line
        run.finish(exit_code=1)
        raise
    run.finish()


def wandb_mode(cfg: DictConfig) -> str:
    return str(getattr(cfg.mode, "value", cfg.mode))
