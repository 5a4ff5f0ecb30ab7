"""Kernel mode on the real weights of both embedded models, SmolLM2 and Gemma 3 (the activations
real outliers make hard to select), for every strategy with a kernel path, in two checks that
cannot be fooled by rounding ties:

- **semantics**: kernel mode on stock-PyTorch ops against simulated mode, both in float64
  (the model's RMSNorms computed in float64 too, where transformers' run in float32): a
  greedy decode gives the same tokens and logits within 1e-9 (seen: at most 9.0e-13).
  In float32 the two modes disagree now and then for a reason that is not a bug: a score within
  ~1e-6 of its threshold falls on the other side after a different summation order, and the
  flip cascades through the later layers (CHESS+ at one thread: one activation 1.4e-6 from its
  threshold in layer 13, logits 1.2 apart three steps on; R-Sparse alike).
- **native arithmetic**: the native kernels' unfused decode (float32, as users run it; 3
  steps), every call compared with the same operation in float64 on the same inputs: products
  within their rounding bound, and a rule keeps exactly the entries float64 keeps, except
  entries within 1e-5 of the threshold (whose share of the output is then allowed for).

Both modes of the float64 check read the state calibrated on the float32 model (cast).
"""

from __future__ import annotations

import copy

import pytest
import torch

from moyu_exp import calibration, models
from moyu_exp.config import build
from moyu_exp.families import adapter_for
from moyu_exp.kernels import native, ops
from moyu_exp.kernels.decoder import LeanDecoder
from moyu_exp.masking import KernelRule
from tests.conftest import compose_config
from tests.test_kernels import (
    KERNEL_STRATEGIES,
    VARIANTS,
    kernel,
    needs_compiler,
    prompt,
    ready,
    simulated,
)

pytestmark = pytest.mark.smollm2

# test-sized calibration (TEAL's and WINA's levels uniform: their greedy paths ship for the
# default tokens, and the kernels read levels the same way whichever search chose them)
# moyu's set sizes equal (its profile allocation is a calibration, and the kernels read the
# sizes the same way whatever chose them: tests/test_kernels.py runs the profile on tiny models)
SMALL = ("calibration.tokens=512", "calibration.seq_len=128")
OWN = {
    "teal": ("strategy.allocation=uniform",),
    "wina": ("strategy.allocation=uniform",),
    "moyu": ("strategy.allocation=uniform",),
    "moyu+mlp_input": ("strategy.allocation=uniform",),
    # every third layer: the SVD (R-Sparse) and PCA (LaRoSA) of each weight are their cost
    "rsparse": ("strategy.search_tokens=128", "strategy.layers='::3'"),
    "larosa": ("strategy.layers='::3'",),
    "cett": ("strategy.max_tokens=128",),
    # a few epochs on a few thousand tokens: the kernels read its scores however it was trained
    "predictor": ("strategy.train_tokens=2048", "strategy.max_epochs=2"),
}
ROUNDING = 1e-5  # float32 against float64, relative to the sum of |terms|
TIE = 1e-5  # a score this close (relative) to its threshold may fall either side
CHECKED_STEPS = 3  # each checked call recomputes its product in float64 (about 1 s a step)


MODELS = ["smollm2_135m", "gemma3_270m"]
# wina-plain reads one mask per input, the path TEAL's case covers on these weights (it stays in
# tests/test_kernels.py on the tiny models); WINA's own masks, per projection, stay here
REAL_STRATEGIES = [n for n in KERNEL_STRATEGIES if n != "wina-plain"]


@pytest.fixture(scope="module", params=MODELS)
def real(request):
    return models.load(compose_config(f"model={request.param}").model)


@pytest.fixture(scope="module")
def real_f64(real):
    model = copy.deepcopy(real.model).double()
    adapter = adapter_for(model)
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = _float64_rms_norm(module, adapter)
    return models.LoadedModel(model, real.tokenizer, dict(real.info))


def _float64_rms_norm(module, adapter):
    """The norm in the dtype of its input (transformers' LLaMA and Gemma norms compute in
    float32 whatever the model's dtype), with the gain the family defines (Gemma: 1 + w)."""
    eps = getattr(module, "variance_epsilon", None) or module.eps

    def forward(x: torch.Tensor) -> torch.Tensor:
        gain = adapter.norm_gain(module).to(x.dtype)
        return gain * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    return forward


def ready_f64(name: str, real, real_f64):
    """``name`` calibrated on the float32 model (the state the native check uses), its state
    in float64, attached to the float64 model: both modes read the same state."""
    base, variant = VARIANTS.get(name, (name, []))
    cfg = compose_config(f"strategy={base}", "sparsity=0.5", *variant, *SMALL, *OWN.get(name, ()))
    strategy = build(cfg.strategy)
    state, _ = calibration.prepare(strategy, real, cfg)
    if state is not None:
        state = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    return strategy.attach(real_f64.model, state)


@pytest.mark.parametrize("name", REAL_STRATEGIES)
def test_kernel_mode_decodes_as_simulated_mode_in_float64(
    name, real, real_f64, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(native, "load", lambda: None)
    expected = simulated(real_f64, ready_f64(name, real, real_f64))
    got, decoder, _ = kernel(real_f64, ready_f64(name, real, real_f64))
    assert decoder.backend == "torch" and got.dtype == torch.float64
    with capsys.disabled():
        largest = float((got - expected).abs().max())
        print(f"\n{real.info['name']} {name}: largest |logit difference| {largest:.1e}")
    assert torch.equal(expected.argmax(-1), got.argmax(-1))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


@needs_compiler
@pytest.mark.parametrize("name", REAL_STRATEGIES)
def test_native_kernels_compute_what_float64_ops_do_on_real_activations(name, real):
    live = ready(name, real, 0.5, *SMALL, *OWN.get(name, ()))
    with live:
        decoder = LeanDecoder(real.model, live, max_tokens=64, fuse=False)
        assert decoder.k.name == "native"
        checked = CheckedKernels(decoder.k)
        decoder.k = checked
        token = int(decoder.prefill(prompt(real)).argmax())
        for _ in range(CHECKED_STEPS):
            token = int(decoder.step(token).argmax())
    assert checked.calls["linear"] > 0 and not checked.failures, checked.failures[:5]
    if live.rules:  # a rule after GELU runs as a mask (the native rule fuses SiLU)
        ruled = checked.calls.get("sparse_in_rule", 0) + checked.calls.get("gated_rule", 0)
        assert ruled > 0 or (decoder.w.act != "silu" and checked.calls.get("rows_masked", 0))


def test_the_checker_catches_a_wrong_kernel() -> None:
    """A kernel that drops one kept entry, or whose product is off by 100 x the rounding
    bound, fails the comparison; a faithful one passes."""
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, generator=torch.Generator().manual_seed(1))
    rule = KernelRule(threshold=0.5)
    faithful = CheckedKernels(ops.TorchKernels(torch.float32, torch.device("cpu")))
    faithful.sparse_in_rule(w, rule, x)
    assert not faithful.failures

    class DropsOne(ops.TorchKernels):
        def sparse_in_rule(self, weight_t, rule, x):
            mask = rule.mask(x)
            mask[mask.nonzero()[0]] = False
            return self.sparse_in(weight_t, mask, x)

        def linear(self, weight, x):
            return torch.nn.functional.linear(x, weight) * (1 + 100 * ROUNDING)

    wrong = CheckedKernels(DropsOne(torch.float32, torch.device("cpu")))
    wrong.sparse_in_rule(w, rule, x)
    wrong.linear(w.t().contiguous(), x)
    assert {f.split(":")[0] for f in wrong.failures} == {"sparse_in_rule", "linear"}


# ------------------------------------------------------------------------------ the checker
class CheckedKernels:
    """A backend whose every call is compared with the same operation in float64 (failures
    are collected, one line each); anything else is passed through."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: dict[str, int] = {}
        self.failures: list[str] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _check(self, op: str, got, expected, bound) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        excess = (got.double() - expected).abs() - bound
        if bool((excess > 0).any()):
            self.failures.append(f"{op}: {int((excess > 0).sum())} entries past their bound")

    def norm(self, x, weight, eps):
        out = self.inner.norm(x, weight, eps)
        x64 = x.double()
        ref = weight.double() * x64 * torch.rsqrt(x64.pow(2).mean() + eps)
        self._check("norm", out, ref, ROUNDING * ref.abs() + 1e-6)
        return out

    def linear(self, weight, x):
        out = self.inner.linear(weight, x)
        w, v = weight.double(), x.double()
        self._check("linear", out, w @ v, ROUNDING * (w.abs() @ v.abs()) + 1e-6)
        return out

    def rows_masked(self, weight, mask, x):
        out = self.inner.rows_masked(weight, mask, x)
        w, v = weight.double(), x.double()
        ref = torch.where(mask, w @ v, 0.0)
        self._check("rows_masked", out, ref, ROUNDING * (w.abs() @ v.abs()) + 1e-6)
        return out

    def sparse_in(self, weight_t, mask, x):
        out, kept = self.inner.sparse_in(weight_t, mask, x)
        idx = mask.nonzero().view(-1)
        terms = x.double()[idx, None] * weight_t[idx].double()  # the kept rows' terms
        self._check("sparse_in", out, terms.sum(0), ROUNDING * terms.abs().sum(0) + 1e-6)
        if kept != int(mask.sum()):
            self.failures.append(f"sparse_in: kept {kept} of a mask of {int(mask.sum())}")
        return out, kept

    def silu_mul(self, gate_up):
        out = self.inner.silu_mul(gate_up)
        gate, up = gate_up.double().chunk(2)
        ref = torch.nn.functional.silu(gate) * up
        self._check("silu_mul", out, ref, ROUNDING * ref.abs() + 1e-6)
        return out

    def sparse_in_rule(self, weight_t, rule, x):
        out, kept = self.inner.sparse_in_rule(weight_t, rule, x)
        x64 = x.double()

        def terms(idx):
            return x64[idx, None] * weight_t[idx].double()

        self._rule("sparse_in_rule", out, kept, rule, x64, terms)
        return out, kept

    def gated_rule(self, up_weight, down_t, gate, x, rule):
        out, kept = self.inner.gated_rule(up_weight, down_t, gate, x, rule)
        act = torch.nn.functional.silu(gate.double())

        def terms(idx):
            z = act[idx] * (up_weight[idx].double() @ x.double())
            return z[:, None] * down_t[idx].double()

        self._rule("gated_rule", out, kept, rule, act, terms)
        return out, kept

    def _rule(self, op, out, kept, rule, scored, terms) -> None:
        """Kept entries: float64's, give or take the ties (each tie's term allowed for);
        ``terms(idx)``: the rows of the product's terms for entries ``idx``."""
        score = rule.score(scored)
        if rule.k is not None:
            threshold = score.topk(min(rule.k, score.numel())).values[-1]
        else:
            threshold = torch.as_tensor(rule.threshold, dtype=torch.float64)
        band = TIE * threshold.abs() + 1e-12
        sure = score >= threshold + band
        ties = (score - threshold).abs() < band
        if not int(sure.sum()) <= kept <= int((sure | ties).sum()):
            self.failures.append(
                f"{op}: kept {kept}, float64 keeps {int(sure.sum())} (+{int(ties.sum())} ties)"
            )
        sure_terms = terms(sure.nonzero().view(-1))
        tie_terms = terms(ties.nonzero().view(-1)).abs().sum(0)
        bound = ROUNDING * (sure_terms.abs().sum(0) + tie_terms) + tie_terms + 1e-6
        self._check(op, out, sure_terms.sum(0), bound)

    def attend(self, qkv, keys, values, pos, cos, sin, heads, kv, dim, scale, window=None):
        keys64, values64 = keys.double(), values.double()
        ref = ops._attend(
            qkv.double(), keys64, values64, pos, cos.double(), sin.double(),
            heads, kv, dim, scale, window,
        )  # fmt: skip
        out = self.inner.attend(qkv, keys, values, pos, cos, sin, heads, kv, dim, scale, window)
        largest = values64[:, : pos + 1].abs().amax()
        self._check("attend", out, ref, ROUNDING * 10 * largest + 1e-6)
        written = torch.stack([keys[:, pos], values[:, pos]]).double()
        stored = torch.stack([keys64[:, pos], values64[:, pos]])
        self._check("attend", written, stored, ROUNDING * stored.abs() + 1e-6)
        return out
