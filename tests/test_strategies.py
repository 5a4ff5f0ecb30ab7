"""The strategy contract on tiny_llama: exact restore, dense at sparsity 0, honest counts."""

from __future__ import annotations

import pytest
import torch

from moyu_exp.config import ConfigError, build
from moyu_exp.strategies import STRATEGIES, Strategy, keep_count
from moyu_exp.strategies.topk import TopK
from tests.conftest import TINY, attach, compose_config


def make(name: str, *overrides: str) -> Strategy:
    """A strategy from its config (not calibrated)."""
    return build(compose_config(*TINY, f"strategy={name}", *overrides).strategy)


@torch.inference_mode()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_sparsity_zero_reproduces_dense_logits_exactly(name, tiny, tiny_batch) -> None:
    dense = logits(tiny.model, tiny_batch)
    with attach(name, tiny, "sparsity=0"):
        sparse = logits(tiny.model, tiny_batch)
    assert torch.equal(dense, sparse)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_attach_restores_the_model_exactly(name, tiny, tiny_batch) -> None:
    before = logits(tiny.model, tiny_batch)
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with attach(name, tiny, "sparsity=0.6"):
        logits(tiny.model, tiny_batch)
    assert torch.equal(logits(tiny.model, tiny_batch), before)
    assert all(torch.equal(v, state[k]) for k, v in tiny.model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.model.modules())


def test_hooks_are_removed_after_an_exception(tiny, tiny_batch) -> None:
    with pytest.raises(RuntimeError, match="boom"), attach("topk", tiny, "sparsity=0.5"):
        raise RuntimeError("boom")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.model.modules())


def test_the_strategy_holds_no_state_of_a_run(tiny, tiny_batch) -> None:
    """Per-run state lives on the Attachment: the strategy's fields are its parameters only."""
    strategy = make("griffin", "sparsity=0.5")
    before = dict(vars(strategy))
    with strategy.attach(tiny.model) as live:
        logits(tiny.model, tiny_batch)
        assert live.state.frozen  # the selection is the attachment's
    assert vars(strategy) == before


def test_topk_keeps_exactly_k_entries_per_token(tiny, tiny_batch) -> None:
    seen = []
    down = tiny.model.model.layers[1].mlp.down_proj
    with attach("topk", tiny, "sparsity=0.7") as live:  # runs before the recorder below
        handle = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
        logits(tiny.model, tiny_batch)
    handle.remove()
    d_ff = tiny.model.config.intermediate_size
    k = keep_count(0.7, d_ff)
    assert k == round(0.3 * 160)
    nonzero = (seen[0] != 0).sum(-1)
    assert torch.all(nonzero == k)
    assert live.meter.site_sparsity == pytest.approx(1 - k / d_ff, abs=1e-9)
    assert live.meter.by(0) == {"mlp_intermediate": pytest.approx(1 - k / d_ff)}
    assert set(live.meter.by(1)) == {0, 1}


def test_topk_keeps_the_largest_magnitudes() -> None:
    x = torch.tensor([[[0.1, -5.0, 0.3, 2.0, -0.2]]])
    assert TopK(sparsity=0.6).select(x).tolist() == [[[False, True, False, True, False]]]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_sparsity_zero_on_a_fresh_prefill_and_decode_is_dense(name, tiny) -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.inference_mode():
        out = tiny.model(ids[:, :4], use_cache=True)
        dense = tiny.model(ids[:, 4:], cache=out.cache, use_cache=True).logits
        with attach(name, tiny, "sparsity=0"):
            out = tiny.model(ids[:, :4], use_cache=True)
            sparse = tiny.model(ids[:, 4:], cache=out.cache, use_cache=True).logits
    assert torch.equal(dense, sparse)


def test_padding_is_not_counted(tiny) -> None:
    ids = torch.tensor([[10, 11, 12, 13], [20, 21, 0, 0]])
    with attach("topk", tiny, "sparsity=0.5") as live, live.segments(torch.tensor([4, 2])):
        logits(tiny.model, ids)
    d_ff, layers = tiny.model.config.intermediate_size, 2
    assert live.meter.entries == 6 * d_ff * layers
    assert live.meter.site_sparsity == pytest.approx(0.5)


def test_attention_mask_marks_left_padding(tiny) -> None:
    ids = torch.tensor([[0, 0, 12, 13], [20, 21, 22, 23]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with attach("topk", tiny, "sparsity=0.5") as live, torch.inference_mode():
        tiny.model(input_ids=ids, attention_mask=mask)
    assert live.meter.entries == 6 * tiny.model.config.intermediate_size * 2


def test_paused_runs_dense_and_counts_nothing(tiny, tiny_batch) -> None:
    dense = logits(tiny.model, tiny_batch)
    with attach("topk", tiny, "sparsity=0.9") as live:
        with live.paused():
            assert torch.equal(logits(tiny.model, tiny_batch), dense)
        assert live.meter.counts() == {}
        assert not torch.equal(logits(tiny.model, tiny_batch), dense)


def test_measuring_gives_each_phase_its_own_meter(tiny, tiny_batch) -> None:
    with attach("topk", tiny, "sparsity=0.5") as live:
        outer = live.meter
        with live.measuring() as phase:
            logits(tiny.model, tiny_batch)
        assert phase.entries > 0 and outer.counts() == {}
        assert live.meter is outer


def test_layers_select_where_hooks_go(tiny, tiny_batch) -> None:
    with attach("topk", tiny, "sparsity=0.5", "strategy.layers=[1]") as live:
        logits(tiny.model, tiny_batch)
    assert set(live.meter.by(1)) == {1}


def test_layers_out_of_range_is_a_config_error(tiny) -> None:
    error = r"layers \[5\] out of range: the model has 2 layers"
    with pytest.raises(ConfigError, match=error), attach("topk", tiny, "strategy.layers=[0,5]"):
        pass


def test_attaching_twice_is_refused(tiny) -> None:
    live = attach("topk", tiny)
    with live, pytest.raises(RuntimeError, match="already attached"), live:
        pass


def test_dense_touches_nothing(tiny, tiny_batch) -> None:
    with attach("dense", tiny) as live:
        logits(tiny.model, tiny_batch)
        assert not any(m._forward_pre_hooks for m in tiny.model.modules())
    assert live.meter.site_sparsity == 0.0


def test_a_patched_forward_leaves_nothing_on_the_module(tiny, tiny_batch) -> None:
    """R-Sparse patches its readers' forward: on exit the class's method is uncovered again."""
    with attach("rsparse", tiny, "sparsity=0.5", "strategy.rank_share=0.3") as live:
        assert live.state.factors  # some site spends budget on low-rank factors
        logits(tiny.model, tiny_batch)
    assert not any("forward" in vars(m) for m in tiny.model.modules())


# Methods that return early at sparsity 0 (the transform, the rotation, the prompt's set, the
# split between channels and rank are then never built): at a sparsity so small that the guard
# does not fire, their machinery runs and keeps everything. Top-k rules keep k = d by themselves;
# a threshold rule is forced to 0 (every |x| >= 0). Rotations are exact up to rounding.
KEEPS_ALL = {
    "wina": ("strategy.allocation=uniform",),
    "larosa": (),
    "griffin": (),
    "clada": (),
    "tda": (),
    "moyu": ("strategy.attn_sparsity=0", "strategy.allocation=uniform"),
    "rsparse": (),
}
ROTATING = ("wina", "larosa")


@pytest.mark.parametrize("name", sorted(KEEPS_ALL))
def test_the_machinery_past_each_guard_keeps_everything_exactly(name, tiny, monkeypatch):
    from moyu_exp.strategies import rsparse, tda

    for module in (rsparse, tda):  # a threshold rule that keeps every entry
        monkeypatch.setattr(module, "threshold_at", lambda table, level: 0.0)
    ids = torch.tensor([[ord(c) for c in "Past the guard, nothing is dropped at all."]])
    dense = logits(tiny.model, ids)
    live = attach(name, tiny, "sparsity=1e-6", "strategy.prefill=dense", *KEEPS_ALL[name])
    with live, torch.inference_mode():
        assert live.strategy.sparsity > 0  # the guard did not fire
        if name in ROTATING:
            assert live._patches  # the transform / rotation is really in
        prompt = torch.tensor([ids.shape[1] // 2])
        with live.segments(torch.tensor([ids.shape[1]]), prompt):
            sparse = tiny.model(ids).logits
        counts = live.meter.counts()
    assert any(sparse for _, sparse, _ in counts.values())  # positions ran its rule
    dropped = sum(d for d, _, _ in counts.values())
    assert dropped == 0, f"{name} dropped {dropped} entries"
    if name in ROTATING:
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(sparse, dense)
