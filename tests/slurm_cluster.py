"""A one-node SLURM cluster, started and stopped by a test: munged with its own key and socket,
slurmctld and slurmd in the foreground, state, spool and logs in one folder, non-default ports.

Debian's ``slurmctld slurmd slurm-client munge`` (SLURM 22.05) are installed when missing and the
process runs as root (``.ci/run`` installs them beforehand). No accounting daemon: ``sacct``
fails, as on many small clusters. Every daemon is stopped by the process id this helper started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("slurmctld", "slurmd", "munged", "sbatch", "sinfo", "scontrol")


def available() -> str | None:
    """None when a cluster can be started here, else the reason it cannot."""
    if all(shutil.which(c) for c in COMMANDS):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "SLURM is not installed, and installing it needs root and apt-get"
    run = subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    if run.returncode != 0 or not all(shutil.which(c) for c in COMMANDS):
        return f"apt-get could not install {' '.join(PACKAGES)}: {run.stderr.strip()[-300:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OneNodeSlurm:
    """``start()`` brings the cluster up (the node idle), ``stop()`` takes it down; ``env`` is
    what a client (sbatch, submitit) needs to reach it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.processes: list[subprocess.Popen] = []
        self.env = {"SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        f = self.folder
        for sub in ("state", "spool"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        cpus = os.cpu_count() or 1
        self.conf.write_text(
            f"""ClusterName=moyutest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={f / "munge.socket"}
CredType=cred/munge
StateSaveLocation={f / "state"}
SlurmdSpoolDir={f / "spool"}
SlurmctldPidFile={f / "slurmctld.pid"}
SlurmdPidFile={f / "slurmd.pid"}
SlurmctldLogFile={f / "slurmctld.log"}
SlurmdLogFile={f / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
KillWait=5
MinJobAge=600
NodeName=localhost CPUs={cpus} RealMemory={memory - 1024} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _start(self, *command: str) -> None:
        log = open(self.folder / f"{Path(command[0]).name}.out", "ab")  # noqa: SIM115
        self.processes.append(
            subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        )

    def start(self, timeout: float = 60.0) -> OneNodeSlurm:
        f = self.folder
        f.mkdir(parents=True, exist_ok=True)
        key = f / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._start(
            "munged", "--foreground", "--force", f"--key-file={key}",
            f"--socket={f / 'munge.socket'}", f"--pid-file={f / 'munged.pid'}",
            f"--log-file={f / 'munged.log'}", f"--seed-file={f / 'munge.seed'}",
        )  # fmt: skip
        self._write_conf()
        self._wait(lambda: (f / "munge.socket").exists(), timeout, "munged")
        self._start("slurmctld", "-D", "-f", str(self.conf))
        self._start("slurmd", "-D", "-N", "localhost", "-f", str(self.conf))
        self._wait(self.idle, timeout, "the node")
        return self

    def idle(self) -> bool:
        run = self.run("sinfo", "-h", "-o", "%t")
        return run.returncode == 0 and run.stdout.strip() == "idle"

    def run(self, *command: str) -> subprocess.CompletedProcess:
        env = {**os.environ, **self.env}
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)

    def _wait(self, ready, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():
                return
            if any(p.poll() is not None for p in self.processes):
                break
            time.sleep(0.25)
        self.stop()
        logs = "".join(
            f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.folder.glob("*.log"))
        )
        raise RuntimeError(f"{what} did not come up in {timeout:.0f} s{logs}")

    def stop(self) -> None:
        """Stop every daemon this helper started (by its process id), then their groups."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)
        self.processes.clear()
