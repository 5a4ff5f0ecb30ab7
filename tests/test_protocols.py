"""Methods as published: evaluation protocols, model-level sparsity, calibration data, and the
faithful TEAL, WINA, CHESS+ and DejaVu on tiny_llama."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from moyu_exp import calibration, datasets, evaluation
from moyu_exp.config import ConfigError, build
from moyu_exp.evaluation.harness import MoyuLM
from moyu_exp.families import adapter_for
from moyu_exp.strategies import STRATEGIES, keep_count
from moyu_exp.strategies.protocol import Positions, TokenRoles
from tests.conftest import TINY, attach, compose_config

D_FF = 160


def positions(protocol: str, roles: TokenRoles, tokens: int = 6, fraction: float = 0.5):
    x = torch.zeros(roles.valid.shape[0] if roles.valid is not None else 1, tokens, 4)
    return Positions(roles, protocol, fraction, x)


# -------------------------------------------------------------------------- protocols
def test_last_half_counts_each_rows_real_length() -> None:
    """TEAL's split: the last floor(T/2) real positions of each row, T its own length."""
    valid = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    where = positions("last_half", TokenRoles(valid, valid, declared=True))
    assert where.active.int().tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0]]
    assert int(where.sparse) == 3 and int(where.dense) == 5


def test_a_single_token_forward_runs_sparse_under_every_protocol() -> None:
    decode = TokenRoles(torch.ones(1, 1, dtype=torch.bool), None)
    for protocol in ("sparse", "dense", "last_half", "last_fraction", "last_token"):
        where = positions(protocol, decode, tokens=1)
        assert where.active.tolist() == [[True]], protocol


def test_wina_keeps_the_first_percent_of_positions_dense() -> None:
    valid = torch.ones(1, 200, dtype=torch.bool)
    where = positions("last_fraction", TokenRoles(valid, valid, fresh=True), 200, 0.99)
    assert int(where.sparse) == 198 and not where.active[0, :2].any()


def test_last_token_sparsifies_the_last_position_and_selects_from_the_rest() -> None:
    """GRIFFIN's classification mode on lm-eval rows; its generation mode on a prefill."""
    valid = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    prompt = torch.tensor([[1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    scored = positions("last_token", TokenRoles(valid, prompt, declared=True))
    assert scored.active.int().tolist() == [[0, 0, 0, 1, 0, 0]]
    assert scored.select.int().tolist() == [[1, 1, 1, 0, 0, 0]]
    prefill = positions("last_token", TokenRoles(None, torch.ones(1, 6).bool(), fresh=True))
    assert not prefill.active.any() and prefill.select.all()


def test_a_prompt_dense_protocol_scores_single_token_continuations_densely(tiny) -> None:
    """The position predicting the first continuation token is the context's last: under
    prefill=dense a one-token continuation is scored by the dense model, and the bridge says so."""
    requests = [(("a", "b"), [10, 11, 12], [13]), (("c", "d"), [20, 21], [22, 23])]
    fractions = {}
    for protocol in ("dense", "sparse", "last_token"):
        live = attach("topk", tiny, "sparsity=0.5", f"strategy.prefill={protocol}")
        lm = MoyuLM(tiny, live, batch_size=4, prompt_fraction=0.5)
        lm._task_of = {("a", "b"): "one", ("c", "d"): "two"}
        with live:
            lm._loglikelihood_tokens(requests, disable_tqdm=True)
        fractions[protocol] = {task: s / n for task, (s, n) in lm.scored.items()}
    assert fractions["dense"] == {"one": 0.0, "two": 0.5}  # "23" is predicted at "22": sparse
    assert fractions["sparse"] == {"one": 1.0, "two": 1.0}
    assert fractions["last_token"] == {"one": 1.0, "two": 0.5}


def test_results_record_the_sparse_share_of_scored_positions(tiny) -> None:
    cfg = compose_config(*TINY, "strategy=teal", "sparsity=0.5", "strategy.allocation=uniform")
    with attach("teal", tiny, "sparsity=0.5", "strategy.allocation=uniform") as live:
        _, details = evaluation.run(tiny, cfg.eval, live, seed=0)
    # rolling windows: every position is scored, the last half of each runs sparse (TEAL)
    assert details["embedded"]["sparse_scored_fraction"] == pytest.approx(0.5, abs=0.01)


def test_every_default_lives_in_the_dataclass_alone() -> None:
    """A strategy's (and a probe's) defaults are its dataclass's: its YAML only picks the schema,
    so a strategy built in code (probes do) is the one the command line composes."""
    import yaml

    from tests.conftest import CONF

    for group in ("strategy", "probe"):
        for path in sorted((CONF / group).glob("*.yaml")):
            assert set(yaml.safe_load(path.read_text())) == {"defaults"}, path.name
    for name, cls in STRATEGIES.items():
        from_yaml = build(compose_config(f"strategy={name}", "sparsity=0.5").strategy)
        in_code = cls(sparsity=0.5)
        for f in dataclasses.fields(cls):
            assert getattr(from_yaml, f.name) == getattr(in_code, f.name), (name, f.name)


@pytest.mark.parametrize(
    ("name", "protocol"),
    [("teal", "last_half"), ("wina", "last_fraction"), ("griffin", "last_token"),
     ("static", "last_token"), ("tda", "dense"), ("cats", "sparse"), ("chess", "sparse")],
)  # fmt: skip
def test_each_method_defaults_to_its_papers_protocol(name, protocol) -> None:
    assert STRATEGIES[name]().prefill == protocol


def test_a_sequence_level_method_needs_positions_to_select_from() -> None:
    with pytest.raises(ConfigError, match="selects from positions that run dense"):
        STRATEGIES["griffin"](prefill="sparse")


# ------------------------------------------------------------------ model-level sparsity
def test_achieved_sparsity_is_the_share_of_block_weights_skipped(tiny, tiny_batch) -> None:
    with attach("topk", tiny, "sparsity=0.75") as live, torch.inference_mode():
        tiny.model(tiny_batch)
    config = tiny.model.config
    d, d_ff = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    block = d * d + 2 * kv * d + d * d + 3 * d * d_ff  # q, k, v, o, gate, up, down
    dropped = d_ff - keep_count(0.75, d_ff)  # per token and layer, each skipping a down column
    summary = live.meter.summary()
    assert summary["model_sparsity"] == pytest.approx(dropped * d / block)
    assert summary["site_sparsity"] == pytest.approx(dropped / d_ff)


def test_exact_zeros_count_as_dropped_when_the_rule_drops_them(tiny) -> None:
    """A kernel skips every entry the rule does not keep, zeros included; so does the count."""
    from moyu_exp.masking import KernelRule, apply_rule

    x = torch.tensor([[[0.0, 0.0, 3.0, 0.5]]])
    _, dropped = apply_rule(x, KernelRule(threshold=1.0), None)
    assert dropped == 3


# ------------------------------------------------------------------ calibration data
def test_the_default_calibration_source_reaches_its_token_budget(tiny) -> None:
    cfg = compose_config(*TINY, "strategy=cats", "sparsity=0.5")
    _, info = calibration.prepare(build(cfg.strategy), tiny, cfg)
    assert info["tokens_used"] == info["tokens_requested"] == 16384
    assert info["rows"] == 8 and info["seq_len"] == 2048
    evaluation_text = set(datasets.embedded(split="evaluation"))
    assert not evaluation_text & set(build(cfg.dataset))  # disjoint from the evaluation text


def test_a_short_source_is_a_warning_that_names_it(tiny, caplog) -> None:
    cfg = compose_config(*TINY, "strategy=cats", "dataset=embedded", "calibration.tokens=50000")
    with caplog.at_level(logging.WARNING):
        _, info = calibration.prepare(build(cfg.strategy), tiny, cfg)
    assert info["tokens_used"] < 50000
    assert "dataset 'embedded' has only" in caplog.text


def test_pydoc_documentation_is_long_enough_for_a_predictor() -> None:
    text = "\n\n".join(datasets.pydoc_topics())
    assert len(text) > 800_000  # ~200K tokens for a BPE tokenizer


# ---------------------------------------------------------------------------- TEAL
def test_teal_histogram_threshold_is_teals_icdf() -> None:
    from moyu_exp.strategies.teal import histogram_threshold, teal_histogram

    values = torch.linspace(-1, 1, 200_001)  # uniform: |x| < t for a fraction t
    histogram = teal_histogram(values)
    assert histogram.shape == (2, 10_000)
    assert histogram_threshold(histogram, 0.5) == pytest.approx(0.5, abs=1e-3)
    assert histogram_threshold(histogram, 0.0) == 0.0


def test_teal_greedy_error_is_the_norm_over_positions_of_the_last_quarter(tiny) -> None:
    from moyu_exp.activations import capture_block_inputs
    from moyu_exp.strategies.greedy import BlockSearch

    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    captured = capture_block_inputs(tiny.model, [1], ids)[1]
    search = BlockSearch(tiny.model, 1, ["mlp_intermediate"], captured, lambda s, lv, x: x * 0.5)
    (error,) = search.errors([{"mlp_intermediate": 0.5}])
    adapter = adapter_for(tiny.model)
    block = adapter.layers(tiny.model)[1]
    args, kwargs = captured
    kwargs = dict(kwargs)
    x = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
    with torch.inference_mode():
        h = adapter.attention_residual(block, x, kwargs)
        branch = block.mlp(block.post_attention_layernorm(h))
    # halving down's input halves the MLP branch: y_dense - y = branch / 2, on the last quarter
    expected = (0.5 * branch)[:, 12:].float().norm(dim=1).mean()
    assert error == pytest.approx(float(expected), rel=1e-5)


def test_teal_greedy_path_reaches_the_target_and_runs_the_paper_protocol(tiny) -> None:
    live = attach("teal", tiny, "sparsity=0.5")
    teal = live.strategy
    assert (teal.allocation, teal.prefill, teal.threshold_mode) == ("greedy", "last_half", "dense")
    for layer in (0, 1):
        path = live.calibration[f"greedy.{layer}"]
        assert path[0].tolist() == [0.0] * 5
        # at least as far as the target (test_calibration: no further than it needs)
        assert torch.all(path[1:, 0] >= path[:-1, 0]) and path[-1, 0] >= 0.5


# ---------------------------------------------------------------------------- WINA
@pytest.mark.parametrize(
    "sites",
    [
        [],  # WINA's seven projections
        ["strategy.sites=[k_input,gate_input,mlp_intermediate]"],  # q, v, up read unrotated
        ["strategy.sites=[o_proj_input,up_input]"],  # the attention input is not rotated
    ],
)
def test_wina_transform_leaves_the_function_unchanged(sites, own_tiny, tiny_batch) -> None:
    """Rotation folded into the weights, sites expressed in the rotated basis: with every entry
    kept the model computes what it did (up to rounding), and it is restored exactly. With
    some projections not sites, their readers get the folded gain without the rotation."""
    tiny = own_tiny  # its gains change below: not the model other tests share
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # gains other than 1 (a random init has none), so folding shows
        for name, param in tiny.model.named_parameters():
            if "layernorm" in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=gen))
    with torch.inference_mode():
        dense = tiny.model(tiny_batch).logits
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    live = attach("wina", tiny, "sparsity=0.001", "strategy.allocation=uniform", *sites)
    with live, torch.inference_mode():
        assert live._patches  # the rotation is folded into q, k, v, gate and up
        rotated = tiny.model(tiny_batch).logits
        with live.paused():
            assert torch.equal(tiny.model(tiny_batch).logits, dense)
    torch.testing.assert_close(rotated, dense, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in tiny.model.state_dict().items())


def test_wina_masks_each_projection_with_its_own_score(tiny) -> None:
    live = attach("wina", tiny, "sparsity=0.5", "strategy.allocation=uniform")
    with live:
        rules = live.rules
        block = adapter_for(tiny.model).layers(tiny.model)[0]
        # k_proj and gate_proj: column norms of the transformed weights (singular values)
        singular = torch.linalg.svdvals(
            block.self_attn.k_proj.weight.double() * block.input_layernorm.weight.double()
        )
        scale = rules[("k_input", 0)].scale.double()
        torch.testing.assert_close(
            scale.sort(descending=True).values[: len(singular)], singular, rtol=1e-4, atol=1e-5
        )
        assert rules[("q_input", 0)].scale is None and rules[("up_input", 0)].scale is None
        assert live.bases[("q_input", 0)] is live.bases[("v_input", 0)]


def test_wina_has_a_kernel_path_and_pays_for_its_rotations(tiny) -> None:
    """With and without the transform; transformed, each rotated input's x R (d x d weights a
    token) is counted once, at the first site that reads it (q's input, gate's input)."""
    plain = build(compose_config("strategy=wina", "strategy.transform=false").strategy)
    assert plain.kernel_support
    live = attach("wina", tiny, "sparsity=0.5", "strategy.allocation=uniform")
    assert live.strategy.kernel_support
    with live:
        d = tiny.model.config.hidden_size
        layers = range(tiny.model.config.num_hidden_layers)
        expected = {(s, i): d * d for s in ("q_input", "gate_input") for i in layers}
        assert live.cost.extra_weights == expected


# ---------------------------------------------------------------------------- CHESS+
def test_chess_plus_sparsifies_q_alone(tiny, tiny_batch) -> None:
    attn = tiny.model.model.layers[0].self_attn
    seen = {}
    live = attach("chess", tiny, "sparsity=0.5", "strategy.sites=[gate_act,q_input,o_proj_input]")
    with live, torch.inference_mode():  # recorders run after the strategy's own hooks
        hooks = [
            getattr(attn, name).register_forward_pre_hook(
                lambda _m, args, name=name: seen.__setitem__(name, args[0].clone())
            )
            for name in ("q_proj", "k_proj")
        ]
        tiny.model(tiny_batch)
        for hook in hooks:
            hook.remove()
    assert (seen["q_proj"] == 0).float().mean() > 0.3  # q reads the sparse input
    assert (seen["k_proj"] == 0).float().mean() < 0.01  # k (and v) the dense one


# ---------------------------------------------------------------------------- DejaVu
def test_the_predictor_reads_the_block_input_and_trains_to_early_stopping(tiny) -> None:
    overrides = [
        "sparsity=0.5",
        "strategy.train_tokens=1536",
        "strategy.max_epochs=6",
        "strategy.rank=16",
    ]
    live = attach("predictor", tiny, *overrides)
    state = live.calibration
    recall, epochs = state["recall.0"].tolist()
    assert 0.5 < recall <= 1.0 and 1 <= epochs <= 6
    ids = torch.tensor([[ord(c) for c in "The lighthouse keeper rose before dawn to trim."]])
    inputs = []
    with live, torch.inference_mode():

        def grab(_module, args, kwargs):
            inputs.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

        handle = tiny.model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        tiny.model(ids)
        handle.remove()
        w1, w2 = live.state.weights[0]
        expected = (inputs[0] @ w1.T) @ w2.T
        torch.testing.assert_close(live.state.scores[0], expected)


def test_the_predictor_asks_for_its_training_tokens_plus_a_validation_split() -> None:
    predictor = STRATEGIES["predictor"](train_tokens=90_000, validation_fraction=0.1)
    assert predictor.calibration_tokens(16384) == 100_000


def test_wina_paths_searched_before_the_gain_fix_are_not_reused() -> None:
    """A transform over some of a block's projections gets a calibration key of its own (its
    greedy paths were searched on a model whose other readers lost the norm's gain)."""

    def key(*overrides: str) -> dict:
        cfg = compose_config("strategy=wina", "sparsity=0.5", *overrides)
        return build(cfg.strategy).calibration_key()

    partial = key("strategy.sites=[k_input,gate_input,mlp_intermediate]")["greedy"]
    assert partial.get("gain_folded_for_every_reader") is True
    assert "gain_folded_for_every_reader" not in key()["greedy"]  # all seven: paths stay valid
    assert (
        "gain_folded_for_every_reader"
        not in key("strategy.sites=[k_input,gate_input]", "strategy.transform=false")["greedy"]
    )
