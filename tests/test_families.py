"""Every decoder family with an adapter, on a random-init tiny model built from its transformers
config class (no hub): sparsity 0 is dense, the model is restored bit-exactly, each site hooks the
tensor it names, the achieved sparsity is right, a block's two halves are the block."""

from __future__ import annotations

import json

import pytest
import torch

from moyu_exp import runner
from moyu_exp.config import ConfigError
from moyu_exp.families import ADAPTERS, adapter_for, decoding_types, hooked, register
from moyu_exp.families.gated import GatedMLPAdapter
from moyu_exp.families.tiny import TINY_FAMILIES, model_type
from moyu_exp.models import LoadedModel, byte_tokenizer, load
from moyu_exp.sites import PROJECTION_SITES, SPARSE_SITES
from moyu_exp.strategies import keep_count
from tests.conftest import attach, compose_config

FAMILIES = sorted(TINY_FAMILIES)
# every family: top-k and a sequence-level set; the families whose blocks differ from LLaMA's
# (Gemma 3's sandwich norms, Phi-3's fused projections) also every other mechanism: TEAL's greedy
# block search (it runs the adapter's block halves), gate activations, WINA's and LaRoSA's
# rotations, low-rank remainders, a re-selecting set, controls; Gemma's 1 + w norm gains where
# they matter (WINA folds them)
EVERY_FAMILY = ["topk", "griffin"]
OTHERS = ["teal", "cats", "chess", "wina", "larosa", "rsparse", "clada", "tda", "cett", "static"]
# the non-gated families (OPT: ReLU fc1/fc2; GPT-NeoX: parallel attention and MLP, fused qkv)
# run every mechanism whose rule has a non-gated form
NON_GATED = ("opt", "gpt_neox")
NOT_ON_NON_GATED = ("chess", "static", "wina")  # an up projection / a foldable norm gain
CASES = [
    *[(f, n) for f in FAMILIES for n in EVERY_FAMILY if (f, n) != ("mixtral", "griffin")],
    *[(f, n) for f in ("gemma3", "phi3") for n in OTHERS if (f, n) != ("phi3", "wina")],
    *[(f, n) for f in NON_GATED for n in OTHERS if n not in NOT_ON_NON_GATED],
    ("gemma", "wina"),  # Gemma's 1 + w norm gains folded into the rotated weights
    ("gemma", "teal"),
]
# sites a family's block does not have: refused in one line
ABSENT_SITES = {
    **{("phi3", s): "fused" for s in PROJECTION_SITES},
    **{(f, s): "not gated" for f in NON_GATED for s in ("gate_input", "up_input")},
    **{("gpt_neox", s): "fused" for s in ("q_input", "k_input", "v_input")},
    **{("mixtral", s): "routed experts" for s in ("gate_input", "up_input")},
}
# Mixtral's MLP sites are read by routed experts' fused weights (no linear module): their own test
ROUTED = {("mixtral", s) for s in ("mlp_input", "mlp_intermediate")}
# Phi-3 fuses q/k/v and gate/up: WINA's per-projection sites do not exist there, its shared-input
# variant does
SHARED_WINA = (
    "strategy.transform=false",
    "strategy.sites=[attn_input,o_proj_input,mlp_input,mlp_intermediate]",
    "strategy.allocation=uniform",
)
IDS = torch.tensor([[72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 32, 84, 104, 101]])


def tiny(family: str):
    return load(compose_config("model=tiny", f"model.family={family}").model)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return tiny(request.param)


@torch.inference_mode()
def logits(loaded) -> torch.Tensor:
    return loaded.model(IDS).logits


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_sparsity_zero_is_dense_and_the_model_comes_back(kind, name) -> None:
    assert_dense_at_zero_and_restored(tiny(kind), name)


def assert_dense_at_zero_and_restored(family, name: str) -> None:
    """The family contract's first half: sparsity 0 gives the dense logits exactly, a sparse
    attachment is finite, and leaving it restores weights, hooks and forwards bit-exactly."""
    dense = logits(family)
    state = {k: v.clone() for k, v in family.model.state_dict().items()}
    small = ("calibration.tokens=1024", "calibration.seq_len=256")
    with attach(name, family, "sparsity=0", *small):
        assert torch.equal(logits(family), dense)
    with attach(name, family, "sparsity=0.6", *small):
        sparse = logits(family)
    assert torch.isfinite(sparse).all()
    assert torch.equal(logits(family), dense)
    assert all(torch.equal(v, state[k]) for k, v in family.model.state_dict().items())
    modules = list(family.model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    assert not any("forward" in vars(m) for m in modules)


@pytest.mark.parametrize("site", [s for s in SPARSE_SITES if s != "gate_act"])
def test_each_site_is_the_input_of_exactly_its_readers(family, site) -> None:
    assert_site_is_its_readers_input(family, site)


def assert_site_is_its_readers_input(family, site: str) -> None:
    """Replace the site's tensor with a marker: exactly the linears that read it see it."""
    model = family.model
    adapter = adapter_for(model)
    block = adapter.layers(model)[1]
    if (model.config.model_type, site) in ROUTED:
        pytest.skip("read by routed experts: test_routed_expert_sites")
    absent = ABSENT_SITES.get((model.config.model_type, site))
    if absent:
        with pytest.raises(ConfigError, match=absent):
            adapter.readers(block, site)
        with pytest.raises(ConfigError, match=absent), hooked(model, [((site, 1), lambda x: x)]):
            pass
        return
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    marked: set[int] = set()
    marker = [((site, 1), lambda x: torch.full_like(x, 1234.5))]
    with hooked(model, marker), torch.inference_mode():
        handles = [  # after the site's hook, so that they see what it passes on
            m.register_forward_pre_hook(
                lambda m, a: marked.add(id(m)) if bool((a[0] == 1234.5).all()) else None
            )
            for m in linears.values()
        ]
        try:
            model(IDS)
        finally:
            for h in handles:
                h.remove()
    assert marked == {id(m) for m in adapter.readers(block, site)}


def test_topk_keeps_exactly_k_per_token(family) -> None:
    with attach("topk", family, "sparsity=0.5") as live:
        logits(family)
        d_ff = adapter_for(family.model).dim(family.model, "mlp_intermediate")
        assert live.meter.site_sparsity == pytest.approx(1 - keep_count(0.5, d_ff) / d_ff)


@torch.inference_mode()
def test_the_adapters_block_halves_are_the_block(family) -> None:
    adapter = adapter_for(family.model)
    block = adapter.layers(family.model)[0]
    captured = {}

    def grab(_m, args, kwargs):
        captured["x"], captured["kwargs"] = (args[0] if args else kwargs["hidden_states"]), kwargs

    def output(_m, _args, _kwargs, out):
        captured["out"] = out[0] if isinstance(out, tuple) else out

    handles = [
        block.register_forward_pre_hook(grab, with_kwargs=True),
        block.register_forward_hook(output, with_kwargs=True),
    ]
    try:
        family.model(IDS, use_cache=False)  # a KV cache would grow when the halves run again
    finally:
        for h in handles:
            h.remove()
    kwargs = {k: v for k, v in captured["kwargs"].items() if k != "hidden_states"}
    h = adapter.attention_residual(block, captured["x"], kwargs)
    out = adapter.mlp_residual(block, h, captured["x"])  # x: what a parallel block's MLP reads
    # exact, but for GPT-NeoX's parallel block, which sums mlp + attn + x in another order
    exact = not getattr(block, "use_parallel_residual", False)
    torch.testing.assert_close(out, captured["out"], **({"rtol": 0, "atol": 0} if exact else {}))


@pytest.mark.parametrize("name", ["topk", "teal"])
@pytest.mark.parametrize("kind", ["gemma3"])
def test_a_user_runs_a_family_end_to_end(kind, name, tmp_path) -> None:
    cfg = compose_config(
        "model=tiny", f"model.family={kind}", f"strategy={name}", "sparsity=0.5",
        "eval=embedded", "bench=none", "calibration.tokens=512", "calibration.seq_len=128",
    )  # fmt: skip
    runner.run(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "ok" and saved["achieved_sparsity"] > 0
    assert saved["eval"]["embedded"]["word_perplexity"] > 1


def test_a_family_without_an_adapter_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"family='olmoe' has no activation-site adapter"):
        load(compose_config("model=tiny", "model.family=olmoe").model)
    with pytest.raises(ConfigError, match=r"model\.family='bloom' is unknown"):
        load(compose_config("model=tiny", "model.family=bloom").model)


def test_wina_on_fused_projections(tmp_path) -> None:
    """WINA's published per-projection masks cannot exist on Phi-3 (one line); its shared-input
    variant runs and is dense at sparsity 0."""
    phi3 = tiny("phi3")
    with pytest.raises(ConfigError, match="fused"), attach("wina", phi3, "sparsity=0.5"):
        pass
    assert_shared_wina_runs(phi3)


def assert_shared_wina_runs(family) -> None:
    """WINA's shared-input variant without its transform: dense at 0, on target at 0.5."""
    dense = logits(family)
    with attach("wina", family, "sparsity=0", *SHARED_WINA):
        assert torch.equal(logits(family), dense)
    with attach("wina", family, "sparsity=0.5", *SHARED_WINA) as live:
        logits(family)
        assert live.meter.site_sparsity == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("kind", NON_GATED)
def test_a_non_gated_blocks_gate_act_is_its_activation_output(kind) -> None:
    """gate_act (CATS's site) on a non-gated MLP is the activation's output, which is exactly
    what the out projection reads; a zero there skips one column of it."""
    family = tiny(kind)
    model = family.model
    adapter = adapter_for(model)
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(x):
            seen[name] = x.clone()
            return x

        return fn

    fns = [(("gate_act", 1), keep("gate_act")), (("mlp_intermediate", 1), keep("intermediate"))]
    with hooked(model, fns), torch.inference_mode():
        model(IDS.repeat(2, 1))
    assert seen["gate_act"].shape == (2, IDS.shape[1], adapter.dim(model, "gate_act"))
    assert torch.equal(seen["gate_act"], seen["intermediate"])
    block = adapter.layers(model)[1]
    d = model.config.hidden_size
    assert adapter.weights_per_entry(block, "gate_act") == d
    assert adapter.weights_per_entry(block, "mlp_intermediate", compact=True) == 2 * d


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("chess", (), "not gated"),
        ("static", (), "not gated"),
        ("wina", (), "LayerNorm.*transform=false"),
        ("wina", ("strategy.transform=false",), "not gated"),  # its sites include gate_input
    ],
)
def test_what_a_non_gated_block_lacks_is_one_line(name, overrides, message) -> None:
    opt = tiny("opt")
    with pytest.raises(ConfigError, match=message), attach(name, opt, "sparsity=0.5", *overrides):
        pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in opt.model.modules())


def test_wina_without_its_transform_runs_on_a_parallel_block() -> None:
    assert_shared_wina_runs(tiny("gpt_neox"))


# the families kernel mode decodes, from the registry (Gemma 2's soft-capping is refused below)
KERNEL_FAMILIES = [f for f in FAMILIES if model_type(f) in decoding_types() and f != "gemma2"]


# every family: an output-sparse rule (top-k) on the native kernels; a gate rule (CATS) with SiLU
# (fused natively) and GELU-tanh (masked); Gemma 3 (everything but LLaMA's plain block) also a
# compact MLP (GRIFFIN; moyu's read input-sparse under an mlp_input rule), rotated inputs with
# per-projection masks (WINA), low-rank remainders (R-Sparse), a learned predictor, and the
# stock-torch backend
KERNEL_CASES = [
    *[(f, "topk", "native") for f in KERNEL_FAMILIES],
    *[(f, "cats", "native") for f in ("llama", "gemma", "gemma3")],
    *[("gemma3", n, "torch") for n in ("topk", "cats", "griffin")],
    ("gemma3", "griffin", "native"),
    ("gemma3", "moyu+mlp_input", "native"),
    *[("gemma3", n, "native") for n in ("wina", "rsparse", "predictor")],
]


@pytest.mark.parametrize(("kind", "name", "backend"), KERNEL_CASES)
def test_kernel_mode_decodes_as_simulated_mode(kind, name, backend, monkeypatch) -> None:
    """The lean decoder reads each family's structure from its adapter (Qwen2's q/k/v biases,
    Qwen3's and Gemma 3's q/k norms, Gemma's scaled embeddings, 1 + w gains and GELU-tanh,
    Gemma 3's sandwich norms, sliding windows shorter than the prompt, two RoPE tables; Phi-3's
    fused projections) and decodes the same tokens with allclose logits."""
    from moyu_exp.kernels import native

    if backend == "torch":
        monkeypatch.setattr(native, "load", lambda: None)
    elif native.load() is None:
        pytest.skip("no C compiler")
    assert_kernel_decodes_as_simulated(tiny(kind), name, backend)


def assert_kernel_decodes_as_simulated(family, name: str, backend: str) -> None:
    from tests.test_kernels import assert_same_decode, kernel, ready, simulated

    small = ("calibration.tokens=1024", "calibration.seq_len=256")
    expected = simulated(family, ready(name, family, 0.5, *small))
    got, decoder, _ = kernel(family, ready(name, family, 0.5, *small))
    assert decoder.backend.startswith(backend)
    assert_same_decode(expected, got)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("gemma2", "soft-capping"),
        ("opt", "supports model types"),
        ("gpt_neox", "model types"),
        ("mixtral", "model types"),
    ],
)
def test_kernel_mode_refuses_what_it_cannot_express_in_one_line(kind, message) -> None:
    from moyu_exp.kernels.decoder import LeanDecoder

    family = tiny(kind)
    with pytest.raises(ConfigError, match=message):
        LeanDecoder(family.model)


@torch.inference_mode()
def test_routed_expert_sites() -> None:
    """Mixtral: the expert sites see each expert's routed rows (top_k rows per token in all),
    identity hooks change nothing, top-k keeps exactly k of every routed row, the experts'
    forward comes back, and the cost model reads the router and top_k experts per token."""
    mixtral = tiny("mixtral")
    model = mixtral.model
    adapter = adapter_for(model)
    dense = model(IDS).logits
    rows: dict[str, list[tuple[int, ...]]] = {"mlp_intermediate": [], "gate_act": []}

    def seen(site):
        def fn(x):
            rows[site].append(tuple(x.shape))
            return x

        return fn

    fns = [((site, 1), seen(site)) for site in rows] + [(("mlp_input", 1), lambda x: x)]
    with hooked(model, fns):
        assert torch.equal(model(IDS).logits, dense)
    top_k, d_ff = model.config.num_experts_per_tok, model.config.intermediate_size
    for shapes in rows.values():
        assert all(s[0] == 1 and s[2] == d_ff for s in shapes)
        assert sum(s[1] for s in shapes) == top_k * IDS.shape[1]
    experts = adapter.layers(model)[1].mlp.experts
    assert "forward" not in vars(experts) and "_moyu_site_fns" not in vars(experts)
    with attach("topk", mixtral, "sparsity=0.5") as live:
        model(IDS)
        counts = live.meter.counts()[("mlp_intermediate", 0)]
        assert counts[1] == top_k * IDS.shape[1]  # routed rows
        assert counts[0] == counts[1] * (d_ff - keep_count(0.5, d_ff))
    assert torch.equal(model(IDS).logits, dense)
    cost = adapter.cost_model(model)
    block = adapter.layers(model)[0]
    attention = sum(lin.weight.numel() for lin in adapter.linears(block))
    expert = block.mlp.experts.gate_up_proj[0].numel() + block.mlp.experts.down_proj[0].numel()
    router = block.mlp.gate.weight.numel()
    assert cost.block_weights == len(adapter.layers(model)) * (attention + router + top_k * expert)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("griffin", "routed experts, each with its own neurons"),
        ("predictor", "routed experts, each with its own neurons"),
        ("cett", "routed experts' fused weights"),
        ("rsparse", "routed experts' fused weights"),
    ],
)
def test_what_routed_experts_cannot_take_is_one_line(name, message) -> None:
    mixtral = tiny("mixtral")
    small = ("calibration.tokens=512", "calibration.seq_len=128")
    with pytest.raises(ConfigError, match=message), attach(name, mixtral, "sparsity=0.5", *small):
        pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in mixtral.model.modules())


@pytest.mark.parametrize("name", ["cats", "teal"])
def test_thresholds_inside_routed_experts(name) -> None:
    """CATS and TEAL (its uniform allocation: the greedy search over eager experts is slow for
    a unit test; the CLI runs the greedy one) at sparsity 0 are dense, and near the target."""
    mixtral = tiny("mixtral")
    dense = logits(mixtral)
    small = ("calibration.tokens=1024", "calibration.seq_len=256")
    uniform = ("strategy.allocation=uniform",) if name == "teal" else ()
    with attach(name, mixtral, "sparsity=0", *small, *uniform):
        assert torch.equal(logits(mixtral), dense)
    with attach(name, mixtral, "sparsity=0.5", *small, *uniform) as live:
        logits(mixtral)
        assert live.meter.site_sparsity == pytest.approx(0.5, abs=0.1)
    assert torch.equal(logits(mixtral), dense)


# ------------------------------------------------------- a family registered from here
class _NewFamilyConfig(__import__("transformers").LlamaConfig):
    model_type = "moyu_test_family"  # no adapter in the package knows it


@pytest.fixture
def new_family():
    """A model type no built-in adapter knows, and the one module's worth of code that adds it:
    an adapter registered from this file (removed afterwards)."""
    from transformers import LlamaForCausalLM

    with pytest.raises(ConfigError, match="'moyu_test_family' has no activation-site adapter"):
        adapter_for(type("M", (), {"config": _NewFamilyConfig()})())
    saved = list(ADAPTERS)
    register(GatedMLPAdapter(model_types=("moyu_test_family",)))
    tokenizer = byte_tokenizer()
    config = _NewFamilyConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=260,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    yield LoadedModel(model, tokenizer, {"name": "tiny", "fingerprint": "new-family"})
    ADAPTERS[:] = saved


@pytest.mark.parametrize("name", ["topk", "griffin", "teal", "cats"])
def test_a_family_registered_from_outside_the_package_passes_the_contract(new_family, name):
    assert_dense_at_zero_and_restored(new_family, name)
    for site in ("attn_input", "o_proj_input", "q_input", "mlp_input", "mlp_intermediate"):
        assert_site_is_its_readers_input(new_family, site)
    assert "moyu_test_family" in decoding_types()
    assert_kernel_decodes_as_simulated(new_family, name, "native")


def test_the_kernels_know_no_family_and_read_no_config() -> None:
    """kernels/ reads the adapters' DecoderSpec only: no family's name, no model.config."""
    import re
    from pathlib import Path

    import moyu_exp.kernels

    families = r"llama|mistral|qwen\d*|gemma\d*|phi-?\d*|mixtral|opt|gpt[_-]?neox|neox"
    pattern = re.compile(rf"\b({families})\b|model\.config", re.I)
    folder = Path(moyu_exp.kernels.__file__).parent
    found = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted([*folder.rglob("*.py"), *folder.rglob("*.c")])
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, "\n".join(found)
