"""Bad input, faults and safe defaults: one-line errors, no lost or half-written results."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from moyu_exp import cache, calibration, models, points, results, runner
from moyu_exp.config import build
from moyu_exp.errors import NonFiniteLogits, ResultsNotWritten
from tests.conftest import TINY, compose_config, run_module
from tests.test_sweeps import summary


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_module("model=tiny_llama", "logger=none", *args, cwd=cwd, env=env)


def assert_one_line_error(out, expected: str | tuple[str, ...], code: int = 2) -> None:
    assert out.returncode == code, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr
    assert lines[-1].startswith("moyu_exp: error: ")
    for fragment in (expected,) if isinstance(expected, str) else expected:
        assert fragment in lines[-1], lines[-1]


def no_ok_results(folder: Path) -> bool:
    return all(json.loads(p.read_text())["status"] != "ok" for p in folder.rglob("results.json"))


BAD_INPUT = {
    "unknown strategy": (["strategy=nope"], ("unknown strategy 'nope'", "accepted are cats,")),
    "unknown model": (
        ["model=nope"],
        ("unknown model 'nope'", "accepted are gemma3_270m, hf, smollm2_135m, tiny,"),
    ),
    "unknown eval": (
        ["eval=nope"],
        ("unknown eval 'nope'", "accepted are embedded, none, zeroshot"),
    ),
    "unknown bench": (
        ["bench=nope"],
        ("unknown bench 'nope'", "accepted are default, none, quick"),
    ),
    "unknown logger": (["logger=nope"], ("unknown logger 'nope'", "accepted are none, wandb")),
    "sparsity 1.0": (["sparsity=1.0"], "sparsity=1.0 is out of range: accepted values are 0 <="),
    "sparsity -0.1": (["sparsity=-0.1"], "sparsity=-0.1 is out of range"),
    "sparsity 1.5": (["sparsity=1.5"], "sparsity=1.5 is out of range"),
    "sparsity high": (["sparsity=high"], "sparsity: Value 'high' of type 'str' could not be"),
    "unknown protocol": (
        ["strategy.prefill=nope"],
        "strategy.prefill='nope' is unknown: accepted are sparse, dense, last_half,",
    ),
    "unknown key": (["spars=0.5"], "unknown key 'spars': see `python -m moyu_exp --cfg job`"),
    "unknown task": (
        ["eval=zeroshot", "eval.tasks=[piqaa]"],
        "unknown eval task 'piqaa': lm-eval has no such task (did you mean piqa",
    ),
    "missing data_dir": (
        ["eval=zeroshot", "eval.tasks=[piqa]", "data_dir=/no/such/folder"],
        "data_dir='/no/such/folder' does not exist",
    ),
    "site of another strategy": (
        ["strategy=cats", "strategy.sites=[mlp_input]"],
        "site 'mlp_input' does not apply to strategy cats: accepted sites are gate_act",
    ),
    "unknown site": (["strategy.sites=[mlp_nowhere]"], "unknown site 'mlp_nowhere'"),
    "layers out of range": (
        ["strategy.layers=[0,9]"],
        "layers [9] out of range: the model has 2 layers (0..1)",
    ),
    "bad layer slice": (["strategy.layers=a:b"], "layers='a:b' is not a slice"),
    "unknown dtype": (["model.dtype=float64"], "model.dtype: Invalid value 'float64', expected"),
    "nonexistent model path": (
        ["model=hf", "model.path=/no/such/model"],
        "model.path='/no/such/model' could not be loaded",
    ),
    "model path not given": (["model=hf"], "model.path is missing (???): give it on"),
    "impossible model shape": (
        ["model.num_attention_heads=5"],
        "model: The hidden size (64) is not a multiple of the number of attention heads (5)",
    ),
    "no eval task": (["eval.tasks=[]"], "eval.tasks=[] is empty for eval=embedded"),
    "nothing to measure": (["eval=none", "bench=none"], "this run would measure nothing"),
    "zero bench rounds": (["bench.rounds=0"], "bench.rounds=0 is out of range: accepted values"),
    "probe fraction zero": (
        ["probe=hot_neurons", "probe.hot_fraction=0"],
        "probe.hot_fraction=0.0 is out of range: accepted values are 0 < probe.hot_fraction <= 1",
    ),
    "strategy count zero": (
        ["strategy=predictor", "strategy.rank=0"],
        "strategy.rank=0 is out of range: accepted values are 1 <= strategy.rank",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_leaves_no_ok_results(case: str, tmp_path) -> None:
    overrides, expected = BAD_INPUT[case]
    out = cli(*overrides, cwd=tmp_path)
    assert_one_line_error(out, expected)
    assert no_ok_results(tmp_path)


def test_an_unwritable_cache_dir_is_one_line(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = cli(cwd=tmp_path, env={"MOYU_CACHE_DIR": str(blocker / "cache")})
    assert_one_line_error(out, ("cannot write the cache directory", "set MOYU_CACHE_DIR"), code=1)


def test_an_unusable_run_dir_is_one_line(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = cli(f"hydra.run.dir={blocker / 'run'}", cwd=tmp_path)
    expected = (f"cannot use '{blocker / 'run'}' (Not a directory)", "hydra.run.dir=")
    assert_one_line_error(out, expected, code=1)


def test_a_malformed_data_line_is_one_line(tmp_path) -> None:
    data = tmp_path / "data"
    (data / "piqa").mkdir(parents=True)
    good = json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 0})
    (data / "piqa" / "validation.jsonl").write_text(good + "\n{broken\n")
    out = cli("eval=zeroshot", "eval.tasks=[piqa]", f"data_dir={data}", cwd=tmp_path)
    assert_one_line_error(out, ("validation.jsonl, line 2: not valid JSON",), code=1)
    (saved,) = [json.loads(p.read_text()) for p in tmp_path.rglob("results.json")]
    assert saved["status"] == "failed" and "line 2: not valid JSON" in saved["error"]


def test_a_hub_id_that_does_not_exist_with_the_hub_unreachable(tmp_path) -> None:
    out = cli(
        "model=hf", "model.path=nobody/no-such-model", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"}
    )
    assert_one_line_error(out, "model.path='nobody/no-such-model' could not be loaded")


def test_hydra_full_error_shows_the_traceback(tmp_path) -> None:
    out = cli("sparsity=1.5", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_a_model_type_without_an_adapter(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(
        folder
    )
    models.byte_tokenizer().save_pretrained(folder)
    out = cli("model=hf", f"model.path={folder}", "eval=none", "bench=quick", cwd=tmp_path)
    assert_one_line_error(out, "model type 'gpt2' has no activation-site adapter: supported")


# --------------------------------------------------------------------------- corrupt caches
def test_a_truncated_checkpoint_is_detected(tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"x" * 100)
    cache.write_json_atomic(ckpt / models.MANIFEST, {"file_sizes": {"model.safetensors": 100}})
    assert models._checkpoint_complete(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"x" * 60)  # truncated
    assert not models._checkpoint_complete(ckpt)
    (ckpt / models.MANIFEST).write_text("{not json")
    assert not models._checkpoint_complete(ckpt)


def test_a_truncated_calibration_file_is_rebuilt(tiny, caplog, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MOYU_CACHE_DIR", str(tmp_path / "own"))  # not the session's shared one
    cfg = compose_config(*TINY, "strategy=cats", "sparsity=0.4")
    good, first = calibration.prepare(build(cfg.strategy), tiny, cfg)
    (path,) = (cache.root() / "calibration").glob(f"cats-{first['key']}.safetensors")
    path.write_bytes(path.read_bytes()[:50])
    again, meta = calibration.prepare(build(cfg.strategy), tiny, cfg)
    assert meta["cache"] == "miss" and "unreadable" in caplog.text
    assert again.keys() == good.keys()
    assert all(torch.equal(again[k], good[k]) for k in good)


def test_parallel_jobs_build_a_cache_entry_once() -> None:
    """Two jobs asking for the same cold entry: one builds it, the other waits and reads it."""
    calls = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        time.sleep(0.5)  # the other job asks while this one is building
        return {"t": torch.arange(4.0)}

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: cache.cached_tensors("lock", "k", compute), range(2)))
    assert len(calls) == 1
    assert sorted(hit for _, hit in outcomes) == [False, True]
    assert all(torch.equal(tensors["t"], torch.arange(4.0)) for tensors, _ in outcomes)


def test_a_truncated_point_is_recomputed(tmp_path) -> None:
    cfg = compose_config(*TINY, "eval=none", "bench=quick")
    first = runner.run(cfg, tmp_path / "a")
    (point,) = (cache.root() / "points").glob("*.json")
    point.write_text(point.read_text()[:40])
    second = runner.run(cfg, tmp_path / "b")
    assert "resumed_from" not in second and second["status"] == "ok"
    assert points.load(first["point_key"])["status"] == "ok"  # stored again, whole


# ----------------------------------------------------------------------------- W&B fallback
def test_wandb_online_without_login_falls_back_to_offline(tmp_path) -> None:
    env = {"WANDB_API_KEY": "", "WANDB_MODE": "", "HOME": str(tmp_path)}
    out = run_module(
        "experiment=tiny_smoke",
        "logger=wandb",
        "logger.mode=online",
        "eval=none",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "W&B online logging is unavailable" in out.stdout + out.stderr
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "ok"


# ----------------------------------------------------------------------------------- faults
def test_non_finite_logits_fail_the_point_with_the_reason(tmp_path) -> None:
    cfg = compose_config(*TINY, "bench=none")
    loaded = models.load(cfg.model)
    weight = loaded.model.model.layers[0].mlp.down_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[0, 0] = float("nan")
        with pytest.raises(NonFiniteLogits):
            runner.run(cfg, tmp_path)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["status"] == "failed"
    assert payload["error"] == "NonFiniteLogits: the model produced non-finite logits (NaN or inf)"


def test_a_nan_point_fails_and_the_sweep_goes_on(tiny, tmp_path) -> None:
    """A checkpoint with a NaN weight (a diverged model, say) fails its point; the next runs."""
    for name, poison in (("good", False), ("nan", True)):
        folder = tmp_path / name
        state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
        if poison:
            state["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
        tiny.model.save_pretrained(folder, state_dict=state)
        tiny.tokenizer.save_pretrained(folder)
    sweep_dir = tmp_path / "sweep"
    out = cli(
        "hydra.mode=MULTIRUN",
        "model=hf",
        f"model.path={tmp_path / 'nan'},{tmp_path / 'good'}",
        "bench=quick",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "1 sweep point(s) failed" in out.stderr
    rows = summary(sweep_dir)
    by_status = {r["status"]: r for r in rows}
    assert set(by_status) == {"ok", "failed"}
    assert by_status["failed"]["label"].endswith(f"model.path={tmp_path / 'nan'})")
    assert "NonFiniteLogits: the model produced non-finite logits" in by_status["failed"]["error"]


def test_interrupting_a_run_leaves_no_half_written_results(tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "moyu_exp",
        "model=tiny_llama",
        "model.hidden_size=256",
        "model.intermediate_size=768",
        "model.num_hidden_layers=6",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    ]
    long_bench = ["bench.decode_tokens=2000"]  # seconds of timing after the evaluation
    proc = subprocess.Popen(
        [*args, *long_bench],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # a background job of a shell inherits SIGINT ignored: give the run Ctrl-C back
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Ctrl-C once the evaluation runs (an interrupt among the imports: the test above), pressed
    # again, as a user would, if the process is still running
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while "loglikelihood" not in "".join(stderr) and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
            break
    reader.join(timeout=10)
    assert proc.returncode == 130, "".join(stderr)[-2000:]
    assert "interrupted; the point in progress wrote nothing" in "".join(stderr)
    assert not (run_dir / "results.json").exists()
    assert not list(run_dir.glob(".*.tmp"))
    again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "ok"


@pytest.mark.parametrize("where", ["imports", "swallowed"])
def test_a_ctrl_c_before_the_run_starts_ends_in_one_line(tmp_path, where) -> None:
    """Among the CLI's imports, or inside a library's import that turns it into its own error
    (seen: torch's AttributeError, transformers' ModuleNotFoundError, an abort at shutdown)."""
    run_dir = tmp_path / "run"
    args = (where, "model=tiny_llama", "logger=none", f"hydra.run.dir={run_dir}")
    out = run_module(*args, module="tests.interrupted_cli")
    assert out.returncode == 130, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last == "moyu_exp: interrupted; the point in progress wrote nothing (rerun to resume)"
    assert not (run_dir / "results.json").exists()  # not recorded as a failed point


def test_a_swallowed_ctrl_c_stops_the_run_at_its_next_phase(tmp_path, monkeypatch) -> None:
    from moyu_exp import errors

    monkeypatch.setattr(errors.Interrupts, "seen", True)
    with pytest.raises(KeyboardInterrupt):
        runner.run(compose_config(*TINY), tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_interrupts_are_found_among_causes_and_contexts() -> None:
    from moyu_exp.errors import interrupted

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            raise ModuleNotFoundError("Could not import module 'PreTrainedModel'") from err
    except ModuleNotFoundError as err:
        assert interrupted(err)
    assert not interrupted(RuntimeError("bench exploded"))


def test_results_that_cannot_be_written_keep_the_earlier_ones(tmp_path, monkeypatch) -> None:
    earlier = results.build(status="ok", config={}, timings={"note": 1.0})
    results.write(tmp_path, earlier)
    earlier = json.loads((tmp_path / "results.json").read_text())

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.tempfile, "mkstemp", disk_full)
    with pytest.raises(ResultsNotWritten, match=r"cannot write .*No space left on device"):
        runner.run(compose_config(*TINY, "eval=none"), tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == earlier


# ---------------------------------------------------------------------------- safe defaults
def test_remote_code_is_off_unless_asked_for() -> None:
    assert compose_config("model=hf", "model.path=x").model.trust_remote_code is False


def test_secrets_never_reach_results_or_wandb(tmp_path) -> None:
    cfg = compose_config(
        *TINY,
        "eval=none",
        "bench=quick",
        "logger=wandb",
        "+hf_token=SECRET-123",
        "+extra.api_key=SECRET-456",
    )
    runner.run(cfg, tmp_path)
    saved = (tmp_path / "results.json").read_text()
    assert "SECRET" not in saved and '"hf_token": "<redacted>"' in saved
    assert json.loads(saved)["config"]["bench"]["prompt_tokens"] == cfg.bench.prompt_tokens
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"SECRET" not in run_file.read_bytes()


def test_caches_hold_no_pickles(tiny) -> None:
    cfg = compose_config(*TINY, "strategy=chess")
    calibration.prepare(build(cfg.strategy), tiny, cfg)
    runner.run(compose_config(*TINY, "eval=none", "bench=quick"), cache.root() / "run")
    files = [
        Path(folder, name)
        for folder, _, names in os.walk(cache.root(), followlinks=True)  # the linked folders too
        for name in names
    ]
    assert any(p.suffix == ".safetensors" for p in files), "the linked calibration was not seen"
    suffixes = {p.suffix for p in files if not p.name.startswith(".")}  # locks are empty dotfiles
    assert suffixes <= {".safetensors", ".json"}, suffixes


# ------------------------------------------------------------------------------ determinism
def test_the_same_config_and_seed_give_identical_metrics(tmp_path) -> None:
    cfg = compose_config(
        *TINY,
        "strategy=random",
        "sparsity=0.5",
        "resume=false",
        "eval=zeroshot",
        "eval.tasks=[embedded]",
        "eval.fidelity=true",
    )
    first = runner.run(cfg, tmp_path / "a")
    models._LOADED.clear()  # a fresh process would rebuild the model too
    second = runner.run(cfg, tmp_path / "b")
    assert first["eval"] == second["eval"]
    assert first["achieved_sparsity"] == second["achieved_sparsity"]
