"""``python -m moyu_exp key=value ...`` (one run) and ``python -m moyu_exp -m ...`` (a sweep).

A config mistake, non-finite logits or running out of memory end a single run with one line on
stderr and a non-zero exit code. In a sweep a failed point is recorded (``results.json`` with
status ``failed``) and the sweep goes on; the exit code is non-zero if any point failed.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from moyu_exp import runner, sweep
from moyu_exp.config import register_configs
from moyu_exp.errors import ConfigError, is_known

log = logging.getLogger("moyu_exp")

# conf/ sits beside the package in a checkout and inside it in a wheel.
CONF = "conf" if (Path(__file__).parent / "conf").is_dir() else "../conf"

register_configs()


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def hydra_entry(cfg: DictConfig) -> str | float:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    if multirun:
        cfg.model.device = sweep.job_device(cfg.model.device, hc.job.num, hc.launcher._target_)
        if cfg.threads is None and hc.launcher.get("n_jobs"):
            cfg.threads = max(1, (os.cpu_count() or 1) // max(1, int(hc.launcher.n_jobs)))
    try:
        payload = runner.run(cfg, run_dir, group=Path(hc.sweep.dir).name if multirun else None)
    except Exception as err:
        if not multirun:
            if not is_known(err):
                raise
            print(f"moyu_exp: error: {err}", file=sys.stderr)
            sys.exit(2 if isinstance(err, ConfigError) else 1)
        log.error("point failed (%s): %s: %s", run_dir.name, type(err).__name__, err)
        if not is_known(err):
            log.debug("traceback", exc_info=True)
        payload = {"status": "failed"}
    if cfg.search.metric is not None:
        from moyu_exp.search import objective

        return objective(cfg, payload, run_dir)
    return payload["status"]


def main() -> None:
    hydra_entry()
    if sweep.FAILED:
        print(f"moyu_exp: {len(sweep.FAILED)} sweep point(s) failed:", file=sys.stderr)
        for line in sweep.FAILED:
            print(f"  {line}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
