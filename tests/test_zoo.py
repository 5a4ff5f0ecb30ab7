"""Per-method behaviour of the strategy zoo on tiny_llama: counts, thresholds, calibration, and
the sequence-level split between context and continuation."""

from __future__ import annotations

import pytest
import torch

from moyu_exp import calibration, evaluation
from moyu_exp.activations import threshold_at
from moyu_exp.config import ConfigError, build
from moyu_exp.evaluation.harness import MoyuLM
from moyu_exp.strategies import STRATEGIES, keep_count
from moyu_exp.strategies.cett import mean_cett, solve_epsilon
from tests.conftest import TINY, attach, calibration_sizes, compose_config
from tests.test_strategies import make

D_FF = 160


def recorded(model, layer: int, site_module: str = "down_proj"):
    """Record what reaches ``down_proj`` of ``layer`` (after the strategy's hook)."""
    seen: list[torch.Tensor] = []
    module = getattr(model.model.layers[layer].mlp, site_module)
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    return seen, handle


@pytest.mark.parametrize("name", ["topk", "random", "static", "wina"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_topk_family_keeps_exactly_k_per_token(name, sparsity, tiny, tiny_batch) -> None:
    every_position = ["strategy.sites=[mlp_intermediate]", "strategy.prefill=sparse"]
    uniform = ["strategy.allocation=uniform"] if name == "wina" else []
    live = attach(name, tiny, f"sparsity={sparsity}", *every_position, *uniform)
    with live, torch.inference_mode():
        seen, handle = recorded(tiny.model, 0)
        tiny.model(tiny_batch)
        handle.remove()
    k = keep_count(sparsity, D_FF)
    assert torch.all((seen[0] != 0).sum(-1) == k)
    assert live.meter.site_sparsity == pytest.approx(1 - k / D_FF)


def test_random_is_seeded_and_differs_across_seeds(tiny, tiny_batch) -> None:
    def masks(seed: int) -> torch.Tensor:
        live = attach("random", tiny, "sparsity=0.5", f"strategy.seed={seed}")
        with live, torch.inference_mode():
            seen, handle = recorded(tiny.model, 0)
            tiny.model(tiny_batch)
            handle.remove()
        return seen[0] != 0

    assert torch.equal(masks(1), masks(1))
    assert not torch.equal(masks(1), masks(2))


def test_static_set_is_input_independent_and_follows_weight_norms(tiny) -> None:
    mlp = tiny.model.model.layers[1].mlp
    score = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1)
    expected = set(score.topk(keep_count(0.75, D_FF)).indices.tolist())
    live = attach("static", tiny, "sparsity=0.75", "strategy.prefill=sparse")
    with live, torch.inference_mode():
        seen, handle = recorded(tiny.model, 1)
        tiny.model(torch.tensor([[1, 2, 3, 4]]))
        tiny.model(torch.tensor([[200, 100, 50]]))
        handle.remove()
    for z in seen:
        kept = (z != 0).any(dim=(0, 1)).nonzero().flatten().tolist()
        assert set(kept) == expected


SPARSITIES = (0.0, 0.2, 0.4, 0.6, 0.8, 0.95)


def progressive(name: str) -> list[str]:
    """Thresholds calibrated in order, the target on every site (TEAL: no greedy path)."""
    uniform = ["strategy.allocation=uniform"] if name.startswith("teal") else []
    return ["strategy.threshold_mode=progressive", *uniform]


def thresholds_over_sparsity(name: str, model, *overrides: str) -> torch.Tensor:
    """(sparsity, site-layer) matrix of thresholds (channel thresholds averaged)."""
    rows = []
    for sparsity in SPARSITIES:
        with attach(name, model, f"sparsity={sparsity}", *overrides) as live:
            values = [live.kernel_rule(*key) for key in sorted(live.rules)]
            if name == "tda":
                values = list(live.state.thresholds.values())
            else:
                values = [r.threshold for r in values]
            rows.append([float(torch.as_tensor(t).float().mean()) for t in values])
    return torch.tensor(rows)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("cats", ["strategy.threshold_mode=dense"]),
        ("teal", ["strategy.threshold_mode=dense", "strategy.allocation=uniform"]),
        ("chess", ["strategy.threshold_mode=dense", "strategy.sites=[gate_act,q_input]"]),
        ("tda", []),
    ],
)
def test_thresholds_grow_with_sparsity(name, overrides, tiny) -> None:
    table = thresholds_over_sparsity(name, tiny, *overrides)
    assert torch.all(table[0] == 0)  # sparsity 0 drops nothing
    assert torch.all(table[1:] >= table[:-1])


@pytest.mark.parametrize("name", ["cats", "teal", "chess"])
def test_progressive_thresholds_grow_where_nothing_runs_before_them(name, tiny) -> None:
    """In order, the first site calibrated sees the dense model whatever the sparsity."""
    table = thresholds_over_sparsity(name, tiny, *progressive(name))
    assert torch.all(table[0] == 0)
    assert torch.all(table[1:, 0] > table[:-1, 0])


@pytest.mark.parametrize("name", ["cats", "teal", "chess"])
def test_achieved_sparsity_grows_with_the_target(name, tiny, tiny_batch) -> None:
    """Under each method's own defaults (TEAL: its greedy path, searched up to 0.9)."""
    achieved = []
    for sparsity in [s for s in SPARSITIES if name != "teal" or s <= 0.9]:
        with attach(name, tiny, f"sparsity={sparsity}") as live, torch.inference_mode():
            tiny.model(tiny_batch)
        achieved.append(live.meter.summary()["model_sparsity"])
    assert achieved[0] == 0 and achieved == sorted(achieved)


def test_quantile_threshold_interpolates_the_table() -> None:
    table = torch.linspace(0, 10, 1001)
    assert threshold_at(table, 0.0) == 0.0
    assert threshold_at(table, 0.5) == pytest.approx(5.0)
    assert threshold_at(table, 0.2345) == pytest.approx(2.345)
    assert threshold_at(table, 1.0) == pytest.approx(10.0)


@pytest.mark.parametrize("name", ["cats", "teal", "chess", "chess+"])
def test_progressive_thresholds_hit_the_target_on_the_calibration_text(name, tiny) -> None:
    plus = ["strategy.sites=[gate_act,q_input,o_proj_input]"] if name == "chess+" else []
    plus += ["strategy.prefill=sparse", *progressive(name)]
    cfg = compose_config(*TINY, f"strategy={name.rstrip('+')}", "sparsity=0.6", *plus)
    batches = calibration.token_batches(tiny.tokenizer, build(cfg.dataset), 16384, 256)
    with attach(name.rstrip("+"), tiny, "sparsity=0.6", *plus) as live, torch.inference_mode():
        tiny.model(torch.cat(batches))
    assert live.meter.site_sparsity == pytest.approx(0.6, abs=0.005)


def calibrate_with(model, *overrides: str) -> dict:
    """The calibration record of the strategy in ``overrides`` on ``model`` (test-sized)."""
    name = next((o.split("=", 1)[1] for o in overrides if o.startswith("strategy=")), "")
    cfg = compose_config(*TINY, *calibration_sizes(name, overrides), *overrides)
    return calibration.prepare(build(cfg.strategy), model, cfg)[1]


def test_calibration_is_cached_by_what_determines_it(tiny) -> None:
    progressive = "strategy.threshold_mode=progressive"  # thresholds then follow the sparsity
    first = calibrate_with(tiny, "strategy=cats", "sparsity=0.3", progressive)
    again = calibrate_with(tiny, "strategy=cats", "sparsity=0.3", progressive)
    assert (again["key"], again["cache"]) == (first["key"], "hit")
    for change in (
        "sparsity=0.4",
        "calibration.tokens=1000",
        "dataset=pydoc",
        "strategy.layers=[1]",
    ):
        changed = calibrate_with(tiny, "strategy=cats", "sparsity=0.3", progressive, change)
        assert changed["key"] != first["key"]


def test_dense_mode_calibrates_once_for_every_sparsity(tiny) -> None:
    dense = ["strategy=teal", "strategy.threshold_mode=dense", "strategy.allocation=uniform"]
    first = calibrate_with(tiny, *dense, "sparsity=0.3")
    second = calibrate_with(tiny, *dense, "sparsity=0.8")
    assert (second["key"], second["cache"]) == (first["key"], "hit")
    # with TEAL's greedy levels the key is the same too; a lower target reads the same paths
    greedy = ["strategy=teal", "strategy.threshold_mode=dense"]
    high = calibrate_with(tiny, *greedy, "sparsity=0.8")
    low = calibrate_with(tiny, *greedy, "sparsity=0.3")
    assert (low["key"], low["cache"]) == (high["key"], "hit")


def test_greedy_path_is_computed_once_for_every_sparsity(tiny, tmp_path, monkeypatch) -> None:
    from moyu_exp.strategies import greedy as search

    monkeypatch.setenv("MOYU_CACHE_DIR", str(tmp_path / "empty_cache"))
    calls = []
    original = search.greedy_path
    monkeypatch.setattr(search, "greedy_path", lambda *a: calls.append(1) or original(*a))
    greedy = ["strategy=teal", "strategy.allocation=greedy", "strategy.threshold_mode=progressive"]
    first = calibrate_with(tiny, *greedy, "sparsity=0.5")
    second = calibrate_with(tiny, *greedy, "sparsity=0.3")
    assert len(calls) == 2 and first["key"] != second["key"]  # new thresholds, one path a layer


def test_an_interrupted_greedy_search_resumes_at_its_first_unfinished_layer(
    tiny, tmp_path, monkeypatch
) -> None:
    from moyu_exp.strategies import greedy as search

    monkeypatch.setenv("MOYU_CACHE_DIR", str(tmp_path / "empty_cache"))
    original, calls = search.greedy_path, []

    def killed_in_layer_1(search, *args):
        calls.append(search.layer)
        if search.layer == 1 and calls.count(1) == 1:
            raise KeyboardInterrupt
        return original(search, *args)

    monkeypatch.setattr(search, "greedy_path", killed_in_layer_1)
    greedy = ["strategy=teal", "strategy.allocation=greedy", "sparsity=0.5"]
    with pytest.raises(KeyboardInterrupt):
        calibrate_with(tiny, *greedy)
    resumed = calibrate_with(tiny, *greedy)
    assert calls == [0, 1, 1] and resumed["cache"] == "miss"  # layer 0 was not searched again
    assert calibrate_with(tiny, *greedy)["cache"] == "hit"


def test_teal_greedy_path_reaches_the_target_model_wide(tiny) -> None:
    live = attach("teal", tiny, "sparsity=0.5", "strategy.allocation=greedy")
    for layer in (0, 1):
        path = live.calibration[f"greedy.{layer}"]
        assert path[0].tolist() == [0.0] * 5
        assert torch.all(path[1:, 0] >= path[:-1, 0])  # model-wide sparsity only grows
        assert path[-1, 0] >= 0.5  # at least as far as the target
    levels = live.strategy.site_levels(live.calibration, 0)
    assert set(levels) == {"attn_input", "o_proj_input", "mlp_input", "mlp_intermediate"}
    assert len(set(levels.values())) > 1  # greedy differs from uniform


def test_teal_rejects_an_unknown_allocation() -> None:
    with pytest.raises(ConfigError, match="allocation='best' is unknown"):
        make("teal", "strategy.allocation=best")


def test_cett_epsilon_meets_its_target() -> None:
    torch.manual_seed(0)
    z = torch.randn(256, 64) * torch.rand(64)
    weight = torch.randn(32, 64)
    eps = solve_epsilon(z, weight, target=0.2)
    contribution = z.abs() * weight.norm(dim=0)
    assert mean_cett(z, weight, contribution, eps) == pytest.approx(0.2, abs=0.005)


def test_cett_reports_the_sparsity_it_reaches(tiny, tiny_batch) -> None:
    achieved = []
    for target in (0.05, 0.3):
        live = attach("cett", tiny, "sparsity=0.5", f"strategy.target={target}")
        with live, torch.inference_mode():
            tiny.model(tiny_batch)
        achieved.append(live.meter.site_sparsity)
    assert 0 < achieved[0] < achieved[1] < 1


# ------------------------------------------------------------------------ sequence level
def griffin_keep(z: torch.Tensor, positions: slice, k: int) -> torch.Tensor:
    zn = z / z.norm(dim=-1, keepdim=True)
    return zn[:, positions].norm(dim=1).topk(k).indices


def test_sequence_level_selects_from_the_context_only(tiny) -> None:
    """One forward over context + continuation: selection from context positions, applied to the
    continuation; a selection that used the continuation would differ."""
    ids = torch.tensor([[ord(c) for c in "The cat sat on the mat. Then 12345!!"]])
    context = 24
    dense_z, handle = recorded(tiny.model, 1)
    with torch.inference_mode():
        tiny.model(ids)
    handle.remove()
    z = dense_z[0]
    k = keep_count(0.5, D_FF)
    from_context = set(griffin_keep(z, slice(0, context), k)[0].tolist())
    from_everything = set(griffin_keep(z, slice(None), k)[0].tolist())
    assert from_context != from_everything  # the case discriminates

    # under a prompt-dense protocol (GRIFFIN's own, last_token, only sparsifies the last position)
    live = attach("griffin", tiny, "sparsity=0.5", "strategy.prefill=dense")
    with live, torch.inference_mode():
        seen, handle = recorded(tiny.model, 1)
        with live.segments(torch.tensor([ids.shape[1]]), torch.tensor([context])):
            tiny.model(ids)
        handle.remove()
    z_sparse = seen[0]
    assert torch.equal(z_sparse[:, :context] != 0, z[:, :context] != 0)  # context runs dense
    for t in range(context, ids.shape[1]):
        assert set((z_sparse[0, t] != 0).nonzero().flatten().tolist()) <= from_context
    stats = live.meter.summary()
    assert stats["site_sparsity"] == pytest.approx(1 - k / D_FF, abs=0.01)
    assert stats["dense_prompt_entries"] == context * D_FF * 2


def test_sequence_level_freezes_the_prefill_selection_for_decoding(tiny) -> None:
    prompt = torch.tensor([[ord(c) for c in "Once upon a time there was"]])
    with attach("griffin", tiny, "sparsity=0.6") as live, torch.inference_mode():
        seen, handle = recorded(tiny.model, 0)
        out = tiny.model(prompt, use_cache=True)
        frozen = live.state.frozen[0][0]
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            out = tiny.model(token, cache=out.cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        handle.remove()
        assert (seen[0] != 0).all()  # the prefill ran dense
        for step in seen[1:]:
            kept = step[0, 0] != 0
            assert torch.equal(kept & ~frozen, torch.zeros_like(kept))
            assert int(kept.sum()) == keep_count(0.6, D_FF)
        tiny.model(torch.tensor([[1, 2, 3]]), use_cache=True)  # a new sequence
        assert not torch.equal(live.state.frozen[0][0], frozen)


def test_tda_keeps_neurons_above_its_calibrated_threshold(tiny) -> None:
    """Every neuron TDA keeps has its prompt statistic (the RMS over the prompt of z_t / ||z_t||,
    computed here from the dense z) at or above the layer's threshold, every dropped one below."""
    ids = torch.tensor([[ord(c) for c in "A fairly ordinary sentence about the weather today."]])
    prompt = 30
    zs: dict[int, torch.Tensor] = {}

    def grab(layer: int):
        def hook(_module, args) -> None:
            zs[layer] = args[0].detach().clone()

        return hook

    layers = tiny.model.model.layers
    handles = [b.mlp.down_proj.register_forward_pre_hook(grab(i)) for i, b in enumerate(layers)]
    with torch.inference_mode():
        tiny.model(ids)  # dense: the statistic TDA reads is the dense prompt's
    for h in handles:
        h.remove()
    with attach("tda", tiny, "sparsity=0.5") as live, torch.inference_mode():
        with live.segments(torch.tensor([ids.shape[1]]), torch.tensor([prompt])):
            tiny.model(ids)
        for layer, z in zs.items():
            unit = z[0, :prompt] / z[0, :prompt].norm(dim=-1, keepdim=True)
            statistic = unit.square().mean(dim=0).sqrt()
            threshold = live.state.thresholds[layer]
            kept = live.state.frozen[layer][0]
            assert kept.any() and (~kept).any()
            assert bool((statistic[kept] >= threshold * (1 - 1e-5)).all())
            assert bool((statistic[~kept] < threshold * (1 + 1e-5)).all())


def test_lm_eval_bridge_declares_context_lengths(tiny) -> None:
    live = attach("griffin", tiny, "sparsity=0.5")
    lm = MoyuLM(tiny, live, batch_size=4, prompt_fraction=0.5)
    captured = []
    original = live.segments

    def spy(valid, prompt=None):
        captured.append((valid.tolist(), prompt.tolist()))
        return original(valid, prompt)

    live.segments = spy
    requests = [(("a", "b"), [10, 11, 12], [13, 14]), (("c", "d"), [20], [21])]
    with live:
        lm._loglikelihood_tokens(requests, disable_tqdm=True)
    # rows are [10, 11, 12, 13] (context 3) and [20, 0, 0, 0] (context 1), sorted longest first
    assert captured == [([4, 1], [3, 1])]


def test_lm_eval_rolling_windows_use_the_prompt_fraction(tiny) -> None:
    live = attach("griffin", tiny, "sparsity=0.5")
    lm = MoyuLM(tiny, live, batch_size=4, prompt_fraction=0.5)
    lm._rolling_task = "embedded"
    captured = []
    original = live.segments
    live.segments = lambda v, p=None: captured.append(p.tolist()) or original(v, p)
    with live:
        lm._loglikelihood_tokens([(None, [256], list(range(40, 50)))], disable_tqdm=True)
    assert captured == [[5]]  # a 10-token input: first half is the prompt


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_the_embedded_eval(name, tiny) -> None:
    cfg = compose_config(*TINY, f"strategy={name}", "sparsity=0.5")
    with attach(name, tiny, "sparsity=0.5") as live:
        metrics, _ = evaluation.run(tiny, cfg.eval, live, seed=0)
    assert metrics["embedded"]["word_perplexity"] > 1
    expected_dense = name == "dense"
    assert (metrics["fidelity"]["kl"] == 0) == expected_dense
