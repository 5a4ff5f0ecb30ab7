"""The trinity sweep (``+sweep=trinity``) and its report: crossings, the corners a method fails,
and the whole path on two tiny models (speed pass, crossings, evaluation pass, report, resume),
checked against numbers recomputed here from the points' own results.json."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from moyu_exp import report, sweep, trinity
from moyu_exp.strategies import STRATEGIES
from moyu_exp.trinity import Cell, Trinity, crossing
from tests.conftest import ROOT, require_data
from tests.wandb_records import records


# --------------------------------------------------------------------------- crossings
def test_a_crossing_is_read_linearly_from_the_dense_model_on() -> None:
    curve = [(0.5, 1.3), (0.3, 1.1), (0.7, 1.6)]  # any order
    assert crossing(curve, 1.2) == pytest.approx(0.4)
    assert crossing(curve, 1.05) == pytest.approx(0.15)  # between dense (0, 1x) and 0.3
    assert crossing(curve, 1.6) == pytest.approx(0.7)
    assert crossing(curve, 1.61) is None


def test_a_noisy_curve_crosses_where_it_first_reaches_the_level() -> None:
    curve = [(0.3, 1.25), (0.5, 1.15), (0.7, 1.4)]
    assert crossing(curve, 1.2) == pytest.approx(0.24)
    assert crossing(curve, 1.3) == pytest.approx(0.62)


def test_a_method_whose_sparsity_only_switches_it_on_is_evaluated_at_its_one_point() -> None:
    assert trinity.is_switch(["k", "k", "k"]) and not trinity.is_switch(["k", "j"])
    assert not trinity.is_switch(["k"])  # one grid value cannot tell
    one = [(0.3, 1.25), (0.5, 1.25), (0.7, 1.25)]  # CETT: the same point at every sparsity
    assert crossing(one, 1.2, switch=True) == 0.3  # no interpolation from dense
    assert crossing(one, 1.3, switch=True) is None
    cell = Cell(reach=1.1995, switch=True)
    t = _trinity({("cett", "a"): cell, ("cett", "b"): cell})
    assert trinity.fails(t, "cett", 1.2) == [
        "speed at its one operating point, its sparsity only switching it on "
        "(reaches a 1.1995x, b 1.1995x)"
    ]  # the digits that show 1.1995 is short of 1.2


# --------------------------------------------------------------------------- verdicts
def _trinity(cells: dict[tuple[str, str], Cell]) -> Trinity:
    models = ["a", "b"]
    methods = sorted({m for m, _ in cells})
    return Trinity(
        models, methods, [1.2], "speedup", 0.95, ["piqa"], {},
        {(method, 1.2, model): cell for (method, model), cell in cells.items()}, {},
    )  # fmt: skip


def reached(retention: float, se: float = 0.01) -> Cell:
    return Cell(sparsity=0.5, retention=retention, retention_se=se, speedup=1.2, ideal=1.3)


def test_each_corner_a_method_misses_is_named_with_its_numbers() -> None:
    t = _trinity(
        {
            ("all", "a"): reached(0.99), ("all", "b"): reached(0.97),
            ("slow", "a"): Cell(reach=1.15), ("slow", "b"): Cell(reach=1.1),
            ("lossy", "a"): reached(0.80, 0.02), ("lossy", "b"): reached(0.85, 0.02),
            ("narrow", "a"): reached(0.99), ("narrow", "b"): reached(0.85, 0.02),
            ("one_model", "a"): reached(0.99), ("one_model", "b"): Cell(reach=1.12),
            ("unsure", "a"): reached(0.93, 0.02), ("unsure", "b"): reached(0.99),
            ("pending", "a"): Cell(sparsity=0.4), ("pending", "b"): reached(0.99),
        }
    )  # fmt: skip
    assert trinity.fails(t, "all", 1.2) == [] and trinity.clearly_holds(t, "all", 1.2)
    assert trinity.fails(t, "slow", 1.2) == ["speed (reaches a 1.15x, b 1.10x)"]
    assert trinity.fails(t, "lossy", 1.2) == ["accuracy: a 0.800 ± 0.020, b 0.850 ± 0.020"]
    assert trinity.fails(t, "narrow", 1.2) == ["generality: b 0.850 ± 0.020"]
    assert trinity.fails(t, "one_model", 1.2) == ["generality: b does not reach 1.2x (1.12x)"]
    # 0.93 + 2 x 0.02 >= 0.95: not significantly below, yet not clearly above either
    assert trinity.fails(t, "unsure", 1.2) == [] and not trinity.clearly_holds(t, "unsure", 1.2)
    assert not trinity.evaluated(t, "pending", 1.2)
    assert trinity.spread(t, "narrow", 1.2) == (0.85, 0.99, "b")
    ranked = [m for m, _ in trinity.ranking(t, 1.2)]
    assert ranked[:2] == ["all", "unsure"] and "slow" not in ranked and "pending" not in ranked
    text = "\n".join(trinity.verdicts(t))
    assert "all holds all three corners" in text
    assert "unsure holds them within their errors" in text
    assert "Closest: all (worst model b, retention 0.970 ± 0.010)" in text
    assert "- pending: not evaluated yet" in text


def test_a_method_scored_mostly_dense_is_named_with_its_share_of_sparse_positions() -> None:
    few = Cell(sparsity=0.5, retention=0.99, retention_se=0.01, speedup=1.2, ideal=1.3,
               protocol="last_token", sparse_share=0.12)  # fmt: skip
    full = replace(few, protocol="sparse", sparse_share=1.0)
    t = _trinity({("griffin", "a"): few, ("griffin", "b"): replace(few, sparse_share=0.2),
                  ("cats", "a"): full, ("cats", "b"): full})  # fmt: skip
    t.provenance = dict.fromkeys(("measured", "commit", "machine"), "unknown")
    (head,) = [line for line in trinity.verdicts(t) if line.startswith("**At 1.2x**")]
    assert "cats, griffin hold all three corners" in head
    assert "(griffin 12%-20% (last_token))" in head and "cats 100%" not in head
    page = trinity.markdown(t, [])
    assert "| griffin | last_token | 12% | 20% |" in page
    assert "| cats | sparse | 100% | 100% |" in page
    assert trinity.share(t, "griffin", "b") == pytest.approx(0.2)


def test_a_paired_error_counts_only_the_items_where_sparse_and_dense_disagree() -> None:
    ids = list(range(10))
    dense = {"a": (ids, [1.0] * 10)}  # dense right everywhere: S - rD varies as S alone
    sparse = {"a": (ids, [1.0] * 7 + [0.0] * 3)}
    se = trinity.paired_se(sparse, dense, ["a"], 0.7)
    assert se == pytest.approx(np.std([1] * 7 + [0] * 3, ddof=1) / np.sqrt(10))
    assert trinity.paired_se(dense, dense, ["a"], 1.0) == 0.0  # the same answers: no error
    # two tasks, dense imperfect: the delta method on the suite means
    d = {"a": (ids, [1.0] * 8 + [0.0] * 2), "b": (ids[:4], [1.0, 0.0, 1.0, 1.0])}
    s_ = {"a": (ids, [1.0] * 6 + [0.0] * 4), "b": (ids[:4], [1.0, 0.0, 0.0, 1.0])}
    r = (0.6 + 0.5) / (0.8 + 0.75)
    da, db = (np.array(s_[k][1]) - r * np.array(d[k][1]) for k in ("a", "b"))
    expected = np.sqrt(da.var(ddof=1) / 10 + db.var(ddof=1) / 4) / 2 / ((0.8 + 0.75) / 2)
    assert trinity.paired_se(s_, d, ["a", "b"], r) == pytest.approx(expected)
    assert trinity.paired_se({"a": (ids[1:], [1.0] * 9)}, dense, ["a"], 1.0) is None  # other items
    assert trinity.paired_se({}, dense, ["a"], 1.0) is None  # not logged


# --------------------------------------------------------------------------- the preset
def test_the_preset_sweeps_every_method_with_a_kernel_path_but_the_predictor() -> None:
    """The predictor trains once per sparsity (six trainings a model): it is added by hand."""
    preset = yaml.safe_load((ROOT / "conf" / "sweep" / "trinity.yaml").read_text())
    swept = set(preset["hydra"]["sweeper"]["params"]["strategy"].split(","))
    kernel = {n for n, cls in STRATEGIES.items() if cls.kernel_support}
    assert swept == kernel - {"dense", "predictor"}
    assert preset["eval"]["limit"] >= 200 and len(preset["eval"]["tasks"]) == 4


def _moyu(*args: str, cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["MOYU_CACHE_DIR"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "moyu_exp", *args], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        (["sparsity=0.3,0.5"], "sparsity is chosen by the trinity sweep"),
        (["bench.mode=simulated"], "it needs bench.mode=kernel"),
        (["hydra.sweeper.levels=[0.9]"], "hydra.sweeper.levels=0.9 is out of range"),
    ],
)
def test_a_trinity_config_mistake_is_one_line(extra, message, tmp_path) -> None:
    out = _moyu("+sweep=trinity", "model=tiny_llama", "strategy=topk", *extra,
                f"hydra.sweep.dir={tmp_path / 'sweep'}", cache=tmp_path / "cache")  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]


# --------------------------------------------------------------------------- the whole path
LEVELS = [1.1, 1.3]
TINY = [
    "+sweep=trinity", "model=tiny_llama,tiny", "strategy=cats,cett,griffin,topk",
    "bench=quick", "bench.mode=simulated", "hydra.sweeper.axis=ideal_speedup",
    f"hydra.sweeper.levels=[{','.join(map(str, LEVELS))}]", "hydra.sweeper.grid=[0.3,0.9]",
    "eval.tasks=[piqa,arc_easy]", "eval.limit=8", "calibration.tokens=1024",
    "calibration.seq_len=128", "logger=none",
]  # fmt: skip


# the tests that read the sweep share one worker, so the sweep runs once (``--dist loadgroup``)
ONE_SWEEP = pytest.mark.xdist_group("trinity")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A trinity sweep on two tiny models, run once, then again from the cache."""
    data = require_data()
    root = tmp_path_factory.mktemp("trinity")
    args = [*TINY, f"data_dir={data}", f"hydra.sweep.dir={root / 'sweep'}"]
    first = _moyu(*args, f"hydra.sweeper.report_dir={root / 'docs'}", cache=root / "cache")
    assert first.returncode == 0, first.stderr[-3000:]
    written = (root / "sweep" / "trinity.csv").read_text()
    again = _moyu(*args, cache=root / "cache")
    assert again.returncode == 0, again.stderr[-3000:]
    return root, written


def _results(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*/results.json"))]


def _trinity_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@ONE_SWEEP
def test_each_method_is_evaluated_where_its_own_speed_curve_crosses_each_level(swept) -> None:
    root, _ = swept
    sweep_dir = root / "sweep"
    table = _trinity_rows(sweep_dir / "trinity.csv")
    rows = {(r["model"], r["method"], r["level"]): r for r in table}
    for model in ("tiny_llama", "tiny"):
        speed = _results(sweep_dir / model / "none")
        evaluated = {p["strategy"]: [] for p in speed}
        for p in _results(sweep_dir / model / "zeroshot"):
            evaluated.setdefault(p["strategy"], []).append(p)
        assert len(speed) == 4 * 2 and all(not p["eval"] for p in speed)  # 4 methods x the grid
        for method in ("cats", "cett", "griffin", "topk"):
            points = sorted((p["sparsity"], p["ideal_speedup"]) for p in speed
                            if p["strategy"] == method)  # fmt: skip
            xs, ys = [0.0, *(s for s, _ in points)], [1.0, *(v for _, v in points)]
            assert ys == sorted(ys)  # the ideal speedup grows with the sparsity: np.interp holds
            # CETT's sparsity only switches it on (strategy.target sets how much it skips): its
            # grid points are one point, and it is evaluated there or nowhere
            switch = method == "cett"
            assert (len(set(ys[1:])) == 1) == switch
            for level in LEVELS:
                row = rows[(model, method, str(level))]
                assert row["switch"] == str(int(switch))
                if level > ys[-1]:  # not reached: no evaluation, the curve's reach reported
                    assert row["sparsity"] == "" and float(row["reach"]) == pytest.approx(ys[-1])
                    fastest = max((p for p in speed if p["strategy"] == method),
                                  key=lambda p: (p["ideal_speedup"], p["sparsity"]))  # fmt: skip
                    ideal = fastest["sparsity_detail"]["bench"]["ideal_speedup"]
                    assert float(row["ideal_speedup"]) == pytest.approx(ideal)  # beside it
                    continue
                expected = xs[1] if switch else round(float(np.interp(level, ys, xs)), 3)
                assert float(row["sparsity"]) == pytest.approx(expected)
                (point,) = [p for p in evaluated[method] if p["sparsity"] == expected]
                assert set(point["eval"]) == {"piqa", "arc_easy"}
                bench_ideal = point["sparsity_detail"]["bench"]["ideal_speedup"]  # beside its speed
                assert float(row["ideal_speedup"]) == pytest.approx(bench_ideal)
                assert float(row["retention"]) == pytest.approx(
                    _suite(point) / _suite(evaluated["dense"][0])
                )
                assert row["se_kind"] == "paired"
                assert float(row["retention_se"]) == pytest.approx(
                    _paired_se(point, evaluated["dense"][0])
                )
                shares = [d["sparse_scored_fraction"] for d in point["eval_details"].values()]
                assert float(row["sparse_share"]) == pytest.approx(np.mean(shares))
                assert row["protocol"] == point["config"]["strategy"]["prefill"]
    assert rows[("tiny", "topk", "1.3")]["sparsity"] == ""  # a third of the MLP at most
    assert rows[("tiny", "griffin", "1.3")]["sparsity"] != ""


def _items(payload: dict, task: str) -> np.ndarray:
    """A task's per-item headline scores; they are the items its reported accuracy averages."""
    name = "acc_norm" if "acc_norm" in payload["eval"][task] else "acc"
    logged = payload["eval_details"][task]["items"]
    assert logged["doc_id"] == list(range(len(logged["doc_id"])))  # eval.limit: the first items
    scores = np.array(logged[name], dtype=float)
    assert scores.mean() == pytest.approx(payload["eval"][task][name])
    return scores


def _paired_se(point: dict, dense: dict) -> float:
    """The delta-method error of retention, recomputed from the two points' items."""
    tasks = sorted(point["eval"])
    s, d = ([_items(p, t) for t in tasks] for p in (point, dense))
    r = np.mean([x.mean() for x in s]) / np.mean([x.mean() for x in d])
    var = sum((a - r * b).var(ddof=1) / len(a) for a, b in zip(s, d, strict=True))
    return float(np.sqrt(var) / len(tasks) / np.mean([x.mean() for x in d]))


def _suite(payload: dict) -> float:
    """The mean over tasks of acc_norm (where reported) or acc, recomputed here."""
    values = [m.get("acc_norm", m["acc"]) for m in payload["eval"].values()]
    return sum(values) / len(values)


@ONE_SWEEP
def test_the_report_names_the_unreached_level_and_is_written_where_asked(swept) -> None:
    root, written = swept
    page = (root / "docs" / "trinity.md").read_text()
    first = page.split("\n")[0]  # the sweep's command, as given
    assert first.startswith("`python -m moyu_exp +sweep=trinity") and "report_dir=" in first
    assert all(f" {a}" in first for a in TINY[1:])
    assert "`python -m moyu_exp.report --trinity" in page
    assert "### 1.1x" in page and "### 1.3x" in page
    tasks = page.split("### Per task")[1]  # each evaluated (method, level) with every task
    assert tasks.count("| dense | - |") == 2 and tasks.count("| griffin | 1.3x |") == 2
    assert "- topk fails speed (reaches tiny 1.22x, tiny_llama 1.22x)" in page
    for name in ("trinity.md", "trinity.csv", "trinity.png"):
        assert (root / "docs" / name).stat().st_size > 0
    assert (root / "docs" / "trinity.csv").read_text() == written


@ONE_SWEEP
def test_a_rerun_serves_every_point_from_the_cache_and_writes_the_same_report(swept) -> None:
    root, written = swept
    points = list((root / "sweep").glob("*/*/*/results.json"))
    assert len(points) == 2 * (4 * 2 + 1 + 6)  # per model: speed pass, dense, 6 crossings
    assert all(json.loads(p.read_text()).get("resumed_from") for p in points)
    assert (root / "sweep" / "trinity.csv").read_text() == written


@ONE_SWEEP
def test_the_report_command_rebuilds_the_sweeps_report(swept, tmp_path, capsys) -> None:
    root, written = swept
    levels = [str(v) for v in LEVELS]
    argv = [str(root / "sweep"), "--trinity", "--levels", *levels, "--axis", "ideal_speedup"]
    assert report.main([*argv, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "trinity.csv").read_text() == written
    assert "Closest:" in capsys.readouterr().out


@ONE_SWEEP
def test_the_aggregate_wandb_run_carries_the_trinity_table_and_figure(swept, tmp_path) -> None:
    from omegaconf import OmegaConf

    root, _ = swept
    files = [root / "docs" / name for name in ("trinity.csv", "trinity.png")]
    logger = OmegaConf.create(
        {"name": "wandb", "mode": "offline", "project": "t", "entity": None, "group": "tri"}
    )
    table, better = report.summarize([root / "sweep"], tmp_path)
    sweep.log_aggregate(table, better, logger, tmp_path, files)
    (run,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    logged = {
        item.nested_key[0]: json.loads(item.value_json)
        for r in records(run)
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
        if item.nested_key and item.nested_key[-1] == "_type"
    }  # what each logged key holds: {"trinity/table": "table-file", ...}
    assert logged["trinity/table"] == "table-file" and logged["trinity/figure"] == "image-file"
