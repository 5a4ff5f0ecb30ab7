"""MOYU probes on tiny_llama: each runs end to end (quick settings) and its arithmetic is right."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from moyu_exp import models, runner
from moyu_exp.probes import PROBES, common
from moyu_exp.probes.history_recall import HistoryRecall
from moyu_exp.probes.hot_neurons import HotNeurons, gini, hot_share
from moyu_exp.probes.lag_overlap import LagOverlap
from moyu_exp.probes.sparsity_profile import cdf_at
from moyu_exp.strategies.griffin import Griffin
from tests.conftest import TINY, attach, compose_config

QUICK = {
    "sparsity_profile": ["probe.prompt_tokens=32", "probe.decode_tokens=8"],
    "hot_neurons": ["probe.tokens=256"],
    "history_recall": ["probe.prompt_tokens=[8,16]", "probe.max_distance=24", "probe.starts=[0]"],
    "lag_overlap": ["probe.tokens=128", "probe.max_lag=32"],
    "first_tokens": [
        "probe.prompt_tokens=8",
        "probe.later_tokens=16",
        "probe.starts=[0]",
        "probe.eval_documents=1",
    ],
    "semantic_vs_positional": ["probe.pairs=3"],
    "reconstruction": [
        "probe.tokens=64",
        "probe.sparsities=[0.5,0.9]",
        "probe.strategies=[topk,random,cats]",
    ],
    "sparsity_variance": [
        "probe.prompt_tokens=32",
        "probe.decode_tokens=6",
        "probe.strategies=[topk,cats]",
    ],
    "predictor_shift": [
        "probe.tokens=256",
        "probe.max_epochs=3",
        "probe.rank=16",
        "probe.train_tokens=1024",
    ],
}


def test_every_probe_has_a_quick_setting() -> None:
    assert set(QUICK) == set(PROBES)


@pytest.mark.parametrize("name", sorted(QUICK))
def test_probe_runs_and_writes_numbers_and_figures(name, tmp_path) -> None:
    cfg = compose_config(*TINY, f"probe={name}", *QUICK[name])
    payload = runner.run(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "ok" and saved["probe"]["name"] == name
    assert saved["probe"]["numbers"] == json.loads(json.dumps(payload["probe"]["numbers"]))
    layers = models.load(cfg.model).model.config.num_hidden_layers
    assert_consistent_numbers(saved["probe"]["numbers"], layers)
    assert saved["probe"]["figures"]
    for figure in saved["probe"]["figures"]:
        assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"
    assert "eval" not in saved and saved["strategy"] is None


FRACTIONS = ("recall", "jaccard", "precision", "gini", "share", "fraction", "agreement")
FRACTIONS += ("chance", "kept", "cdf", "apart", "together")


def assert_consistent_numbers(numbers: dict, layers: int, path: str = "") -> None:
    """What every probe's numbers must satisfy, whatever the model: finite; shares, recalls,
    overlaps and CDFs in [0, 1]; a per-layer list has one entry per layer and its sibling mean
    is its average; a CDF never decreases; p5 <= median <= p95."""
    for key, value in numbers.items():
        where = f"{path}/{key}"
        if isinstance(value, dict):
            assert_consistent_numbers(value, layers, where)
            continue
        flat = [v for v in _flatten(value) if isinstance(v, (int, float))]
        assert all(math.isfinite(v) for v in flat), where
        if any(word in where for word in FRACTIONS):  # (counts, e.g. epochs, are ints)
            assert all(-1e-6 <= v <= 1 + 1e-6 for v in flat if isinstance(v, float)), where
        if key == "cdf":
            for row in value:
                assert all(a <= b + 1e-6 for a, b in itertools.pairwise(row)), where
        if key.endswith("per_layer") and all(isinstance(v, (int, float)) for v in value):
            assert len(value) == layers, where
            mean = numbers.get(key.removesuffix("per_layer") + "mean")
            if mean is not None:
                assert mean == pytest.approx(sum(value) / len(value), rel=1e-5), where
    if {"p5", "median", "p95"} <= numbers.keys():
        assert numbers["p5"] <= numbers["median"] <= numbers["p95"], path


def _flatten(value):
    if isinstance(value, list):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def test_the_number_checks_catch_an_inconsistent_probe() -> None:
    good = {"a": {"recall": {"per_layer": [0.2, 0.4], "mean": 0.3}, "cdf": [[0.1, 0.5, 1.0]]}}
    assert_consistent_numbers(good, layers=2)
    for broken in (
        {"recall": {"per_layer": [0.2, 0.4], "mean": 0.35}},  # a mean that is not the average
        {"recall": {"per_layer": [0.2, 0.4, 0.6], "mean": 0.4}},  # a layer too many
        {"gini_mean": 1.2},  # a share past 1
        {"cdf": [[0.5, 0.4]]},  # a decreasing CDF
        {"kl": float("nan")},
        {"p5": 0.6, "median": 0.5, "p95": 0.7},
    ):
        with pytest.raises(AssertionError):
            assert_consistent_numbers(broken, layers=2)


def test_a_probe_ends_with_its_headline_numbers_and_figures(tmp_path) -> None:
    from moyu_exp import console

    payload = runner.run(
        compose_config(*TINY, "probe=lag_overlap", *QUICK["lag_overlap"]), tmp_path
    )
    text = console.render(payload, tmp_path)
    assert text.startswith("moyu_exp: probe lag_overlap at sparsity 0.5 on tiny_llama: ok")
    assert payload["probe"]["question"] in text
    for figure in payload["probe"]["figures"]:
        assert f"figure      {tmp_path / figure}" in text
    assert str(tmp_path / "results.json") in text


def test_a_resumed_probe_brings_its_figures_along(tmp_path) -> None:
    from moyu_exp import cache

    cfg = compose_config(*TINY, "probe=lag_overlap", *QUICK["lag_overlap"])
    first = runner.run(cfg, tmp_path / "a")
    second = runner.run(cfg, tmp_path / "b")
    assert second["resumed_from"] and second["probe"] == first["probe"]
    for figure in first["probe"]["figures"]:
        assert (tmp_path / "b" / figure).read_bytes() == (tmp_path / "a" / figure).read_bytes()
    for stored in (cache.root() / "points").glob("*.files/*"):
        stored.unlink()  # artefacts lost: the point runs again rather than point at nothing
    third = runner.run(cfg, tmp_path / "c")
    assert "resumed_from" not in third
    assert all((tmp_path / "c" / figure).is_file() for figure in third["probe"]["figures"])


def test_probe_numbers_and_figures_reach_wandb(tmp_path) -> None:
    from tests.wandb_records import records, summary

    cfg = compose_config(*TINY, "probe=hot_neurons", "probe.tokens=128", "logger=wandb")
    runner.run(cfg, tmp_path)
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    values = summary(run_file)
    assert 0 <= values["probe/hot_neurons/sources/prose/gini_mean"] <= 1
    kinds = [r.WhichOneof("record_type") for r in records(run_file)]
    assert "files" in kinds or any("hot_neurons_hot_neurons" in str(r) for r in records(run_file))


# ------------------------------------------------------------------------------ arithmetic
def sets(rows: list[list[int]], d: int = 6) -> torch.Tensor:
    out = torch.zeros(len(rows), d, dtype=torch.bool)
    for i, members in enumerate(rows):
        out[i, members] = True
    return out


def test_jaccard_and_recall_of_known_sets() -> None:
    a = sets([[0, 1, 2]])[0]
    b = sets([[0, 1, 2], [2, 3, 4], [3, 4, 5]])
    assert common.jaccard(a, b).tolist() == pytest.approx([1.0, 0.2, 0.0])
    assert common.recall(a, b).tolist() == pytest.approx([1.0, 1 / 3, 0.0])


def test_topk_sets_keep_k_largest_magnitudes() -> None:
    z = torch.tensor([[0.1, -3.0, 0.2, 2.0], [5.0, 0.0, -1.0, 0.5]])
    assert common.topk_sets(z, 0.5).tolist() == [
        [False, True, False, True],
        [True, False, True, False],
    ]


def test_prompt_set_is_griffins_selection(tiny) -> None:
    ids = torch.tensor([[ord(c) for c in "Some prompt text to select from, then more."]])
    z = common.intermediates(tiny, ids)[0]
    with Griffin(sparsity=0.5).attach(tiny.model) as live, torch.inference_mode():
        tiny.model(ids, use_cache=True)
        frozen = live.state.frozen[0][0].cpu()
    assert torch.equal(common.prompt_set(z, 0.5), frozen)


def test_recall_by_distance_on_constructed_activations() -> None:
    probe = HistoryRecall(sparsity=0.5)
    prompt = {0: torch.tensor([[5.0, 4.0, 0.1, 0.1]] * 3)}  # prompt set {0, 1}
    later = {0: torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.0, 0.0, 5.0, 4.0], [5.0, 0.0, 4.0, 0.0]])}
    measured = probe.recall_by_distance(prompt, later)
    assert measured["recall"].tolist() == [[1.0, 0.0, 0.5]]
    assert measured["jaccard"][0].tolist() == pytest.approx([1.0, 0.0, 1 / 3])
    # magnitude kept by {0, 1} relative to each token's own top-2: 9/9, 0/9, 5/9
    assert measured["mass_recall"][0].tolist() == pytest.approx([1.0, 0.0, 5 / 9])


def test_gini_and_hot_share_extremes() -> None:
    flat = torch.full((1, 100), 0.5)
    spike = torch.zeros(1, 100)
    spike[0, 0] = 1.0
    assert gini(flat).item() == pytest.approx(0.0, abs=1e-6)
    assert gini(spike).item() == pytest.approx(0.99)
    assert hot_share(flat, 0.1).item() == pytest.approx(0.1)
    assert hot_share(spike, 0.1).item() == pytest.approx(1.0)


def test_hot_neurons_reports_the_share_ceiling_and_always_on_neurons(tiny, monkeypatch) -> None:
    """Known frequencies: a quarter of the neurons in every top-k, the rest evenly spread."""
    d_ff = tiny.model.config.intermediate_size
    f = torch.full((2, d_ff), 0.5)
    f[:, : d_ff // 4] = 1.0
    probe = HotNeurons(sparsity=0.5, tokens=16, hot_fraction=0.1)
    monkeypatch.setattr(probe, "frequencies", lambda loaded, ids: f)
    numbers = probe.run(tiny, None).numbers
    prose = numbers["sources"]["prose"]
    assert prose["always_on_fraction_mean"] == pytest.approx((d_ff // 4) / d_ff)
    assert numbers["hot_share_ceiling"] == pytest.approx(0.2)
    hot = round(0.1 * d_ff)  # all of them always on
    assert prose["hot_share_mean"] == pytest.approx(hot / f[0].sum().item())
    assert numbers["jaccard_of_hot_sets"]["prose-docs"]["mean"] == pytest.approx(1.0)


def test_lag_jaccard_from_the_gram_matrix_matches_brute_force(tiny, monkeypatch) -> None:
    torch.manual_seed(0)
    z = {0: torch.randn(40, 16)}
    monkeypatch.setattr(common, "intermediates", lambda loaded, ids: z)
    curves = LagOverlap(sparsity=0.5, max_lag=5).lag_curves(tiny, None)
    a = common.topk_sets(z[0], 0.5)
    brute = [float(common.jaccard(a[:-d], a[d:]).mean()) for d in range(1, 6)]
    assert curves[0].tolist() == pytest.approx(brute)


def test_cdf_at_counts_values_at_or_below_tau() -> None:
    values = torch.tensor([0.1, 0.2, 0.2, 0.5, 1.0])
    at = cdf_at(values, torch.tensor([0.0, 0.2, 0.6, 2.0]))
    assert at.tolist() == pytest.approx([0.0, 0.6, 0.8, 1.0])


def test_topk_gives_every_token_the_same_sparsity(tiny) -> None:
    from moyu_exp.probes.sparsity_variance import SparsityVariance

    cfg = compose_config(*TINY, "probe=sparsity_variance")
    probe = SparsityVariance(sparsity=0.5, prompt_tokens=24, decode_tokens=5)
    per_token = probe.per_token(tiny, cfg, "topk", common.prose_ids(tiny.tokenizer, 24))
    for phase in ("prefill", "decode"):
        assert torch.allclose(per_token[phase], torch.tensor(0.5))
    assert per_token["prefill"].numel() == 24 and per_token["decode"].numel() == 5


def test_predictor_strategy_keeps_exactly_k(tiny) -> None:
    live = attach(
        "predictor",
        tiny,
        "sparsity=0.5",
        "strategy.max_epochs=2",
        "strategy.rank=8",
        "strategy.train_tokens=512",
    )
    ids = torch.tensor([[ord(c) for c in "The lighthouse keeper rose before dawn to trim."]])
    with live, torch.inference_mode():
        seen = []
        handle = tiny.model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
            lambda _m, args: seen.append(args[0][0].clone())
        )
        tiny.model(ids)
        handle.remove()
    assert torch.all((seen[0] != 0).sum(-1) == 80)
    # DejaVu's cost: a dropped neuron skips its gate row, up row and down column, and the
    # predictor's own weights are read every token (charged at the site)
    d = tiny.model.config.hidden_size
    key = ("mlp_intermediate", 0)
    assert live.cost.weights_per_entry[key] == 3 * d
    assert live.cost.extra_weights[key] == 8 * (d + 160)
    assert live.meter.site_sparsity == pytest.approx(0.5 - 8 * (d + 160) / (160 * 3 * d))


def test_predictor_training_learns_a_learnable_target() -> None:
    """Labels that a low-rank linear score can express are learned (the code trains), and the
    epoch kept is the one with the best validation recall."""
    import numpy as np

    from moyu_exp.strategies.base import topk_mask
    from moyu_exp.strategies.predictor import Predictor, scores, train

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 24, generator=generator)
    truth = x @ torch.randn(24, 4, generator=generator) @ torch.randn(4, 40, generator=generator)
    labels = np.packbits(topk_mask(truth, 20).numpy(), axis=-1)
    cfg = Predictor(sparsity=0.5, rank=8, max_epochs=30, lr=1e-2, batch_size=256)
    trained = train(x.to(torch.bfloat16), labels, cfg)
    predicted = topk_mask(scores(x[1843:], trained.w1, trained.w2), 20)
    assert common.recall(predicted, topk_mask(truth[1843:], 20)).mean() > 0.85  # chance: 0.5
    assert trained.recall > 0.85 and 1 <= trained.epochs <= 30
