"""Sweeps on a SLURM cluster: hydra-submitit-launcher's launcher, made safe for long sweeps.

(A Hydra plugin: launchers must live in the ``hydra_plugins`` namespace. It is imported whenever
Hydra discovers its plugins, so submitit itself is imported only when a sweep launches.)

``hydra/launcher=slurm`` (``conf/hydra/launcher/slurm.yaml``) sends each point of a sweep to
SLURM as one task of a job array, through submitit, as hydra-submitit-launcher does, and adds
what a sweep of hours needs:

- **resume without resubmitting**: a point that already finished (its resolved config is in the
  point cache, :mod:`moyu_exp.points`) is served here, in the launching process, in a fraction
  of a second; only the others are submitted;
- **a job that dies is a failed point, not a hang**: a job that ends without a result (killed,
  out of memory, past its time limit, ``scancel``) is recorded as a failed point, with SLURM's
  state and the end of the job's stderr as its reason, and the sweep goes on. submitit learns
  job states from ``sacct``, which fails on clusters without an accounting daemon (slurmdbd);
  then it would wait forever for such a job, so this launcher asks ``scontrol`` instead;
- a requeued job (``scontrol requeue``, a preemption) runs again from the start and ends with
  its result (points are written atomically).

``hydra/launcher=submitit_local`` runs the same machinery on this machine (no SLURM).
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger("moyu_exp.launcher")  # shown on the console as moyu_exp's own

GONE = "GONE"  # a job SLURM no longer knows (finished long enough ago to be forgotten)
POLL_S = 2.0  # how often the launcher looks for finished jobs
STATE_EVERY_S = 30.0  # at most how long a dead job goes unnoticed


class _Sweep:
    """What every launcher here shares: finished points served in this process, the others
    submitted, and a failed point recorded for a job that ended without a result."""

    _EXECUTOR = "abstract"

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        import submitit

        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        jobs = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        done = {idx: self._serve(ov, idx) for idx, ov in jobs if self._finished(ov, idx)}
        pending = [(idx, ov) for idx, ov in jobs if idx not in done]
        if done:
            log.info("%d point(s) already finished: served from the point cache", len(done))
        if not pending:
            return [done[idx] for idx, _ in jobs]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **self._init_params())
        executor.update_parameters(**self._resources())
        log.info("Submitit '%s' sweep output dir : %s", self._EXECUTOR, sweep_dir)
        for idx, overrides in pending:
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        params = [
            (ov, "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
            for idx, ov in pending
        ]
        submitted = executor.map_array(self, *zip(*params, strict=True))
        for (idx, overrides), job in zip(pending, _waited(submitted), strict=True):
            done[idx] = self._collect(job, overrides, idx)
        return [done[idx] for idx, _ in jobs]

    # ------------------------------------------------------------------------ parameters
    def _init_params(self) -> dict[str, Any]:
        params = {"folder": self.params["submitit_folder"]}
        if "max_num_timeout" in self.params:
            params[f"{self._EXECUTOR}_max_num_timeout"] = self.params["max_num_timeout"]
        return params

    def _resources(self) -> dict[str, Any]:
        base = set(OmegaConf.structured(submitit_launcher.BaseQueueConf).keys())
        skip = {"submitit_folder", "max_num_timeout"}
        return {
            k if k in base else f"{self._EXECUTOR}_{k}": v
            for k, v in self.params.items()
            if k not in skip and v is not None
        }

    # -------------------------------------------------------------- finished points here
    def _job_config(self, overrides: list[str], idx: int) -> DictConfig:
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config.hydra.job):
            config.hydra.job.num = idx
            config.hydra.job.id = f"job_id_for_{idx}"
        return config

    def _finished(self, overrides: list[str], idx: int) -> bool:
        """Whether the point is in the point cache (a finished identical point). The key is
        the configured one: where a job resolves ``model.device=auto`` to a GPU the launching
        node lacks, the point is submitted again and its job serves it from the cache."""
        from moyu_exp import points, results
        from moyu_exp.config import validate

        task = _task(self._job_config(overrides, idx))
        try:
            if not task.resume:
                return False
            validate(task)
            resolved = results.redact(OmegaConf.to_container(task, resolve=True))
        except Exception:  # a config mistake: the job reports it
            return False
        return points.load(points.point_key(resolved)) is not None

    def _serve(self, overrides: list[str], idx: int) -> JobReturn:
        """Run a finished point here (the runner serves it from the cache, torch unimported)."""
        config = self._job_config(overrides, idx)
        HydraConfig.instance().set_config(config)
        setup_globals()
        return run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )

    # ---------------------------------------------------------------- what jobs left
    def _collect(self, job: Any, overrides: list[str], idx: int) -> JobReturn:
        """The job's return, or, when it ended without one, a failed point with its reason."""
        import submitit

        try:
            return job.results()[0]
        except submitit.core.utils.UncompletedJobError as err:
            reason = _reason(job, err)
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
        return self._failed(overrides, idx, reason)

    def _failed(self, overrides: list[str], idx: int, reason: str) -> JobReturn:
        """A failed point's results.json in the job's run dir (unless the point had finished:
        killed after its results were written), and the job's return for the sweep."""
        from moyu_exp import results

        config = self._job_config(overrides, idx)
        run_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
        task = _task(config)
        status = _status(run_dir)
        if status != "ok":
            resolved = results.redact(OmegaConf.to_container(task, resolve=True))
            payload = results.build(
                status="failed", config=resolved, error=reason, runtime=False, run_dir=str(run_dir)
            )
            results.write(run_dir, payload)
            log.error("point failed (%s): %s", run_dir.name, reason)
        ret = JobReturn(overrides=overrides, cfg=task, hydra_cfg=config, working_dir=str(run_dir))
        ret.status = JobStatus.COMPLETED  # the sweep goes on; the point's results say how it ended
        ret.return_value = "ok" if status == "ok" else "failed"
        return ret


def _task(config: DictConfig) -> DictConfig:
    """The job's own config (what its task function gets): the sweep config without hydra."""
    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "results.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def _reason(job: Any, err: Exception) -> str:
    """SLURM's state of a job that ended without a result, and the end of its stderr."""
    state = job.state
    tail = ""
    try:
        lines = (job.stderr() or "").strip().splitlines()
        tail = " | ".join(line.strip() for line in lines[-3:])
    except OSError:
        pass
    return f"the job ended without a result (SLURM state {state})" + (f": {tail}" if tail else "")


def _waited(jobs: list) -> list:
    """``jobs`` once each is done (its result written, or SLURM says it ended)."""
    pending = list(jobs)
    last_state = time.monotonic()
    while pending:
        if time.monotonic() - last_state > STATE_EVERY_S:  # one state query serves every job
            last_state = time.monotonic()
            pending[0].done(force_check=True)
        pending = [j for j in pending if not j.done()]
        if pending:
            time.sleep(POLL_S)
    return jobs


class SlurmLauncher(_Sweep, submitit_launcher.SlurmLauncher):
    _EXECUTOR = "slurm"

    def launch(self, job_overrides, initial_job_idx):
        from submitit.slurm import slurm

        watcher = state_watcher()
        if not isinstance(slurm.SlurmJob.watcher, watcher):
            slurm.SlurmJob.watcher = watcher(delay_s=STATE_EVERY_S)
        return super().launch(job_overrides, initial_job_idx)


class LocalLauncher(_Sweep, submitit_launcher.LocalLauncher):
    _EXECUTOR = "local"


def state_watcher() -> type:
    """submitit's SLURM job watcher, asking ``scontrol`` when ``sacct`` cannot answer (a
    cluster without slurmdbd); a job SLURM no longer knows counts as ended (:data:`GONE`)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class StateWatcher(SlurmInfoWatcher):
        def update(self) -> None:
            ids = sorted({x.split("_")[0] for x in self._registered - self._finished})
            if not ids:
                return
            self._num_calls += 1
            try:
                command = self._make_command()
                run = subprocess.run(command, capture_output=True, check=True, timeout=60)
                info = self.read_info(run.stdout)
            except (OSError, subprocess.SubprocessError):
                info = {}
            if not info:  # no accounting (or nothing recorded yet): the controller's view
                info = scontrol_states(ids, self._registered - self._finished)
            self._info_dict.update(info)
            self._last_status_check = time.time()
            for job_id in self._registered - self._finished:
                if self.is_done(job_id, mode="cache"):
                    self._finished.add(job_id)

    return StateWatcher


def scontrol_states(ids: list[str], registered: set[str]) -> dict[str, dict[str, str]]:
    """{job id (``main`` or ``main_task``): {"State": ...}} from ``scontrol show job``; the
    registered ids of a job the controller no longer knows get :data:`GONE`."""
    out: dict[str, dict[str, str]] = {}
    for main in ids:
        run = subprocess.run(
            ["scontrol", "show", "job", "-o", main], capture_output=True, text=True, timeout=60
        )
        if run.returncode != 0:
            if "Invalid job id" in run.stderr:
                for job_id in registered:
                    if job_id.split("_")[0] == main:
                        out[job_id] = {"State": GONE}
            continue
        for line in run.stdout.splitlines():
            fields = dict(p.split("=", 1) for p in line.split() if "=" in p)
            state = fields.get("JobState", "UNKNOWN")
            task = fields.get("ArrayTaskId")
            key = f"{fields.get('ArrayJobId')}_{task}" if task and task.isdigit() else main
            out[key] = {"State": state, "NodeList": fields.get("NodeList", "")}
    return out
