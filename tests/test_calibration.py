"""Calibration that stays cheap and honest: the staged greedy search against the plain one,
paths that grow instead of starting over, keys that cannot go stale, shipped files, and saying
the cost before paying it."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from moyu_exp import cache, calibration, models, ship, shipped
from moyu_exp.activations import capture_block_inputs
from moyu_exp.config import build
from moyu_exp.strategies import greedy
from moyu_exp.strategies.greedy import BlockSearch, greedy_path
from moyu_exp.strategies.teal import TEAL_SITES, Teal
from tests.conftest import TINY, compose_config

STEP = 0.05


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A cache of this test's own (the session's shared one may hold what it computes)."""
    monkeypatch.setenv("MOYU_CACHE_DIR", str(tmp_path / "own_cache"))


def search_inputs(loaded, layer: int = 1, rows: int = 2, tokens: int = 256):
    ids = torch.randint(0, 250, (rows, tokens), generator=torch.Generator().manual_seed(0))
    return capture_block_inputs(loaded.model, [layer], ids)[layer]


def magnitude(site: str, level: float, x: torch.Tensor) -> torch.Tensor:
    """A position-wise threshold rule for the search (as TEAL's): drop |x| below ``level``."""
    return x.masked_fill(x.abs() < level, 0.0)


def tiny_family(family: str):
    return models.load(compose_config(*TINY, "model=tiny", f"model.family={family}").model)


# ------------------------------------------------------------------ staged == plain
@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "phi3", "qwen3", "mixtral"])
def test_the_staged_search_finds_the_plain_search_rows_bit_for_bit(family) -> None:
    """Every error the staged evaluation computes (prefix keys once, spans, kept stages) is the
    plain evaluation's (the block's modules on the whole sequence), so the rows are equal."""
    loaded = tiny_family(family)
    captured = search_inputs(loaded)
    sites = list(TEAL_SITES)
    plain = BlockSearch(loaded.model, 1, sites, captured, magnitude, staged=False)
    staged = BlockSearch(loaded.model, 1, sites, captured, magnitude)
    assert staged.staged and not plain.staged
    assert torch.equal(plain.reference, staged.reference)
    trials = [dict.fromkeys(sites, 0.0) | {site: 0.3} for site in sites]
    trials.append({"attn_input": 0.2, "o_proj_input": 0.4, "mlp_input": 0.1})
    assert staged.errors(trials) == plain.errors(trials)
    assert torch.equal(greedy_path(staged, sites, STEP, 0.4), greedy_path(plain, sites, STEP, 0.4))


def test_wina_sites_and_bases_search_alike_staged_and_plain(tiny) -> None:
    """Per-projection sites (q/k/v, gate/up inputs) read through a basis, as WINA's transform
    has them: the staged search rotates and masks each where the plain one does."""
    captured = search_inputs(tiny)
    sites = ["q_input", "k_input", "v_input", "o_proj_input", "gate_input", "up_input"]
    sites.append("mlp_intermediate")
    gen = torch.Generator().manual_seed(1)
    rotation = torch.linalg.qr(torch.randn(64, 64, generator=gen)).Q
    bases = {s: rotation for s in ("q_input", "k_input", "v_input", "gate_input", "up_input")}
    paths = [
        greedy_path(
            BlockSearch(tiny.model, 1, sites, captured, magnitude, 0.99, bases=bases, staged=s),
            sites,
            STEP,
            0.3,
        )
        for s in (False, None)
    ]
    assert torch.equal(*paths)


def test_the_error_window_may_start_in_the_dense_prefix(tiny) -> None:
    """sparse_fraction 0.2 with an error window of 0.25: the window's first positions are dense
    ones (their o_proj input comes from the prefix), the rest sparse; staged == plain."""
    captured = search_inputs(tiny)
    sites = list(TEAL_SITES)
    errors = [
        BlockSearch(tiny.model, 1, sites, captured, magnitude, 0.2, staged=s).errors(
            [dict.fromkeys(sites, 0.5)]
        )
        for s in (False, None)
    ]
    assert errors[0] == errors[1] and errors[0][0] > 0


def test_families_whose_attention_takes_other_arguments_search_plain() -> None:
    loaded = tiny_family("opt")
    search = BlockSearch(loaded.model, 1, list(TEAL_SITES), search_inputs(loaded), magnitude)
    assert not search.staged
    assert len(greedy_path(search, list(TEAL_SITES), STEP, 0.2)) > 2


# ------------------------------------------------------------------ prefix-closed paths
def test_a_path_continued_from_a_shorter_one_is_the_path_searched_at_once(tiny) -> None:
    captured = search_inputs(tiny)
    sites = list(TEAL_SITES)

    def fresh():
        return BlockSearch(tiny.model, 1, sites, captured, magnitude)

    whole = greedy_path(fresh(), sites, STEP, 0.7)
    short = greedy_path(fresh(), sites, STEP, 0.3)
    assert short[-1, 0] >= 0.3 > short[-2, 0] and len(short) < len(whole)
    assert torch.equal(greedy_path(fresh(), sites, STEP, 0.7, start=short), whole)


def test_resumed_levels_are_the_search_levels_to_the_last_bit(tiny) -> None:
    """Rows hold levels in float32; the search continues from the float64 sums of its steps
    (a finished site, shown as 0.99, comes back as 1.0)."""
    steps = {"a": 0.05, "b": 0.0375}
    level_a, level_b = 0.0, 0.0
    for _ in range(7):
        level_a += steps["a"]
    for _ in range(5):
        level_b += steps["b"]
    row = torch.tensor([0.3, level_a, level_b])
    assert greedy.resumed_levels(row, ["a", "b"], steps) == {"a": level_a, "b": level_b}
    done = torch.tensor([0.9, 0.99, level_b])
    assert greedy.resumed_levels(done, ["a", "b"], steps)["a"] == 1.0


def test_teal_searches_as_far_as_its_sparsity_needs_and_extends_later(
    tiny, empty_cache, monkeypatch
) -> None:
    searched: list[tuple[int, int]] = []  # (layer, rows it started from)
    original = greedy.greedy_path

    def counting(search, sites, step, reach, start=None, progress=None):
        searched.append((search.layer, 0 if start is None else len(start)))
        return original(search, sites, step, reach, start, progress)

    monkeypatch.setattr(greedy, "greedy_path", counting)
    low = calibrate("strategy=teal", "sparsity=0.3")
    for layer in (0, 1):
        path = low.state[f"greedy.{layer}"]
        assert 0.3 <= path[-1, 0] < 0.45  # a step or two past the target, not to greedy_max
    assert [start for _, start in searched] == [0, 0]
    high = calibrate("strategy=teal", "sparsity=0.6")
    assert [start for _, start in searched[2:]] == [len(low.state["greedy.0"])] * 2
    assert torch.equal(high.state["greedy.0"][: len(low.state["greedy.0"])], low.state["greedy.0"])
    assert high.meta["parts"]["greedy"] == "computed"
    searched.clear()
    again = calibrate("strategy=teal", "sparsity=0.5")  # within the longer path: nothing to do
    assert searched == [] and again.meta["cache"] == "hit"
    assert again.meta["parts"] == {"dense-stats": "cache", "greedy": "cache"}


def test_a_layers_path_does_not_depend_on_which_other_layers_are_calibrated(
    empty_cache, tmp_path, monkeypatch
) -> None:
    """The value sample draws from one stream across layers: TEAL's statistics are taken over
    every layer, so ``strategy.layers=[1]`` finds the same path for layer 1 as the whole model
    (a sample small enough to subsample: before, layer 1's draws shifted with layer 0's)."""
    from moyu_exp import activations
    from moyu_exp.strategies import teal

    monkeypatch.setattr(teal, "ValueSample", lambda calls: activations.ValueSample(calls, cap=4096))
    whole = calibrate("strategy=teal", "sparsity=0.3")
    monkeypatch.setenv("MOYU_CACHE_DIR", str(tmp_path / "other_cache"))
    alone = calibrate("strategy=teal", "sparsity=0.3", "strategy.layers=[1]")
    assert torch.equal(alone.state["greedy.1"], whole.state["greedy.1"])


class Calibrated:
    def __init__(self, state, meta):
        self.state, self.meta = state, meta


def calibrate(*overrides: str, model=None) -> Calibrated:
    cfg = compose_config(*TINY, "calibration.tokens=4096", "calibration.seq_len=512", *overrides)
    loaded = model or models.load(cfg.model)
    return Calibrated(*calibration.prepare(build(cfg.strategy), loaded, cfg))


# --------------------------------------------------------------------- keys
def test_a_changed_search_version_or_parameter_searches_again(
    tiny, empty_cache, monkeypatch
) -> None:
    first = calibrate("strategy=teal", "sparsity=0.3")
    assert first.meta["parts"]["greedy"] == "computed"
    assert calibrate("strategy=teal", "sparsity=0.3").meta["cache"] == "hit"
    assert calibrate("strategy=teal", "sparsity=0.2").meta["cache"] == "hit"  # same paths serve
    step = calibrate("strategy=teal", "sparsity=0.3", "strategy.greedy_step=0.1")
    assert step.meta["parts"]["greedy"] == "computed"
    monkeypatch.setattr(greedy, "SEARCH_VERSION", greedy.SEARCH_VERSION + 1)
    for module in ("teal", "wina"):
        monkeypatch.setattr(f"moyu_exp.strategies.{module}.SEARCH_VERSION", greedy.SEARCH_VERSION)
    newer = calibrate("strategy=teal", "sparsity=0.3")
    assert newer.meta["key"] != first.meta["key"] and newer.meta["parts"]["greedy"] == "computed"
    assert torch.equal(newer.state["greedy.1"], first.state["greedy.1"])  # the same search


def test_the_calibration_key_is_the_tokens_used_not_the_documents_they_came_from(
    tiny, empty_cache, monkeypatch
) -> None:
    """Documents beyond the tokens used (e.g. the tail of CPython's documentation, which varies
    with the Python version) do not change the key; a changed token does."""
    from moyu_exp import datasets

    first = calibrate("strategy=cats")
    original = datasets.calibration_text
    monkeypatch.setattr(datasets, "calibration_text", lambda name="default": [*original(), "x"])
    assert calibrate("strategy=cats").meta["key"] == first.meta["key"]
    monkeypatch.setattr(datasets, "calibration_text", lambda name="default": ["y", *original()])
    changed = calibrate("strategy=cats")
    assert changed.meta["token_digest"] != first.meta["token_digest"]
    assert changed.meta["key"] != first.meta["key"]


def test_changed_weights_never_reuse_another_models_calibration(empty_cache) -> None:
    cfg = compose_config(*TINY, "model.init_seed=7")  # a model of its own (not the shared one)
    loaded = models.load(cfg.model)
    first = calibrate("strategy=cats", model=loaded)
    gains = loaded.model.model.layers[0].input_layernorm.weight
    saved = gains.detach().clone()
    try:
        with torch.no_grad():
            gains.mul_(1.5)  # same config, other weights
        changed = calibrate("strategy=cats", model=loaded)
        assert changed.meta["key"] != first.meta["key"] and changed.meta["cache"] == "miss"
    finally:
        with torch.no_grad():
            gains.copy_(saved)
    assert calibrate("strategy=cats", model=loaded).meta["key"] == first.meta["key"]


def test_the_weights_fingerprint_is_hashed_once_until_a_tensor_changes(tiny, monkeypatch) -> None:
    import hashlib

    first = models.weights_fingerprint(tiny.model)
    calls = []
    original = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: calls.append(1) or original(*a))
    assert models.weights_fingerprint(tiny.model) == first and calls == []
    weight = tiny.model.model.norm.weight
    with torch.no_grad():
        weight.add_(0.0)  # in place: the version counter moves, the values do not
    assert models.weights_fingerprint(tiny.model) == first and calls == [1]


def test_a_model_holding_inference_tensors_is_hashed_every_time() -> None:
    """Tensors made under ``torch.inference_mode`` keep no version counter (asking for it
    raises): such a model is fingerprinted by its bytes each time, and a change shows."""
    with torch.inference_mode():
        module = torch.nn.Linear(3, 2)
    assert module.weight.is_inference()
    first = models.weights_fingerprint(module)
    assert models.weights_fingerprint(module) == first
    with torch.inference_mode():
        module.weight.add_(1.0)
    assert models.weights_fingerprint(module) != first


# ------------------------------------------------------------------ shipped files
def test_a_shipped_path_is_used_only_when_every_part_of_its_key_matches(
    tiny, tmp_path, monkeypatch
) -> None:
    """Ship the tiny model's TEAL paths (as ``moyu_exp.shipped`` writes them), then: a fresh
    cache reads them (no search); another step, or ``calibration.shipped=false``, searches."""
    searched = []
    monkeypatch.setattr(shipped, "FOLDER", tmp_path / "shipped")
    shipped._index.cache_clear()
    done = calibrate("strategy=teal", "sparsity=0.4")
    cfg = compose_config(*TINY, "calibration.tokens=4096", "calibration.seq_len=512")
    batches = calibration.token_batches(tiny.tokenizer, build(cfg.dataset), 4096, 512)
    data_key = cache.content_key(
        calibration.VERSION,
        models.weights_fingerprint(tiny.model),
        calibration.token_digest(batches),
    )
    owner, params = Teal().shipped_part()
    parts = calibration.Parts(data_key, owner)
    ship = {
        f"greedy-{i}": (parts.key(owner, f"greedy-{i}", params | {"layer": i}), {"path": p})
        for i, p in ((0, done.state["greedy.0"]), (1, done.state["greedy.1"]))
    }
    shipped.write(shipped.FOLDER / "tiny-teal.safetensors", ship, {"method": "teal"})
    monkeypatch.setenv("MOYU_CACHE_DIR", str(tmp_path / "fresh_cache"))
    original = greedy.greedy_path
    monkeypatch.setattr(
        greedy, "greedy_path", lambda *a, **k: searched.append(1) or original(*a, **k)
    )
    fresh = calibrate("strategy=teal", "sparsity=0.4")
    assert fresh.meta["parts"]["greedy"] == "shipped" and searched == []
    assert torch.equal(fresh.state["greedy.1"], done.state["greedy.1"])
    forced = calibrate("strategy=teal", "sparsity=0.4", "calibration.shipped=false")
    assert forced.meta["parts"]["greedy"] == "computed" and len(searched) == 2
    other = calibrate("strategy=teal", "sparsity=0.4", "strategy.greedy_step=0.1")
    assert other.meta["parts"]["greedy"] == "computed"
    # a target past the shipped rows continues each layer's search from its last shipped row
    monkeypatch.setenv("MOYU_CACHE_DIR", str(tmp_path / "another_fresh_cache"))
    starts = []
    monkeypatch.setattr(
        greedy,
        "greedy_path",
        lambda search, sites, step, reach, start=None, progress=None: (
            starts.append(None if start is None else len(start))
            or original(search, sites, step, reach, start, progress)
        ),
    )
    beyond = calibrate("strategy=teal", "sparsity=0.7")
    assert starts == [len(done.state["greedy.0"]), len(done.state["greedy.1"])]
    for layer in (0, 1):
        rows = done.state[f"greedy.{layer}"]
        assert torch.equal(beyond.state[f"greedy.{layer}"][: len(rows)], rows)
        assert beyond.state[f"greedy.{layer}"][-1, 0] >= 0.7
    shipped._index.cache_clear()


def test_the_shipped_files_match_the_code_and_the_yaml_defaults() -> None:
    """A shipped file is current while the keys the code computes, with the YAML defaults of
    its method, for the model and tokens it names, are the ones it holds: a changed search
    version, calibration version or default parameter fails here (regenerate with
    ``python -m moyu_exp.ship``)."""
    files = shipped.files()
    names = {p.name for p, _ in files}
    expected = {f"{m}-{s}.safetensors" for m in ship.MODELS for s in ship.METHODS}
    assert names == expected
    lines = ship.check()
    assert all(line.endswith(": current") for line in lines), "\n".join(lines)
    for _, meta in files:
        paths = json.loads(meta["keys"])
        assert len(paths) == int(meta["num_layers"]) > 0
        for field in ("command", "commit", "machine", "created", "token_digest", "fingerprint"):
            assert meta[field]


def test_the_shipped_paths_reach_what_their_files_say() -> None:
    """Every path of a file reaches its recorded ``reach`` (the greedy cap where none is
    recorded), and that is at least 0.5: the first result at a middling sparsity needs no
    search (a higher target continues the shipped rows)."""
    for path, meta in shipped.files():
        keys = json.loads(meta["keys"])
        reach = float(meta.get("reach", ship.default_strategy(meta["method"]).greedy_max))
        assert reach >= 0.5, path.name
        for label, key in keys.items():
            rows = shipped.find(key)["path"]
            assert greedy.path_complete(rows, reach), f"{path.name} {label} stops at {rows[-1, 0]}"


# --------------------------------------------------------------- the cost, said first
def test_a_search_estimated_over_a_minute_says_so_first(
    tiny, empty_cache, caplog, monkeypatch
) -> None:
    monkeypatch.setattr(greedy, "MLP_EVALS_PER_SITE", 1e6)  # as if this machine were slow
    with caplog.at_level(logging.INFO, logger="moyu_exp"):
        calibrate("strategy=teal", "sparsity=0.3")
    lines = [r.getMessage() for r in caplog.records if "on this machine" in r.getMessage()]
    assert len(lines) == 1
    assert "TEAL's greedy search (2 layers): about" in lines[0]
    assert "resumes where it stopped" in lines[0] and "strategy.allocation=uniform" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="moyu_exp"):
        calibrate("strategy=teal", "sparsity=0.3")  # cached: nothing to pay, nothing said
    assert not [r for r in caplog.records if "on this machine" in r.getMessage()]


def test_the_search_estimate_counts_the_outstanding_steps_and_the_attention_kind(
    tiny, monkeypatch
) -> None:
    """On a fake clock (each timed MLP half takes 10 ms, so nothing here depends on the
    machine's load): the estimate is steps left x sites x the per-site cost; a higher reach
    adds steps, a resumed path counts only its outstanding ones, eager attention costs more.
    The estimate against the search's measured time: benchmarks/greedy_search.py prints it."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(greedy.time, "perf_counter", lambda: next(ticks) * 0.01)
    sites = list(TEAL_SITES)

    def estimate(reach: float, rows=None) -> tuple[float, int]:
        paths = greedy.ModelPaths(calibration.Parts("k", "teal"), "teal", {}, [1], sites, STEP)
        paths.todo, paths.reach = {1: rows}, reach
        return paths.estimate(tiny.model, 2, 512, 0.5), paths.steps_left(tiny.model)

    half, half_steps = estimate(0.5)
    most, most_steps = estimate(0.9)
    assert half_steps == greedy.steps_to(0.5, tiny.model, 1, sites, STEP) < most_steps
    assert most / half == pytest.approx(most_steps / half_steps)
    resumed, resumed_steps = estimate(0.5, rows=torch.zeros(11, 1 + len(sites)))
    assert resumed_steps == half_steps - 10
    assert resumed == pytest.approx(half * resumed_steps / half_steps)
    monkeypatch.setattr(greedy, "ATTENTION_EVALS_PER_SITE", 0.0)
    mlp_only, _ = estimate(0.5)
    assert mlp_only == pytest.approx(half_steps * len(sites) * greedy.MLP_EVALS_PER_SITE * 0.01)
    monkeypatch.undo()
    monkeypatch.setattr(greedy.time, "perf_counter", lambda: next(ticks) * 0.01)
    adapter = type(greedy.adapter_for(tiny.model))
    monkeypatch.setattr(adapter, "eager_attention", lambda self, block: True)
    eager, _ = estimate(0.5)
    attention = half - mlp_only
    assert eager == pytest.approx(mlp_only + greedy.EAGER_ATTENTION_COST * attention)


def test_predictor_training_is_cached_per_layer_and_resumes(tiny, empty_cache, monkeypatch) -> None:
    from moyu_exp.strategies import predictor

    trained, original = [], predictor.train
    stop = [True]

    def train(features, labels, cfg):
        trained.append(len(trained))
        if len(trained) == 2 and stop[0]:
            raise KeyboardInterrupt  # stopped during the second layer
        return original(features, labels, cfg)

    monkeypatch.setattr(predictor, "train", train)
    args = ("strategy=predictor", "strategy.train_tokens=1024", "strategy.max_epochs=2")
    with pytest.raises(KeyboardInterrupt):
        calibrate(*args)
    stop[0] = False
    trained.clear()
    done = calibrate(*args)
    assert trained == [0] and done.meta["parts"]["layer"] == "cache 1, computed 1"
    assert {"w1.0", "w1.1", "recall.0", "recall.1"} <= set(done.state)


def test_every_calibration_over_a_minute_says_its_cost_first(
    tiny, empty_cache, caplog, monkeypatch
) -> None:
    """Not only the searches: a calibration of forward passes (here CATS, as if each pass took
    an hour) says its estimate and the option that avoids it before it starts."""
    from moyu_exp.strategies.cats import Cats

    monkeypatch.setattr(Cats, "calibration_passes", 1e6)
    with caplog.at_level(logging.INFO, logger="moyu_exp"):
        calibrate("strategy=cats")
    lines = [r.getMessage() for r in caplog.records if "on this machine" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("calibrating cats: about")
    assert "fewer calibration.tokens avoids it" in lines[0]


def test_the_shipped_provenance_csv_is_the_files_own_metadata(tmp_path) -> None:
    """docs/calibration.md's table of where each shipped file came from is generated from
    docs/shipped_provenance.csv, which must be what the files say (rewrite it with
    ``python -m moyu_exp.ship --provenance docs/shipped_provenance.csv``)."""
    from tests.conftest import ROOT

    written = tmp_path / "provenance.csv"
    ship.provenance_csv(written)
    assert written.read_text() == (ROOT / "docs" / "shipped_provenance.csv").read_text()
    assert len(written.read_text().splitlines()) == 1 + len(shipped.files())
