"""LaRoSA: an orthogonal PCA basis per layer, a rotated model equal to the original when
nothing is dropped, exactly k entries per token in the rotated basis, rotations charged."""

from __future__ import annotations

import pytest
import torch

from moyu_exp.masking import KernelRule
from moyu_exp.strategies.base import keep_count
from moyu_exp.strategies.larosa import pca_rotation
from tests.conftest import attach


def test_the_basis_is_the_damped_covariances_eigenvectors() -> None:
    x = torch.randn(500, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    moments = x.t() @ x
    q = pca_rotation(moments, 0.01)
    torch.testing.assert_close(q.t() @ q, torch.eye(8, dtype=torch.float64))
    damped = moments + 0.01 * moments.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    diagonal = q.t() @ damped @ q
    torch.testing.assert_close(diagonal, torch.diag(diagonal.diagonal()), atol=1e-8, rtol=0)


@torch.inference_mode()
def test_the_rotated_model_equals_the_original_when_nothing_is_dropped(tiny, tiny_batch) -> None:
    dense = tiny.model(tiny_batch).logits
    live = attach("larosa", tiny, "sparsity=0.5")
    with live:
        assert live.bases and live.patches_weights
        for key in list(live.rules):
            live.rules[key] = KernelRule(k=live.cost.dims[key])  # keep every entry
        rotated = tiny.model(tiny_batch).logits
    assert not torch.equal(rotated, dense)  # the weights really were rotated
    torch.testing.assert_close(rotated, dense, rtol=1e-4, atol=1e-4)
    assert torch.equal(tiny.model(tiny_batch).logits, dense)  # restored


@torch.inference_mode()
def test_each_token_keeps_exactly_k_in_the_rotated_basis(tiny, tiny_batch) -> None:
    seen = []
    q_proj = tiny.model.model.layers[1].self_attn.q_proj
    with attach("larosa", tiny, "sparsity=0.5") as live:
        handle = q_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        tiny.model(tiny_batch)
        handle.remove()
        summary = live.meter.summary()
        extra = live.cost.extra_weights
    d = tiny.model.config.hidden_size
    assert torch.all((seen[0] != 0).sum(-1) == keep_count(0.4, d))  # 0.8 x 0.5 of x Q_l
    d_ff = tiny.model.config.intermediate_size
    assert summary["by_site"]["mlp_intermediate"] == pytest.approx(1 - keep_count(0.6, d_ff) / d_ff)
    layers = tiny.model.config.num_hidden_layers
    assert extra == {(s, i): d * d for s in ("attn_input", "mlp_input") for i in range(layers)}


def test_without_rotation_the_levels_stay(tiny, tiny_batch) -> None:
    live = attach("larosa", tiny, "sparsity=0.5", "strategy.rotate=false")
    assert live.calibration is None  # nothing to calibrate without the rotation
    with live, torch.inference_mode():
        tiny.model(tiny_batch)
        assert not live.bases and not live.cost.extra_weights
        d = tiny.model.config.hidden_size
        assert live.meter.by(0)["attn_input"] == pytest.approx(1 - keep_count(0.4, d) / d)


def test_the_paired_bench_runs_the_dense_side_with_the_original_weights(tiny) -> None:
    """A strategy that patches weights must not leak them into the dense reference."""
    from moyu_exp import bench
    from moyu_exp.decode import ModelStepper, greedy

    ids = torch.tensor([tiny.tokenizer("The lighthouse keeper rose before").input_ids])
    tokens, _ = greedy(ModelStepper(tiny.model), ids, 6)
    captured = {}
    original = bench.steps

    def spy(decoder, token, count):
        if decoder.live is None and "dense" not in captured:
            captured["dense"] = [token]
            for _ in range(count):
                token = int(decoder.step(token).argmax())
                captured["dense"].append(token)
            return token
        return original(decoder, token, count)

    live = attach("larosa", tiny, "sparsity=0.5")
    with live:
        bench.steps, saved = spy, bench.steps
        try:
            bench.paired(tiny, live, ids, decode_tokens=5, rounds=2, burn_in=5, progress=False)
        finally:
            bench.steps = saved
    assert captured["dense"] == tokens
