"""The command line, as users run it: single runs, sweeps, and config mistakes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import ROOT, run_module


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_module(*args, cwd=cwd)


def test_single_run_writes_results_and_ends_with_its_summary(tmp_path) -> None:
    out = cli(
        "experiment=tiny_smoke", "strategy=topk", "sparsity=0.7", "logger=wandb", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (results,) = tmp_path.glob("outputs/runs/*_topk_s0.7/results.json")
    payload = json.loads(results.read_text())
    assert payload["status"] == "ok"
    assert abs(payload["site_sparsity"] - 0.7) <= 0.01
    # the console ends with the point, its numbers, and where they went
    summary = out.stdout[out.stdout.index("moyu_exp: strategy topk") :]
    assert "sparsity 0.7 on tiny_llama: ok" in summary
    assert f"model-level {payload['achieved_sparsity']:.3f}" in summary
    assert "|embedded|" in summary and "word_perplexity" in summary  # lm-eval's own table
    assert f"KL(dense || sparse) {payload['eval']['fidelity']['kl']:.4f}" in summary
    assert "simulated:" in summary and "tokens/s decode" in summary
    assert "eval " in summary and "bench " in summary  # the wall time of each phase
    assert str(results.resolve()) in summary or str(results) in summary
    assert "wandb sync " in summary and "offline-run-" in summary


def test_a_default_run_prints_no_warning_of_its_own_definitions(tmp_path) -> None:
    """lm-eval warns about tasks that leave aggregation or direction undeclared, or read a
    custom dataset; the embedded task does neither, and library chatter stays in the log."""
    out = cli("experiment=tiny_smoke", "logger=none", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    console = out.stdout + out.stderr
    for noise in ("is defined, but", "Custom kwargs", "WARNING", "INFO"):
        assert noise not in console, noise
    (log_file,) = tmp_path.glob("outputs/runs/*/moyu_exp.log")
    assert "lm_eval" in log_file.read_text()  # the chatter is kept in the run's log file


def test_a_failed_run_ends_with_its_one_line_error(tmp_path, monkeypatch) -> None:
    out = cli("experiment=tiny_smoke", "logger=none", "model.dtype=float16", "model.device=cuda:7",
              cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("moyu_exp: error: model.device=")
    assert "moyu_exp: strategy" not in out.stdout


def test_multirun_runs_every_point_and_loads_the_model_once(tmp_path) -> None:
    out = cli(
        "-m",
        "experiment=tiny_smoke",
        "eval=none",
        "resume=false",
        "strategy=dense,topk",
        "sparsity=0.5,0.7",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    payloads = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/results.json")]
    points = sorted((p["strategy"], p["sparsity"]) for p in payloads)
    assert points == [("dense", 0.5), ("dense", 0.7), ("topk", 0.5), ("topk", 0.7)]
    assert all(p["status"] == "ok" for p in payloads)
    assert {p["model"]["loads_in_process"] for p in payloads} == {1}


def test_a_config_mistake_is_one_line_without_traceback(tmp_path) -> None:
    out = cli("experiment=tiny_smoke", "sparsity=1.5", cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    message = "moyu_exp: error: sparsity=1.5 is out of range: accepted values are 0 <= sparsity < 1"
    assert out.stderr.strip().splitlines()[-1] == message
    (results,) = tmp_path.rglob("results.json")
    saved = json.loads(results.read_text())
    assert saved["status"] == "failed" and "sparsity=1.5 is out of range" in saved["error"]
