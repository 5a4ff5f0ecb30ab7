"""The strategy contract on tiny_llama: exact restore, dense at sparsity 0, honest counts."""

from __future__ import annotations

import pytest
import torch

from moyu_exp import calibration
from moyu_exp.config import ConfigError, build
from moyu_exp.strategies import STRATEGIES, Strategy, keep_count
from moyu_exp.strategies.topk import TopK
from tests.conftest import TINY, compose_config


def make(name: str, *overrides: str, model=None) -> Strategy:
    """A strategy from its config; calibrated on ``model`` when it needs calibration."""
    cfg = compose_config(*TINY, f"strategy={name}", *overrides)
    strategy = build(cfg.strategy)
    if model is not None:
        calibration.prepare(strategy, model, cfg)
    return strategy


@torch.inference_mode()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_sparsity_zero_reproduces_dense_logits_exactly(name, tiny, tiny_batch) -> None:
    dense = logits(tiny.model, tiny_batch)
    with make(name, "sparsity=0", model=tiny).attach(tiny.model):
        sparse = logits(tiny.model, tiny_batch)
    assert torch.equal(dense, sparse)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_attach_restores_the_model_exactly(name, tiny, tiny_batch) -> None:
    before = logits(tiny.model, tiny_batch)
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    strategy = make(name, "sparsity=0.6", model=tiny)
    with strategy.attach(tiny.model):
        logits(tiny.model, tiny_batch)
    assert torch.equal(logits(tiny.model, tiny_batch), before)
    assert all(torch.equal(v, state[k]) for k, v in tiny.model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.model.modules())


def test_hooks_are_removed_after_an_exception(tiny, tiny_batch) -> None:
    strategy = make("topk", "sparsity=0.5")
    with pytest.raises(RuntimeError, match="boom"), strategy.attach(tiny.model):
        raise RuntimeError("boom")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.model.modules())


def test_topk_keeps_exactly_k_entries_per_token(tiny, tiny_batch) -> None:
    seen = []
    down = tiny.model.model.layers[1].mlp.down_proj
    strategy = make("topk", "sparsity=0.7")
    with strategy.attach(tiny.model) as live:  # runs before the recorder registered below
        handle = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
        logits(tiny.model, tiny_batch)
        stats = live.stats()
    handle.remove()
    d_ff = tiny.model.config.intermediate_size
    k = keep_count(0.7, d_ff)
    assert k == round(0.3 * 160)
    nonzero = (seen[0] != 0).sum(-1)
    assert torch.all(nonzero == k)
    assert stats.overall == pytest.approx(1 - k / d_ff, abs=1e-9)
    assert stats.by(0) == {"mlp_intermediate": pytest.approx(1 - k / d_ff)}
    assert set(stats.by(1)) == {0, 1}


def test_topk_keeps_the_largest_magnitudes() -> None:
    x = torch.tensor([[[0.1, -5.0, 0.3, 2.0, -0.2]]])
    y = TopK(sparsity=0.6).sparsify("mlp_intermediate", 0, x)
    assert y.tolist() == [[[0.0, -5.0, 0.0, 2.0, 0.0]]]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_sparsity_zero_on_a_fresh_prefill_and_decode_is_dense(name, tiny) -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.inference_mode():
        out = tiny.model(ids[:, :4], use_cache=True)
        dense = tiny.model(ids[:, 4:], cache=out.cache, use_cache=True).logits
        strategy = make(name, "sparsity=0", model=tiny)
        with strategy.attach(tiny.model):
            out = tiny.model(ids[:, :4], use_cache=True)
            sparse = tiny.model(ids[:, 4:], cache=out.cache, use_cache=True).logits
    assert torch.equal(dense, sparse)


def test_padding_is_not_counted(tiny) -> None:
    ids = torch.tensor([[10, 11, 12, 13], [20, 21, 0, 0]])
    strategy = make("topk", "sparsity=0.5")
    with strategy.attach(tiny.model) as live, live.segments(torch.tensor([4, 2])):
        logits(tiny.model, ids)
    d_ff, layers = tiny.model.config.intermediate_size, 2
    assert live.stats().entries == 6 * d_ff * layers


def test_attention_mask_marks_left_padding(tiny) -> None:
    ids = torch.tensor([[0, 0, 12, 13], [20, 21, 22, 23]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    strategy = make("topk", "sparsity=0.5")
    with strategy.attach(tiny.model) as live, torch.inference_mode():
        tiny.model(input_ids=ids, attention_mask=mask)
    assert live.stats().entries == 6 * tiny.model.config.intermediate_size * 2


def test_paused_runs_dense_and_counts_nothing(tiny, tiny_batch) -> None:
    dense = logits(tiny.model, tiny_batch)
    strategy = make("topk", "sparsity=0.9")
    with strategy.attach(tiny.model) as live:
        with live.paused():
            assert torch.equal(logits(tiny.model, tiny_batch), dense)
        assert live.stats().counts == {}
        assert not torch.equal(logits(tiny.model, tiny_batch), dense)


def test_layers_select_where_hooks_go(tiny, tiny_batch) -> None:
    strategy = make("topk", "sparsity=0.5", "strategy.layers=[1]")
    with strategy.attach(tiny.model) as live:
        logits(tiny.model, tiny_batch)
    assert set(live.stats().by(1)) == {1}


def test_layers_out_of_range_is_a_config_error(tiny) -> None:
    strategy = make("topk", "strategy.layers=[0,5]")
    error = r"layers \[5\] out of range: the model has 2 layers"
    with pytest.raises(ConfigError, match=error), strategy.attach(tiny.model):
        pass


def test_attaching_twice_is_refused(tiny) -> None:
    strategy = make("topk")
    with (
        strategy.attach(tiny.model),
        pytest.raises(RuntimeError, match="already attached"),
        strategy.attach(tiny.model),
    ):
        pass


def test_dense_touches_nothing(tiny, tiny_batch) -> None:
    with make("dense").attach(tiny.model) as live:
        logits(tiny.model, tiny_batch)
        assert not any(m._forward_pre_hooks for m in tiny.model.modules())
    assert live.stats().overall == 0.0
