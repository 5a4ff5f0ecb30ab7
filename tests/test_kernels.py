"""Kernel mode: the lean decoder with sparse kernels must match simulated mode (allclose) for
every strategy that supports it, on every backend; bytes and stats are accounted for."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch

from moyu_exp import runner
from moyu_exp.config import ConfigError, build
from moyu_exp.decode import ModelStepper, greedy
from moyu_exp.families import adapter_for
from moyu_exp.kernels import native
from moyu_exp.kernels.decoder import LeanDecoder
from moyu_exp.masking import KernelRule, apply_rule
from moyu_exp.strategies import STRATEGIES, keep_count
from tests.conftest import TINY, attach, calibration_sizes, compose_config

# strategies with a kernel path, by their default config, plus variants of other paths
KERNEL_STRATEGIES = [
    *sorted(
        n for n in STRATEGIES if build(compose_config(f"strategy={n}").strategy).kernel_support
    ),
    "chess+",
    "wina-plain",
    "wina-projections",
    "moyu+mlp_input",
]
VARIANTS = {
    # a per-token rule on the compact MLP's input: the compact gate_up read by kept columns
    "moyu+mlp_input": ("moyu", ["strategy.mlp_input_sparsity=0.4"]),
    "chess+": ("chess", ["strategy.sites=[gate_act,q_input,o_proj_input]"]),
    # a mask per projection (q, k, v, o, gate, up, down), without the transform's rotations
    "wina-projections": ("wina", ["strategy.transform=false", "strategy.allocation=uniform"]),
    "wina-plain": (  # the one-mask-per-input variant without the transform
        "wina",
        [
            "strategy.transform=false",
            "strategy.sites=[attn_input,o_proj_input,mlp_input,mlp_intermediate]",
            "strategy.allocation=uniform",
            "strategy.prefill=sparse",
        ],
    ),
}
STEPS = 8
PYTHON_STEP = {"random"}  # its masks are drawn, not stated as a rule


def prompt(tiny) -> torch.Tensor:
    return torch.tensor(
        [tiny.tokenizer("The lighthouse keeper rose before dawn to trim").input_ids]
    )


def ready(name: str, tiny, sparsity: float = 0.5, *overrides: str):
    name, extra = VARIANTS.get(name, (name, []))
    return attach(name, tiny, f"sparsity={sparsity}", *extra, *overrides)


def simulated(tiny, live) -> torch.Tensor:
    """Greedy decode with the model's own forward and the strategy's hooks."""
    with live:
        _, logits = greedy(ModelStepper(tiny.model), prompt(tiny), STEPS + 1)
    return logits[1:]


def kernel(tiny, live, fuse: bool = True):
    with live:
        decoder = LeanDecoder(tiny.model, live, max_tokens=64, fuse=fuse)
        logits = [decoder.prefill(prompt(tiny))]
        with live.measuring() as meter:  # count the decode steps only
            for _ in range(STEPS):
                logits.append(decoder.step(int(logits[-1].argmax())))
            decoder.flush()
        return torch.stack(logits[1:]), decoder, meter


def assert_same_decode(expected: torch.Tensor, got: torch.Tensor) -> None:
    assert torch.equal(expected.argmax(-1), got.argmax(-1))
    torch.testing.assert_close(got.to(expected.dtype), expected, rtol=1e-4, atol=1e-4)


needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


@needs_compiler
@pytest.mark.parametrize("name", KERNEL_STRATEGIES)
def test_native_kernels_match_simulated_mode(name, tiny) -> None:
    """Every rule (rotated inputs, low-rank paths and per-projection masks included) runs as
    one native call a step; only masks that are not rules run through the Python step."""
    expected = simulated(tiny, ready(name, tiny))
    got, decoder, _ = kernel(tiny, ready(name, tiny))
    assert decoder.backend.startswith("native")
    assert (decoder.fused is not None) == (name not in PYTHON_STEP)
    assert_same_decode(expected, got)


@needs_compiler
@pytest.mark.parametrize("name", KERNEL_STRATEGIES)
def test_python_step_matches_simulated_mode(name, tiny) -> None:
    """The unfused path (one kernel call per operation) agrees too."""
    expected = simulated(tiny, ready(name, tiny))
    got, decoder, _ = kernel(tiny, ready(name, tiny), fuse=False)
    assert decoder.fused is None
    assert_same_decode(expected, got)


@pytest.mark.parametrize("name", KERNEL_STRATEGIES)
def test_stock_torch_kernels_match_simulated_mode(name, tiny, monkeypatch) -> None:
    """Where no compiler is found (or on CUDA) stock PyTorch ops run the same kernels."""
    monkeypatch.setattr(native, "load", lambda: None)
    expected = simulated(tiny, ready(name, tiny))
    got, decoder, _ = kernel(tiny, ready(name, tiny))
    assert decoder.backend == "torch"
    assert_same_decode(expected, got)


@pytest.mark.parametrize("fuse", [True, False])
def test_topk_reads_exactly_the_kept_down_columns(tiny, fuse) -> None:
    _, _, meter = kernel(tiny, ready("topk", tiny, 0.75), fuse=fuse)
    config, esize = tiny.model.config, 4
    d, d_ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    skipped = (d_ff - keep_count(0.75, d_ff)) * d * layers * esize
    summary = meter.summary()
    assert summary["weight_bytes_per_token"] == summary["dense_weight_bytes_per_token"] - skipped
    assert meter.site_sparsity == pytest.approx(1 - keep_count(0.75, d_ff) / d_ff)
    assert meter.entries == STEPS * d_ff * layers


@pytest.mark.parametrize("name", KERNEL_STRATEGIES)
def test_simulated_and_kernel_mode_count_the_same_entries(name, tiny) -> None:
    """The same decode steps, counted by the hooks (simulated) and by the kernels."""
    live = ready(name, tiny)
    with live:
        stepper = ModelStepper(tiny.model)
        token = int(stepper.prefill(prompt(tiny)).argmax())
        with live.measuring() as hooks:
            for _ in range(STEPS):
                token = int(stepper.step(token).argmax())
    _, _, kernels = kernel(tiny, ready(name, tiny))
    assert kernels.counts() == hooks.counts()
    assert kernels.summary()["ideal_speedup"] == pytest.approx(hooks.summary()["ideal_speedup"])


@pytest.mark.parametrize("fuse", [True, False])
def test_an_input_rule_on_a_compact_mlp_skips_only_its_kept_rows_columns(tiny, fuse) -> None:
    """moyu with mlp_input_sparsity: a dropped input entry saves 2 k weights (the kept gate and
    up rows' column), not 2 d_ff; what the kernels skip is what the cost model counts."""
    _, decoder, meter = kernel(tiny, ready("moyu+mlp_input", tiny), fuse=fuse)
    assert (decoder.fused is not None) == (fuse and native.load() is not None)
    d = tiny.model.config.hidden_size
    counts, skipped = meter.counts(), 0.0
    for i, layer in enumerate(decoder.layers):
        kept = layer.compact[1].shape[1]
        assert layer.compact_t.shape == (d, 2 * kept)
        assert not {"mlp_input", "down"} & set(layer.t)  # no full copy is built beside it
        inputs, steps, _ = counts[("mlp_input", i)]
        assert steps == STEPS and 0 < inputs < STEPS * d
        skipped += inputs / steps * 2 * kept + counts[("mlp_intermediate", i)][0] / steps * 3 * d
        for site, readers in (("attn_input", decoder.w.layers[i].qkv), ("o_proj_input", None)):
            per_entry = readers.shape[0] if readers is not None else d
            skipped += counts[(site, i)][0] / steps * per_entry
    assert meter.skipped_per_token() == pytest.approx(skipped)


def test_a_full_sparse_mlp_gets_its_transposed_copies_at_the_prefill(tiny) -> None:
    """Without a compact MLP (TEAL), mlp_input and mlp_intermediate read the whole gate_up^T
    and down^T, built at the prefill."""
    d, d_ff = tiny.model.config.hidden_size, tiny.model.config.intermediate_size
    live = ready("teal", tiny)
    with live:
        decoder = LeanDecoder(tiny.model, live, max_tokens=64)
        assert all(not {"mlp_input", "down"} & set(layer.t) for layer in decoder.layers)
        decoder.prefill(prompt(tiny))
        for layer in decoder.layers:
            assert layer.t["mlp_input"].shape == (d, 2 * d_ff)
            assert layer.t["down"].shape == (d_ff, d)


def test_dense_bytes_count_every_weight_read(tiny) -> None:
    cost = adapter_for(tiny.model).cost_model(tiny.model)
    linears = sum(
        p.numel() for n, p in tiny.model.named_parameters() if "proj" in n and "weight" in n
    )
    embedding_row = tiny.model.config.hidden_size
    expected = (linears + tiny.model.lm_head.weight.numel() + embedding_row) * 4
    assert cost.dense_bytes == expected


def test_sequence_level_methods_decode_with_a_compact_mlp(tiny) -> None:
    _, decoder, meter = kernel(tiny, ready("griffin", tiny, 0.5))
    d_ff, d = tiny.model.config.intermediate_size, tiny.model.config.hidden_size
    assert all(layer.compact[1].shape[1] == keep_count(0.5, d_ff) for layer in decoder.layers)
    assert meter.site_sparsity == pytest.approx(0.5, abs=0.01)
    # a neuron missing from the compact MLP skips its gate row, up row and down column
    skipped = (d_ff - keep_count(0.5, d_ff)) * 3 * d * 2 * 4
    summary = meter.summary()
    assert summary["dense_weight_bytes_per_token"] - summary["weight_bytes_per_token"] == skipped


def test_a_reselected_set_swaps_only_the_neurons_that_changed(tiny, monkeypatch) -> None:
    """A re-selection of the same size (CLADA's) rewrites, in place, only the slots of the
    neurons that left; after a step on the full MLP (a refresh) the parked compact MLP serves
    the next set. Each slot holds its neuron's gate and up rows and down column."""
    live = ready("griffin", tiny, 0.5)
    with live, torch.inference_mode():
        decoder = LeanDecoder(tiny.model, live, max_tokens=64)
        decoder.prefill(prompt(tiny))
        layer, w, d_ff = decoder.layers[0], decoder.layers[0].w, decoder.d_ff
        before = [t.data_ptr() for t in layer.compact]
        keep = live.decode_neurons(0).clone()
        out, into = keep.nonzero()[:2].view(-1), (~keep).nonzero()[:2].view(-1)
        keep[out], keep[into] = False, True
        sets = {0: keep}
        monkeypatch.setattr(live, "decode_neurons", lambda i: sets.get(i))
        decoder._compact_mlps()
        assert [t.data_ptr() for t in layer.compact] == before  # in place
        assert sorted(layer.slots.tolist()) == keep.nonzero().view(-1).tolist()
        sets[0] = None  # a refresh step: the full MLP, the compact one parked
        decoder._compact_mlps()
        assert layer.compact is None and layer.parked is not None
        sets[0] = keep
        decoder._compact_mlps()
        assert [t.data_ptr() for t in layer.compact] == before
        gate_up, down = layer.compact
        slots = layer.slots
        assert torch.equal(gate_up, torch.cat([w.gate_up[slots], w.gate_up[d_ff + slots]]))
        assert torch.equal(down, w.down[:, slots])


def test_a_strategy_without_a_kernel_path_is_refused(tiny, monkeypatch) -> None:
    live = ready("topk", tiny, 0.5)
    monkeypatch.setattr(type(live.strategy), "kernel_support", False)
    with live, pytest.raises(ConfigError, match="no kernel path"):
        LeanDecoder(tiny.model, live)


def test_kernel_bench_mode_writes_speed_and_bytes(tmp_path) -> None:
    sized = calibration_sizes("teal", ())
    cfg = compose_config(
        *TINY, "strategy=teal", "sparsity=0.5", "eval=none", "bench.mode=kernel", *sized
    )
    runner.run(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    bench_out = saved["bench"]
    detail = saved["sparsity_detail"]["bench"]  # what the timed steps kept: the one place
    assert bench_out["mode"] == "kernel" and bench_out["decode_tokens_per_s"] > 0
    assert 0 < detail["weight_bytes_per_token"] < detail["dense_weight_bytes_per_token"]
    assert detail["ideal_speedup"] > 1
    assert detail["entries"] > 0
    assert not {"weight_bytes_per_token", "ideal_speedup"} & set(bench_out)
    # paired windows: the dense side, the median ratio and its spread, measured / ideal
    assert bench_out["dense_tokens_per_s"] > 0 and bench_out["rounds"] == 2
    assert bench_out["speedup_q25"] <= bench_out["speedup"] <= bench_out["speedup_q75"]
    assert bench_out["speedup_iqr"] == pytest.approx(
        bench_out["speedup_q75"] - bench_out["speedup_q25"]
    )
    assert bench_out["efficiency"] == pytest.approx(bench_out["speedup"] / detail["ideal_speedup"])
    # the bench counts decode steps only: rounds x decode_tokens per (site, layer)
    assert saved["sparsity_detail"]["bench"]["sparse_positions"] == 2 * 4


@pytest.fixture(params=[1, 3, 4], ids=lambda n: f"{n}-threads")
def threads(request):
    """torch's thread count (the native kernels' OpenMP runtime) pinned for a test: several
    threads split the work even where a test worker has one core's share."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kept", [0, 1, 7, 64, 192, 193, 576])
@pytest.mark.parametrize("cols", [40, 960, 3072])
def test_input_sparse_kernel_matches_torch_on_every_thread_split(kept, cols, dtype, threads):
    """Few kept rows split the columns over threads, many split the rows: both must equal
    W[:, kept] @ x[kept] (576 inputs, like SmolLM2's hidden size), on 1, 3 and 4 threads."""
    from moyu_exp.kernels.ops import NativeKernels

    lib = native.load()
    assert lib is not None and torch.get_num_threads() == threads
    gen = torch.Generator().manual_seed(kept * 7 + cols)
    weight_t = torch.randn(576, cols, generator=gen).to(dtype)
    x = torch.randn(576, generator=gen)
    mask = torch.zeros(576, dtype=torch.bool)
    mask[torch.randperm(576, generator=gen)[:kept]] = True
    ops = NativeKernels(lib, max_tokens=8, max_cols=max(cols, 576))
    out, count = ops.sparse_in(weight_t, mask.to(torch.uint8), x)
    expected = (x * mask) @ weight_t.float()
    assert count == kept
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kept", [1, 3, 4, 17, 20, 1535])
@pytest.mark.parametrize("cols", [40, 576, 1000])
def test_gathered_rows_kernel_matches_torch_on_every_thread_split(kept, cols, dtype, threads):
    """The listed rows of W (four at a time, 16-lane sums and a tail; the rest one by one)
    must equal W[idx] @ x, for counts that leave every remainder, on 1, 3 and 4 threads."""
    lib = native.load()
    assert lib is not None and torch.get_num_threads() == threads
    gen = torch.Generator().manual_seed(kept * 11 + cols)
    weight = torch.randn(1536, cols, generator=gen).to(dtype)
    x = torch.randn(cols, generator=gen)
    idx = torch.randperm(1536, generator=gen)[:kept].sort().values
    out = torch.full((kept,), float("nan"))
    lib.fn("dot", weight)(
        weight.data_ptr(), cols, idx.data_ptr(), kept, x.data_ptr(), out.data_ptr()
    )
    torch.testing.assert_close(out, weight[idx].float() @ x, rtol=1e-4, atol=1e-4)


RULES = {
    "topk": lambda dim: KernelRule(k=keep_count(0.6, dim)),
    "scaled topk": lambda dim: KernelRule(k=keep_count(0.3, dim), scale=torch.rand(dim) + 0.5),
    "threshold": lambda dim: KernelRule(threshold=0.7),
    "per-entry thresholds": lambda dim: KernelRule(
        threshold=torch.rand(dim), scale=torch.rand(dim)
    ),
}


def reference_keep(x: torch.Tensor, rule: KernelRule) -> torch.Tensor:
    """The kept set of a rule, entry by entry, from its definition (not the code under test):
    the k best scores |x| * scale of a row by a stable descending sort (ties: the lower index),
    or every score at or above its threshold."""
    keep = torch.zeros_like(x, dtype=torch.bool)
    for index in itertools.product(*(range(n) for n in x.shape[:-1])):
        row = x[index].tolist()
        scale = [1.0] * len(row) if rule.scale is None else rule.scale.tolist()
        score = [abs(v) * s for v, s in zip(row, scale, strict=True)]
        if rule.k is not None:
            best = sorted(range(len(row)), key=lambda i: -score[i])[: rule.k]  # stable
            kept = set(best)
        else:
            limits = rule.threshold
            limits = limits.tolist() if isinstance(limits, torch.Tensor) else [limits] * len(row)
            kept = {i for i, (s, t) in enumerate(zip(score, limits, strict=True)) if s >= t}
        keep[index] = torch.tensor([i in kept for i in range(len(row))])
    return keep


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dim", [7, 160, 1536])
@pytest.mark.parametrize("kind", sorted(RULES))
def test_simulated_masking_keeps_exactly_what_the_rule_keeps(kind, dim, backend, monkeypatch):
    """Simulated mode's batched masking (native, or stock ops) keeps the rule's set at active
    positions (against :func:`reference_keep`), copies inactive ones, and counts the dropped
    entries."""
    if backend == "torch":
        monkeypatch.setattr(native, "load", lambda: None)
    elif shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    gen = torch.manual_seed(dim)
    x = torch.randn(3, 5, dim, generator=gen)
    active = torch.rand(3, 5, generator=gen) > 0.3
    rule = RULES[kind](dim)
    y, dropped = apply_rule(x, rule, active)
    keep = reference_keep(x, rule) | ~active[..., None]
    assert torch.equal(y, torch.where(keep, x, torch.zeros(())))
    assert int(dropped) == int((~keep).sum())


@needs_compiler
def test_native_topk_breaks_ties_by_the_lower_index() -> None:
    """Fewer nonzeros than k: the zeros kept are the first ones (kernel mode selects alike)."""
    x = torch.tensor([[[3.0, 0.0, 0.0, -2.0, 0.0, 0.0]]])
    y, dropped = apply_rule(x, KernelRule(k=4), None)
    assert dropped == 2 and y.tolist() == x.tolist()  # the dropped entries were zeros
    lib = native.load()
    work = torch.empty(2 * 6 + 2048)
    kept = torch.empty(6, dtype=torch.int64)
    count = lib.lib.select_entries(
        x.data_ptr(), 6, None, None, 0.0, 4, work.data_ptr(), kept.data_ptr()
    )
    assert kept[:count].tolist() == [0, 1, 2, 3]


@needs_compiler
def test_native_random_masks_keep_exactly_k_uniformly() -> None:
    from moyu_exp.masking import random_keep

    generator = torch.Generator().manual_seed(0)
    mask = random_keep((4000, 10), 3, generator)
    assert torch.all(mask.sum(-1) == 3)
    assert torch.allclose(mask.float().mean(0), torch.full((10,), 0.3), atol=0.03)
    again = random_keep((4000, 10), 3, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("shape", [(160,), (3, 1, 160), (3, 5, 160)])
def test_a_strategys_mask_is_applied_and_counted_alike(shape, backend, monkeypatch) -> None:
    """Masks from keep() (a fixed set, one per sequence, one per token) at active positions."""
    from moyu_exp.masking import apply_mask

    if backend == "torch":
        monkeypatch.setattr(native, "load", lambda: None)
    elif shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    gen = torch.manual_seed(1)
    x = torch.randn(3, 5, 160, generator=gen)
    keep = torch.rand(shape, generator=gen) > 0.5
    active = torch.rand(3, 5, generator=gen) > 0.3
    y, dropped = apply_mask(x, keep, active)
    expected, count = x.clone(), 0  # position by position, from the mask's definition
    for b, t in itertools.product(range(3), range(5)):
        if active[b, t]:
            row = (
                keep.reshape(-1, 160)[0] if keep.dim() == 1 else keep[b, min(t, keep.shape[1] - 1)]
            )
            expected[b, t] = x[b, t] * row
            count += int((~row).sum())
    assert torch.equal(y, expected) and int(dropped) == count
