"""Sweeps on a real SLURM (one node, started by the test): the project's own ``slurm`` preset
gives the basic launcher's rows, resumes without resubmitting, turns a killed job into a failed
point while the others finish, and survives a requeue; the aggregate W&B run comes once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import slurm_cluster
from tests.conftest import ROOT
from tests.test_sweeps import SAME_COLUMNS, SMALL, summary
from tests.wandb_records import records

pytestmark = pytest.mark.xdist_group("slurm")  # one cluster, one worker

# the node's resources, not the preset's (a real partition sets its own: README)
FITS = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]


def require_slurm() -> None:
    """Skip where no cluster can be started; in CI (``MOYU_REQUIRE_SLURM``) fail instead."""
    reason = slurm_cluster.available()
    if reason is not None:
        if os.environ.get("MOYU_REQUIRE_SLURM"):
            pytest.fail(f"CI must run the SLURM tests: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_slurm()
    one = slurm_cluster.OneNodeSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield one
    one.stop()


def launch(cluster, *args: str, background: bool = False, env: dict | None = None):
    """``python -m moyu_exp`` as a user runs it against the cluster (SLURM_CONF set)."""
    env = (
        {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | cluster.env | (env or {})
    )
    command = [sys.executable, "-m", "moyu_exp", *args]
    if background:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def jobs(cluster) -> list[dict[str, str]]:
    """Every job the controller knows (finished ones stay listed for MinJobAge)."""
    out = cluster.run("scontrol", "show", "job", "-o").stdout
    return [
        dict(p.split("=", 1) for p in line.split() if "=" in p)
        for line in out.splitlines()
        if line.startswith("JobId=")
    ]


def running_task(cluster, array_task: int, timeout: float = 120) -> str:
    """``<array job>_<task>`` of an array task, once it runs (the array's main id alone names
    every task of it: scancel would cancel them all)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for job in jobs(cluster):
            if job.get("ArrayTaskId") == str(array_task) and job.get("JobState") == "RUNNING":
                return f"{job['ArrayJobId']}_{array_task}"
        time.sleep(0.5)
    raise AssertionError(f"array task {array_task} never ran: {jobs(cluster)}")


def release(cluster, job: str, timeout: float = 60) -> None:
    """Start a requeued job soon: SLURM holds one for two minutes (BeginTime) by default, so
    that slurmd has forgotten the revoked credential of its first launch. slurmd rejects a
    credential created no later than the revocation, in whole seconds (``cred->ctime <=
    j->revoked``): a launch in the same second as the requeue is killed ("Job credential
    revoked", seen once in CI), so the job starts two seconds on, not at once."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = cluster.run("scontrol", "show", "job", "-o", job).stdout
        if "JobState=PENDING" in state:
            time.sleep(2)
            now = cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
            assert now.returncode == 0, now.stderr
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job} was not requeued: {state}")


def test_a_slurm_sweep_gives_the_basic_rows_resumes_and_logs_one_aggregate(
    cluster, tmp_path
) -> None:
    common = [*[a for a in SMALL if a != "logger=none"], "strategy=dense,topk,cats"]
    common += ["sparsity=0.4", "logger=wandb"]
    own = {"MOYU_CACHE_DIR": str(tmp_path / "basic_cache")}  # its points are not the SLURM sweep's
    basic = launch(cluster, *common, f"hydra.sweep.dir={tmp_path / 'basic'}", env=own)
    assert basic.returncode == 0, basic.stderr[-3000:]
    sweep_dir = tmp_path / "slurm"
    before = len(jobs(cluster))
    out = launch(cluster, *common, *FITS, f"hydra.sweep.dir={sweep_dir}")
    assert out.returncode == 0, out.stderr[-3000:]

    def view(rows):
        return [{c: r[c] for c in SAME_COLUMNS} for r in rows]

    assert view(summary(sweep_dir)) == view(summary(tmp_path / "basic"))
    assert len(jobs(cluster)) == before + 3  # one array task per point
    for image in ("tradeoff.png", "pareto.png"):
        assert (sweep_dir / image).is_file()
    aggregates = [
        p
        for p in sweep_dir.glob("**/wandb/offline-run-*/run-*.wandb")
        if next(r.run for r in records(p) if r.HasField("run")).display_name == "slurm-summary"
    ]
    assert len(aggregates) == 1

    # a rerun submits nothing: every point is served from the point cache
    again = launch(cluster, *common, *FITS, f"hydra.sweep.dir={sweep_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(jobs(cluster)) == before + 3
    assert "3 point(s) already finished: served from the point cache" in again.stdout + again.stderr
    assert view(summary(sweep_dir)) == view(summary(tmp_path / "basic"))


def test_a_killed_job_is_a_failed_point_and_a_requeued_one_keeps_its_result(
    cluster, tmp_path
) -> None:
    """Three points: a short one; one requeued while it runs (scontrol requeue); one cancelled
    while it runs (scancel). The sweep ends (no hang), exit code 1, with the cancelled point
    failed and its reason, the others ok. The cancelled point times 150 decodes (about 30 s):
    submitit ignores the SIGTERM, so a point that ends within KillWait of the scancel (5 s) would
    write its result and count as ok (seen once in CI with a 6 s point)."""
    sweep_dir = tmp_path / "killed"
    points = ["bench.repeats=1,2,150", "bench.decode_tokens=400", "strategy=topk"]
    sweep = launch(
        cluster,
        *SMALL,
        *points,
        *FITS,
        "hydra.launcher.array_parallelism=2",
        f"hydra.sweep.dir={sweep_dir}",
        background=True,
    )
    try:
        requeued = running_task(cluster, 1)
        assert cluster.run("scontrol", "requeue", requeued).returncode == 0
        release(cluster, requeued)
        assert cluster.run("scancel", running_task(cluster, 2)).returncode == 0
        _, stderr = sweep.communicate(timeout=400)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 1, stderr[-3000:]
    assert "1 sweep point(s) failed" in stderr
    assert sorted(r["status"] for r in summary(sweep_dir)) == ["failed", "ok", "ok"]
    failed = next(json.loads(p.read_text()) for p in sweep_dir.glob("2_*/results.json"))
    assert failed["status"] == "failed"
    assert "ended without a result (SLURM state CANCELLED" in failed["error"]
    ok = json.loads(next(sweep_dir.glob("1_*/results.json")).read_text())
    assert ok["status"] == "ok" and ok["bench"]["repeats"] == 2
    task = requeued.split("_")
    (state,) = [j for j in jobs(cluster) if [j.get("ArrayJobId"), j.get("ArrayTaskId")] == task]
    assert int(state["Restarts"]) >= 1 and state["JobState"] == "COMPLETED"  # it ran twice


def test_the_preset_asks_for_no_partition_or_gpu_a_cluster_lacks(cluster) -> None:
    """The preset requests no partition and no GPU by default (SLURM's defaults; a real
    partition sets them on the command line), since a node without the GPU asked for refuses
    the job in one line."""
    import yaml

    preset = yaml.safe_load((ROOT / "conf" / "hydra" / "launcher" / "slurm.yaml").read_text())
    assert preset["partition"] is None and preset["gpus_per_node"] is None
    refused = cluster.run("sbatch", "--gpus-per-node=1", "--wrap", "true")
    assert refused.returncode != 0 and "generic resource" in refused.stderr.lower()


def test_the_cluster_helper_stops_what_it_started(tmp_path) -> None:
    require_slurm()
    one = slurm_cluster.OneNodeSlurm(Path(tmp_path / "c")).start()
    pids = [p.pid for p in one.processes]
    one.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
