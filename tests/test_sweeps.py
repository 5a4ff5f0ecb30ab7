"""Sweeps as users run them: presets, aggregation, resume, kill -9, failures, launchers, search."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moyu_exp import report, sweep
from tests.conftest import ROOT, run_module
from tests.wandb_records import records

SMALL = [
    "model=tiny_llama",
    "bench=quick",
    "logger=none",
    "eval.fidelity=false",
    "hydra.mode=MULTIRUN",
]


def moyu(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_module(*args, cwd=cwd, timeout=timeout)


def summary(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_quick_preset_aggregates_and_a_rerun_skips_every_point(tmp_path) -> None:
    sweep_dir = tmp_path / "quick"
    first = moyu("+sweep=quick", f"hydra.sweep.dir={sweep_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    rows = summary(sweep_dir)
    assert len(rows) >= 4 and {r["status"] for r in rows} == {"ok"}
    assert {"embedded/word_perplexity", "fidelity/kl", "decode_tokens_per_s"} <= set(rows[0])
    for image in ("tradeoff.png", "pareto.png"):
        assert (sweep_dir / image).read_bytes()[:4] == b"\x89PNG"
    # the sweep ends with its comparison table and the paths of what it wrote
    console = first.stdout + first.stderr
    assert "sweep summary" in console and "griffin" in console
    assert f"wrote {sweep_dir}/summary.csv, tradeoff.png, pareto.png" in console

    # the rerun costs almost nothing: it restores every point without even importing torch
    # (PYTHONPROFILEIMPORTTIME lists every module imported, on stderr)
    env = {"PYTHONPROFILEIMPORTTIME": "1"}
    again = run_module("+sweep=quick", f"hydra.sweep.dir={sweep_dir}", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in again.stderr.splitlines()}
    assert "hydra" in imported
    assert not [name for name in imported if name.split(".")[0] in ("torch", "transformers")]
    payloads = [json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")]
    assert all(p.get("resumed_from") for p in payloads)
    assert summary(sweep_dir) == rows


def test_a_sweep_killed_mid_point_resumes_without_duplicates(tmp_path) -> None:
    sweep_dir = tmp_path / "killed"
    axes = ["strategy=dense,topk,cats"]  # five of the preset's points: enough to kill one
    args = [sys.executable, "-m", "moyu_exp", "+sweep=quick", *axes, f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300

        def inside_a_later_point() -> bool:
            """Two points finished and a third started (its run dir, no results yet)."""
            started = [p for p in sweep_dir.glob("*_*") if (p / ".hydra").is_dir()]
            done = [p for p in started if (p / "results.json").is_file()]
            return len(done) >= 2 and len(started) > len(done)

        while not inside_a_later_point() and proc.poll() is None:
            assert time.monotonic() < deadline, "no later point started"
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for path in sweep_dir.glob("*/results.json"):
        assert json.loads(path.read_text())["status"] == "ok"  # whole files only
    assert not (sweep_dir / "summary.csv").exists()

    rerun = moyu("+sweep=quick", *axes, f"hydra.sweep.dir={sweep_dir}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rows = summary(sweep_dir)
    keys = [r["point_key"] for r in rows]
    assert len(keys) == len(set(keys)) == 5
    assert {r["status"] for r in rows} == {"ok"}
    assert not list(sweep_dir.rglob("*.tmp"))


def test_a_failed_point_is_recorded_and_the_sweep_goes_on(tmp_path) -> None:
    sweep_dir = tmp_path / "failing"
    out = moyu(
        *SMALL,
        "eval=none",
        "strategy=topk",
        "strategy.layers=[0],[7]",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert out.returncode == 1
    assert "1 sweep point(s) failed" in out.stderr
    rows = {r["label"]: r for r in summary(sweep_dir)}
    assert rows["topk (layers=0)"]["status"] == "ok"
    failed = rows["topk (layers=7)"]
    assert failed["status"] == "failed"
    assert failed["error"] == "ConfigError: layers [7] out of range: the model has 2 layers (0..1)"


def test_failed_points_run_again_and_finished_ones_do_not(tmp_path) -> None:
    sweep_dir = tmp_path / "retry"
    args = [
        *SMALL,
        "eval=none",
        "strategy=topk",
        "strategy.layers=[0],[7]",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    moyu(*args)
    moyu(*args)
    payloads = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")}
    states = sorted((bool(p.get("resumed_from")), p["status"]) for p in payloads.values())
    assert states == [(False, "failed"), (True, "ok")]


SAME_COLUMNS = ["label", "sparsity", "achieved_sparsity", "embedded/word_perplexity", "status"]


_BASIC_ROWS: list[dict[str, str]] = []  # the basic launcher's rows, swept once for both launchers


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_launchers_give_the_basic_launchers_rows(launcher, tmp_path) -> None:
    common = [*SMALL, "strategy=dense,topk,cats", "sparsity=0.4", "resume=false"]

    def view(rows):
        return [{c: r[c] for c in SAME_COLUMNS} for r in rows]

    if not _BASIC_ROWS:
        basic = moyu(*common, f"hydra.sweep.dir={tmp_path / 'basic'}")
        assert basic.returncode == 0, basic.stderr[-3000:]
        _BASIC_ROWS.extend(view(summary(tmp_path / "basic")))
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    other = moyu(
        *common, f"hydra/launcher={launcher}", *extra, f"hydra.sweep.dir={tmp_path / launcher}"
    )
    assert other.returncode == 0, other.stderr[-3000:]
    assert view(summary(tmp_path / launcher)) == _BASIC_ROWS


def test_the_sweep_is_logged_to_wandb_as_one_group_and_an_aggregate_run(tmp_path) -> None:
    sweep_dir = tmp_path / "logged"
    out = moyu(
        *[a for a in SMALL if a != "logger=none"],
        "logger=wandb",
        "strategy=dense,topk",
        "sparsity=0.5",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = {}
    for path in sweep_dir.glob("**/wandb/offline-run-*/run-*.wandb"):
        run = next(r.run for r in records(path) if r.HasField("run"))
        runs[run.display_name] = (run.run_group, run.job_type, path)
    assert set(runs) == {"dense-s0.5", "topk-s0.5", "logged-summary"}
    assert {group for group, _, _ in runs.values()} == {"logged"}
    kinds = [r.WhichOneof("record_type") for r in records(runs["logged-summary"][2])]
    assert "history" in kinds and kinds[-1] == "exit"
    logged = {
        item.key or item.nested_key[0]
        for r in records(runs["logged-summary"][2])
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
    }
    # quality against the bytes-bound ideal speedup of every point, with its frontier
    assert {"pareto/ideal_speedup_table", "frontier/ideal_speedup_table"} <= logged, logged


def test_report_compares_runs_across_sweeps(tmp_path) -> None:
    for name, extra in (
        ("a", ["strategy=dense,topk"]),
        ("b", ["strategy=cats", "bench.mode=kernel"]),
    ):
        moyu(*SMALL, *extra, "sparsity=0.5", f"hydra.sweep.dir={tmp_path / name}")
    out = run_module(
        str(tmp_path / "a"),
        str(tmp_path / "b"),
        "--out",
        str(tmp_path / "both"),
        module="moyu_exp.report",
    )
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()[2:5]] == ["cats", "dense", "topk"]
    rows = {r["label"]: r for r in summary(tmp_path / "both")}
    assert len(rows) == 3
    assert (tmp_path / "both" / "tradeoff.png").is_file()
    # every point has its bytes-bound ideal; only the kernel-mode point a measured speedup
    assert float(rows["cats"]["ideal_speedup"]) > 1 and float(rows["topk"]["ideal_speedup"]) > 1
    assert float(rows["dense"]["ideal_speedup"]) == 1
    assert float(rows["cats"]["speedup"]) > 0 and rows["topk"]["speedup"] == ""
    assert (tmp_path / "both" / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_report_rejects_a_missing_folder(tmp_path) -> None:
    assert report.main([str(tmp_path / "nope")]) == 2


def test_optuna_search_maximises_sparsity_within_budget(tmp_path) -> None:
    """The best trial is the sparsest one within the budget: a budget small enough that the
    tiny model's trials fall on both sides of it (top-1 1.0 and 0.9993 here), so a search that
    ignored it would pick another trial."""
    sweep_dir = tmp_path / "search"
    budget = 0.0005
    out = moyu(
        "+sweep=search",
        "model=tiny_llama",
        "logger=none",
        "strategy=topk",
        f"search.budget={budget}",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    trials = [r for r in rows if r["strategy"] == "topk"]
    assert len(trials) == 3
    # the objective recomputed from the points' own numbers: achieved sparsity when top-1
    # agreement stays within the budget of dense (1.0), that minus 1 otherwise; the best is the max
    within = {
        float(r["sparsity"]): float(r["fidelity/top1_agreement"]) >= 1.0 - budget for r in trials
    }
    assert 0 < sum(within.values()) < len(trials)  # the budget decides between the trials
    scores = {
        float(r["sparsity"]): float(r["achieved_sparsity"])
        - (0.0 if within[float(r["sparsity"])] else 1.0)
        for r in trials
    }
    top = max(scores, key=scores.get)
    assert top != max(scores)  # the sparsest trial broke the budget: it is not the best
    assert best.best_value == pytest.approx(scores[top])
    assert best.best_params.sparsity == pytest.approx(top)


def test_parallel_jobs_spread_over_gpus(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    basic = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    assert [sweep.job_device("auto", n, joblib) for n in range(5)] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:3",
        "cuda:0",
    ]
    assert sweep.job_device("auto", 3, basic) == "auto"
    assert sweep.job_device("cpu", 3, joblib) == "cpu"


def test_pareto_frontier_keeps_only_points_nothing_beats() -> None:
    from moyu_exp.plots import frontier

    points = [(60.0, 50.0), (80.0, 55.0), (90.0, 70.0), (100.0, 300.0), (110.0, 200.0)]
    # (90, 70) is kept: nothing faster is better; (100, 300) is beaten by the faster (110, 200)
    assert frontier(points, lower_is_better=True) == [
        (110.0, 200.0),
        (90.0, 70.0),
        (80.0, 55.0),
        (60.0, 50.0),
    ]
    assert frontier([(1.0, 0.5), (2.0, 0.6)], lower_is_better=False) == [(2.0, 0.6)]


def test_a_panel_of_many_methods_gives_each_line_its_own_colour() -> None:
    import matplotlib.pyplot as plt

    from moyu_exp.plots import _pareto_panel

    table = [
        {"label": f"m{i}", "status": "ok", "sparsity": s, "speedup": 1 + s, "fidelity/kl": s + i}
        for i in range(12)
        for s in (0.3, 0.5)
    ]
    fig, ax = plt.subplots()
    _pareto_panel(ax, table, "fidelity/kl", "speedup", {"fidelity/kl": False})
    colours = [line.get_color() for line in ax.get_lines() if line.get_label().startswith("m")]
    plt.close(fig)
    assert len(colours) == 12 and len(set(colours)) == 12


def test_editing_the_package_code_changes_every_point_key(tmp_path, monkeypatch) -> None:
    from moyu_exp import points

    package = tmp_path / "moyu_exp"
    (package / "strategies").mkdir(parents=True)
    (package / "points.py").write_text("# points\n")
    (package / "strategies" / "topk.py").write_text("K = 1\n")
    monkeypatch.setattr(points, "__file__", str(package / "points.py"))
    points._version.cache_clear()
    before = points.point_key({"sparsity": 0.5})
    (package / "strategies" / "topk.py").write_text("K = 2\n")
    points._version.cache_clear()
    try:
        assert points.point_key({"sparsity": 0.5}) != before
    finally:
        points._version.cache_clear()


def test_editing_a_report_keeps_every_point_key(tmp_path, monkeypatch) -> None:
    """The modules that only read finished points are not part of the code a key hashes (an
    import-linter contract keeps every module a point runs from importing them)."""
    from moyu_exp import points

    package = tmp_path / "moyu_exp"
    package.mkdir()
    (package / "points.py").write_text("# points\n")
    for name in points.REPORTING:
        (package / name).write_text("A = 1\n")
    monkeypatch.setattr(points, "__file__", str(package / "points.py"))
    points._version.cache_clear()
    before = points.point_key({"sparsity": 0.5})
    try:
        for name in points.REPORTING:
            (package / name).write_text("A = 2\n")
            points._version.cache_clear()
            assert points.point_key({"sparsity": 0.5}) == before, name
        (package / "points.py").write_text("# points, edited\n")
        points._version.cache_clear()
        assert points.point_key({"sparsity": 0.5}) != before
    finally:
        points._version.cache_clear()


def test_an_axis_on_the_command_line_replaces_the_presets(tmp_path) -> None:
    sweep_dir = tmp_path / "narrow"
    result = moyu("+sweep=quick", "strategy=dense", "sparsity=0.3", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(r["strategy"], r["sparsity"]) for r in summary(sweep_dir)] == [("dense", "0.3")]


def test_the_generality_preset_puts_each_method_on_every_model_side_by_side(tmp_path) -> None:
    sweep_dir = tmp_path / "generality"
    result = moyu(
        "-m",  # a config group's list on the command line needs it
        "+sweep=generality",
        "model=tiny_llama,tiny",  # two names for two random-init LLaMAs
        "strategy=dense,topk",
        "eval.tasks=[embedded]",
        "eval.limit=null",
        "bench=none",
        "logger=none",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = summary(sweep_dir)
    assert sorted(r["label"] for r in rows) == [
        "dense @ tiny",
        "dense @ tiny_llama",
        "topk @ tiny",
        "topk @ tiny_llama",
    ]
    table = (sweep_dir / "generality.txt").read_text().splitlines()
    assert "tiny: fidelity/kl" in table[0] and "tiny_llama: fidelity/kl" in table[0]
    assert [line.split()[0] for line in table[2:]] == ["dense", "topk"]
    assert (sweep_dir / "generality.png").read_bytes()[:4] == b"\x89PNG"


def test_frontier_reads_each_method_at_a_speedup_along_its_own_curve() -> None:
    def point(strategy, sparsity, speedup, kl, acc):
        return {
            "label": strategy,
            "strategy": strategy,
            "sparsity": sparsity,
            "status": "ok",
            "speedup": speedup,
            "fidelity/kl": kl,
            "piqa/acc": acc,
            "piqa/acc_stderr": 0.02,
        }

    table = [
        point("dense", 0.0, 1.0, 0.0, 0.66),
        point("a", 0.3, 1.2, 0.2, 0.64),
        point("a", 0.5, 1.6, 0.6, 0.60),
        point("b", 0.5, 1.1, 0.1, 0.65),
    ]
    rows = {r["method"]: r for r in report.at_speedups(table, [1.1, 1.4, 1.7])}
    assert set(rows) == {"a", "b"}
    assert rows["a"]["fidelity/kl @ 1.4x"] == pytest.approx(0.4)
    assert rows["a"]["piqa/acc @ 1.4x"] == pytest.approx(0.62)
    assert rows["a"]["fidelity/kl @ 1.1x"] == pytest.approx(0.1)  # from the dense anchor
    assert rows["a"]["fidelity/kl @ 1.7x"] is None  # beyond its fastest point: not reached
    assert rows["b"]["fidelity/kl @ 1.4x"] is None
    text = report.format_frontier(list(rows.values()), [1.4])
    assert "0.4000" in text and "0.620 +/- 0.020" in text


def test_matched_speed_pairs_the_evaluated_sets_with_the_measured_efficiency() -> None:
    def payload(strategy, eval_ideal, bench_speedup, bench_ideal):
        bench = {"speedup": bench_speedup, "ideal_speedup": bench_ideal}
        return {
            "status": "ok",
            "strategy": strategy,
            "sparsity": 0.5,
            "point_key": strategy,
            "ideal_speedup": eval_ideal,
            "eval": {"fidelity": {"kl": 0.3}},
            "bench": bench | {"efficiency": bench_speedup / bench_ideal},
        }

    # the bench prompt kept smaller sets (ideal 1.2x) than the evaluation scored (1.1x)
    table = report.rows([payload("tda", 1.1, 1.2, 1.2), payload("griffin", 1.3, 1.17, 1.3)])
    by = {r["strategy"]: r for r in table}
    assert by["tda"]["speedup"] == 1.2 and by["tda"]["ideal_speedup"] == 1.1
    assert by["tda"]["matched_speedup"] == pytest.approx(1.1)  # efficiency 1.0 x 1.1
    assert by["griffin"]["matched_speedup"] == pytest.approx(1.17)  # the same sets: measured
    at = report.at_speedups(table, [1.1], speed="matched_speedup")
    assert {r["method"]: r["fidelity/kl @ 1.1x"] for r in at}["tda"] == pytest.approx(0.3)
    assert "matched_speedup" in report.csv_bytes(table).decode().splitlines()[0]
