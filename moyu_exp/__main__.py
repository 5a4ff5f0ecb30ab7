"""``python -m moyu_exp key=value ...`` (one run) and ``python -m moyu_exp -m ...`` (a sweep).

A config mistake, non-finite logits, running out of memory or unwritable results end a single
run with one line on stderr and a non-zero exit code (2 for config mistakes); set
HYDRA_FULL_ERROR=1 for the traceback. In a sweep a failed point is recorded (``results.json``
with status ``failed``) and the sweep goes on; the exit code is 1 if any point failed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from moyu_exp.errors import interrupted, is_config_mistake, is_known, on_interrupt, one_line

INTERRUPTED = "moyu_exp: interrupted; the point in progress wrote nothing (rerun to resume)"


def exit_interrupted() -> NoReturn:
    """One line and exit 130, once the stack has unwound (results are written atomically, so
    nothing is half-written). Without the interpreter's shutdown: after an interrupt inside
    torch's import its half-built modules can crash it (seen: a segfault after the message)."""
    print(INTERRUPTED, file=sys.stderr, flush=True)
    logging.shutdown()  # flush the run's log file
    sys.stdout.flush()
    os._exit(130)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not if Ctrl-C is ignored
    signal.signal(signal.SIGINT, on_interrupt)

try:  # Ctrl-C among these imports (seconds: Hydra, our modules) ends as one during a run does
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from moyu_exp import console, runner, sweep
    from moyu_exp.config import CONF_DIR
    from moyu_exp.schemas import register_configs

    register_configs()
except KeyboardInterrupt:
    exit_interrupted()

log = logging.getLogger("moyu_exp")

CONF = str(CONF_DIR)
# Hydra prints compose errors itself unless HYDRA_FULL_ERROR=1; we set it to format them in one
# line, and remember here whether the user had asked for full tracebacks.
USER_FULL_ERROR = "MOYU_USER_HYDRA_FULL_ERROR"


def _fail(err: BaseException) -> None:
    """Exit with one line for known errors (unless the user wants tracebacks); else re-raise."""
    if os.environ.get(USER_FULL_ERROR) == "1" or not (is_known(err) or is_config_mistake(err)):
        raise err
    print(f"moyu_exp: error: {one_line(err)}", file=sys.stderr)
    sys.exit(2 if is_config_mistake(err) else 1)


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def hydra_entry(cfg: DictConfig) -> str | float:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    console.quiet(bool(cfg.get("verbose")))
    if multirun:
        cfg.model.device = sweep.job_device(cfg.model.device, hc.job.num, hc.launcher._target_)
        if cfg.threads is None and hc.launcher.get("n_jobs"):
            cfg.threads = max(1, (os.cpu_count() or 1) // max(1, int(hc.launcher.n_jobs)))
    try:
        payload = runner.run(cfg, run_dir, group=Path(hc.sweep.dir).name if multirun else None)
    except Exception as err:
        if interrupted(err):  # a lazy import's error after a Ctrl-C
            raise KeyboardInterrupt from err
        if not multirun:
            _fail(err)  # exits here, before Hydra adds its own report of the failed job
        log.error("point failed (%s): %s", run_dir.name, f"{type(err).__name__}: {err}")
        payload = {"status": "failed"}
    else:
        if not multirun:  # a sweep ends with its comparison table instead
            print(console.render(payload, run_dir), flush=True)
    if cfg.search.metric is not None:
        from moyu_exp.search import objective

        return objective(cfg, payload, run_dir)
    return payload["status"]


def main() -> None:
    os.environ.setdefault(USER_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR", "0"))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_entry()
    except KeyboardInterrupt:
        exit_interrupted()
    except Exception as err:
        if interrupted(err):
            exit_interrupted()
        _fail(err)
    if sweep.FAILED:
        print(f"moyu_exp: {len(sweep.FAILED)} sweep point(s) failed:", file=sys.stderr)
        for line in sweep.FAILED:
            print(f"  {line}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
