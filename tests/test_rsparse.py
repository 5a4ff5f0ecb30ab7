"""R-Sparse: every split spends the same budget, readers compute the sparse part plus the rank-r
remainder, the meter charges the factors, and the search minimises the output error."""

from __future__ import annotations

import pytest
import torch

from moyu_exp.strategies.rsparse import candidates, factors, stacked
from tests.conftest import attach


@pytest.mark.parametrize(("d", "out"), [(576, 1728), (1536, 576), (64, 64)])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_every_split_spends_the_budget(d, out, sparsity) -> None:
    budget = (1 - sparsity) * d * out
    splits = candidates(sparsity, d, out, 10)
    assert splits[0] == (pytest.approx(sparsity), 0)  # all on channels first
    for level, rank in splits:
        assert 0 <= level < 1
        assert (1 - level) * d * out + rank * (d + out) == pytest.approx(budget, rel=1e-9)
    assert [r for _, r in splits] == sorted({r for _, r in splits})


@pytest.mark.parametrize("site", ["attn_input", "o_proj_input", "mlp_input", "mlp_intermediate"])
def test_readers_add_the_low_rank_path_of_what_the_mask_drops(tiny, tiny_batch, site) -> None:
    from moyu_exp.families import hooked

    key = (site, 1)
    live = attach("rsparse", tiny, "sparsity=0.5", "strategy.rank_share=0.3")
    seen, inputs = {}, []
    # hooked before the attachment, so the observer sees the input before the mask
    with hooked(tiny.model, [(key, lambda x: inputs.append(x) or x)]), live:
        readers = live.state.readers[key]
        handles = [
            r.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (a[0], o)))
            for i, r in enumerate(readers)
        ]
        with torch.inference_mode():
            tiny.model(tiny_batch)
        for h in handles:
            h.remove()
        rule = live.state.rules[key]
        v = live.state.factors[key][0]
        assert key not in live.state.inputs  # the unmasked input is not kept after its use
    x = inputs[0]
    kept = x.masked_fill(~rule.mask(x), 0.0)
    rank = v.shape[1]
    weight = stacked(readers)
    v_ref, us_ref = factors(weight, rank)
    expected = kept @ weight.t() + ((x - kept).double() @ v_ref @ us_ref.t()).to(x.dtype)
    got = torch.cat([seen[i][1] for i in range(len(readers))], dim=-1)
    assert torch.equal(seen[0][0], kept)  # the reader reads the masked input
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert rank > 0


def test_the_meter_charges_the_factors(tiny, tiny_batch) -> None:
    share = "strategy.rank_share=0.3"
    with attach("rsparse", tiny, "sparsity=0.5", share) as live, torch.inference_mode():
        tiny.model(tiny_batch)
        counts = live.meter.counts()
        cost = live.cost
        extra = live.state.extra
    assert extra and cost.extra_weights == extra
    skipped = sum(
        c[0] / c[1] * cost.weights_per_entry[k] - extra.get(k, 0) for k, c in counts.items()
    )
    summary = live.meter.summary()
    assert summary["model_sparsity"] == pytest.approx(skipped / cost.block_weights)
    # each (site, layer) spent its budget: the site sparsity is near the target
    assert summary["site_sparsity"] == pytest.approx(0.5, abs=0.1)


def test_the_search_picks_the_least_error_split(tiny) -> None:
    """Recompute one (site, layer)'s output error for every split by brute force (the full
    product, not the SVD shortcut): the search's choice is the least."""
    from moyu_exp.activations import observe, threshold_at
    from moyu_exp.strategies.rsparse import RSparse, budget_search
    from moyu_exp.strategies.teal import dense_statistics

    torch.manual_seed(0)
    batches = [torch.randint(0, tiny.model.config.vocab_size, (1, 128)) for _ in range(2)]
    rsparse = RSparse(sparsity=0.7, search_tokens=128)
    layers = rsparse.layer_ids(tiny.model)
    tables = dense_statistics(tiny.model, batches, rsparse.sites, layers)
    chosen = budget_search(tiny.model, batches, rsparse, tables)
    site, layer = "mlp_intermediate", 1
    seen = []
    observe(tiny.model, batches[:1], [(site, layer)], lambda s, i, x: seen.append(x.double()))
    x = seen[0].reshape(-1, seen[0].shape[-1])
    weight = stacked(live_readers(tiny, site, layer)).double()
    errors = []
    splits = candidates(0.7, weight.shape[1], weight.shape[0], rsparse.rank_grid)
    for level, rank in splits:
        keep = x.abs() >= threshold_at(tables[f"table.{site}.{layer}"], level)
        v, us = factors(weight, rank)
        approx = (x * keep) @ weight.t() + (x * ~keep) @ v @ us.t()
        errors.append(float((x @ weight.t() - approx).square().sum()))
    best = splits[min(range(len(errors)), key=errors.__getitem__)]
    assert (float(chosen[f"level.{site}.{layer}"]), int(chosen[f"rank.{site}.{layer}"])) == (
        pytest.approx(best[0]),
        best[1],
    )
    assert len(splits) > 1 and splits[0][1] == 0 < splits[-1][1]


def live_readers(tiny, site: str, layer: int):
    from moyu_exp.families import adapter_for

    adapter = adapter_for(tiny.model)
    return adapter.readers(adapter.layers(tiny.model)[layer], site)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_kernel_mode_adds_the_low_rank_path(tiny, backend, monkeypatch) -> None:
    from moyu_exp.kernels import native
    from tests.test_kernels import assert_same_decode, kernel, ready, simulated

    if backend == "torch":
        monkeypatch.setattr(native, "load", lambda: None)
    share = "strategy.rank_share=0.3"
    expected = simulated(tiny, ready("rsparse", tiny, 0.5, share))
    got, decoder, meter = kernel(tiny, ready("rsparse", tiny, 0.5, share))
    # the remainder runs in the native whole step (in the Python step on stock PyTorch ops)
    assert (decoder.fused is not None) == (backend == "native")
    assert_same_decode(expected, got)
    assert meter.cost.extra_weights and meter.summary()["model_sparsity"] > 0
