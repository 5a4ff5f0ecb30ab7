"""Whole runs on tiny_llama: results.json schema, failures, W&B offline and none."""

from __future__ import annotations

import json

import pytest

from moyu_exp import models, results, runner
from moyu_exp.errors import ConfigError
from tests import wandb_records
from tests.conftest import TINY, compose_config

REQUIRED = {
    "schema": int,
    "status": str,
    "strategy": str,
    "sparsity": float,
    "achieved_sparsity": float,
    "eval": dict,
    "bench": dict,
    "config": dict,
    "env": dict,
}


def test_results_json_schema(tmp_path) -> None:
    cfg = compose_config(*TINY, "strategy=topk", "sparsity=0.7")
    payload = runner.run(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(payload, default=str))
    for key, kind in REQUIRED.items():
        assert isinstance(saved[key], kind), key
    assert saved["schema"] == results.SCHEMA and saved["status"] == "ok" and saved["error"] is None
    assert saved["strategy"] == "topk" and saved["sparsity"] == 0.7
    assert saved["site_sparsity"] == pytest.approx(1 - 48 / 160)
    # model-level: a dropped neuron skips one down column of the 2 x 43,008 block weights
    assert saved["achieved_sparsity"] == pytest.approx((160 - 48) * 64 / 43008)
    assert saved["config"]["strategy"]["sparsity"] == 0.7  # resolved, not "${sparsity}"
    assert {"embedded", "fidelity"} == set(saved["eval"])
    bench = saved["bench"]
    assert (
        bench["mode"] == "simulated"
        and bench["decode_tokens_per_s"] > 0
        and bench["prefill_ms"] > 0
    )
    assert bench["peak_memory_mb"] > 0
    assert set(saved["env"]["packages"]) >= {"torch", "transformers", "lm_eval"}
    assert not list(tmp_path.glob(".*.tmp"))
    # the deterministic speed axis, from the sets kept during the evaluation
    phase = saved["sparsity_detail"]["eval"]
    assert saved["ideal_speedup"] == phase["ideal_speedup"] > 1
    assert saved["weight_bytes_per_token"] < phase["dense_weight_bytes_per_token"]
    assert set(saved["sparsity_detail"]) == {"eval", "bench"}
    # directions as lm-eval declares them
    assert saved["eval_details"]["embedded"]["higher_is_better"]["word_perplexity"] is False
    assert saved["eval_details"]["fidelity"]["higher_is_better"] == {
        "kl": False,
        "top1_agreement": True,
    }
    assert results.read(tmp_path / "results.json") == saved


def test_results_are_checked_against_their_schema_when_written_and_read(tmp_path) -> None:
    payload = results.build(status="ok", config={}, bench={"speedup": "fast"})
    with pytest.raises(results.InvalidResults, match=r"results\.bench\.speedup should be float"):
        results.write(tmp_path, payload)
    assert not (tmp_path / "results.json").exists()
    good = results.build(status="ok", config={}, timings={"eval_s": 1.0})
    results.write(tmp_path, good)
    broken = {**json.loads((tmp_path / "results.json").read_text()), "timings": {"eval_s": "1"}}
    (tmp_path / "results.json").write_text(json.dumps(broken))
    with pytest.raises(results.InvalidResults, match=r"results\.timings\.eval_s should be float"):
        results.read(tmp_path / "results.json")


def test_eval_and_bench_can_be_turned_off_but_not_both(tmp_path) -> None:
    payload = runner.run(compose_config(*TINY, "eval=none"), tmp_path / "a")
    assert payload["eval"] == {} and payload["bench"]["decode_tokens_per_s"] > 0
    payload = runner.run(compose_config(*TINY, "bench=none"), tmp_path / "b")
    assert payload["bench"] == {} and payload["eval"]["embedded"]
    with pytest.raises(ConfigError, match="this run would measure nothing"):
        runner.run(compose_config(*TINY, "eval=none", "bench=none"), tmp_path / "c")
    saved = json.loads((tmp_path / "c" / "results.json").read_text())
    assert saved["status"] == "failed"


def test_a_failing_run_writes_status_failed(tmp_path, monkeypatch) -> None:
    def broken(*_args, **_kwargs):
        raise RuntimeError("bench exploded")

    from moyu_exp import bench

    monkeypatch.setattr(bench, "run", broken)
    with pytest.raises(RuntimeError, match="bench exploded"):
        runner.run(compose_config(*TINY), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "failed"
    assert saved["error"] == "RuntimeError: bench exploded"
    assert "eval_s" in saved["timings"]


def test_wandb_offline_run_is_written_and_finished(tmp_path) -> None:
    cfg = compose_config(*TINY, "logger=wandb", "strategy=topk", "sparsity=0.5")
    runner.run(cfg, tmp_path, group="pytest")
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    kinds = wandb_records.record_types(run_file)
    assert "run" in kinds and kinds[-1] == "exit"  # started and finished
    run = next(r.run for r in wandb_records.records(run_file) if r.HasField("run"))
    assert run.display_name == "topk-s0.5" and run.run_group == "pytest"
    assert set(run.tags) == {"topk", "tiny_llama"}
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["sparsity"] == 0.5 and config["strategy"]["sparsity"] == 0.5  # resolved
    summary = wandb_records.summary(run_file)
    assert summary["site_sparsity"] == pytest.approx(0.5)
    assert summary["eval/fidelity/top1_agreement"] > 0
    assert summary["status"] == "ok"


def test_a_failing_wandb_run_is_finished_without_a_traceback(tmp_path, monkeypatch, capfd) -> None:
    """The CLI reports a failure in one line; W&B's own `with run:` would print its traceback."""
    from moyu_exp import bench

    def broken(*_args, **_kwargs):
        raise RuntimeError("bench exploded")

    monkeypatch.setattr(bench, "run", broken)
    with pytest.raises(RuntimeError, match="bench exploded"):
        runner.run(compose_config(*TINY, "logger=wandb", "eval=none"), tmp_path)
    assert "Traceback" not in capfd.readouterr().err
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    exits = [r.exit for r in wandb_records.records(run_file) if r.HasField("exit")]
    assert len(exits) == 1 and exits[0].exit_code == 1  # finished, as failed
    assert wandb_records.summary(run_file)["status"] == "failed"


def test_logger_none_writes_no_wandb_files(tmp_path) -> None:
    runner.run(compose_config(*TINY, "logger=none"), tmp_path)
    assert not (tmp_path / "wandb").exists()


def test_the_model_is_loaded_once_per_process(tmp_path) -> None:
    cfg = compose_config(*TINY, "eval=none")
    first = models.load(cfg.model)
    runner.run(cfg, tmp_path / "a")
    runner.run(compose_config(*TINY, "eval=none", "strategy=dense"), tmp_path / "b")
    assert models.load(cfg.model) is first
