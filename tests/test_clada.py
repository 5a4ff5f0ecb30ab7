"""CLADA: the surprisal/entropy trigger as the public code computes it, and re-selection during
generation that kernel mode follows exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moyu_exp.decode import ModelStepper, greedy
from moyu_exp.kernels import native
from moyu_exp.kernels.decoder import LeanDecoder
from moyu_exp.meter import SparsityMeter
from moyu_exp.strategies.clada import Clada, fresh_state
from moyu_exp.strategies.protocol import TokenRoles
from tests.conftest import attach
from tests.test_kernels import assert_same_decode, prompt

VOCAB, WINDOW, STEPS = 50, 10, 40
# low percentiles on a short window, so that a tiny random model triggers re-selections
ADAPTIVE = (
    "sparsity=0.5",
    "strategy.update_window=6",
    "strategy.min_active_neurons=1",
    "strategy.surprisal_threshold=0.3",
    "strategy.entropy_threshold=0.3",
)


def reference_triggers(logits: np.ndarray, tokens: np.ndarray) -> list[bool]:
    """CLADA's loop (Oldify/CLADA generate_with_conditional_computation), step by step: token i
    was chosen from logits[i]."""
    surprisals, entropies, out = [], [], []
    s_thr = e_thr = 0.0
    for i, (row, token) in enumerate(zip(logits, tokens, strict=True)):
        p = np.exp(row - row.max())
        p /= p.sum()
        surprisals.append(-np.log2(p[token]) / np.log2(VOCAB))
        entropies.append(-(p * np.log2(p)).sum() / np.log2(VOCAB))
        if i % WINDOW == 0 and i > 0:
            window = min(len(surprisals), WINDOW)
            if window > 5:
                s_thr = np.percentile(surprisals[-window:], 70)
                e_thr = np.percentile(entropies[-window:], 70)
        out.append(len(surprisals) > WINDOW and surprisals[-1] > s_thr and entropies[-1] > e_thr)
    return out


def test_the_trigger_is_claddas_surprisal_and_entropy_rule() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (
        torch.randn(STEPS + 1, VOCAB, generator=gen) * torch.linspace(0.2, 4, STEPS + 1)[:, None]
    )
    tokens = torch.randint(0, VOCAB, (STEPS,), generator=gen)
    clada, state = Clada(sparsity=0.5), fresh_state()
    clada.end_forward(state, torch.tensor([[1, 2, 3]]), logits[None, None, 0], fresh=True)
    got = []
    for i in range(STEPS):  # step i feeds token i (chosen from logits[i]) and gives logits[i + 1]
        clada.end_forward(state, tokens[i].view(1, 1), logits[None, None, i + 1], fresh=False)
        got.append(bool(state.due[0]))
    expected = reference_triggers(logits[:-1].double().numpy(), tokens.numpy())
    assert got == expected and any(expected)
    assert state.triggers == sum(expected)


def test_a_refresh_runs_the_full_mlp_and_reselects_from_it() -> None:
    clada, state = Clada(sparsity=0.5, min_active_neurons=1), fresh_state()
    z = torch.tensor([[[4.0, 3.0, 0.1, 0.2], [4.0, 3.0, 0.1, 0.2]]])
    prompt_roles = TokenRoles(None, torch.ones(1, 2, dtype=torch.bool), fresh=True)
    where = type("W", (), {"select": prompt_roles.prompt, "active": None})()
    clada.begin_forward(state, fresh=True)
    assert clada.keep(state, "mlp_intermediate", 0, z, where)[0, 0].tolist() == [
        True,
        True,
        False,
        False,
    ]
    state.due = torch.tensor([True])
    clada.begin_forward(state, fresh=False)
    decode = type("W", (), {"select": None, "active": None})()
    step = torch.tensor([[[0.0, 0.0, 0.0, 9.0]]])
    assert clada.decode_neurons(state, 0) is None  # kernel mode runs the full MLP
    assert clada.keep(state, "mlp_intermediate", 0, step, decode).all()
    # mean |z| over the prompt and the refresh: ((4, 3, 0.1, 0.2) x 2 + (0, 0, 0, 9)) / 3
    assert state.frozen[0][0].tolist() == [True, False, False, True]
    version = clada.decode_version(state)
    clada.begin_forward(state, fresh=False)  # the next step uses the new set
    assert clada.decode_version(state) == version + 1
    assert clada.decode_neurons(state, 0).tolist() == [True, False, False, True]


def generate(tiny, live, kernel: bool):
    with live:
        meter = SparsityMeter(live.cost)
        if kernel:
            stepper = LeanDecoder(tiny.model, live, max_tokens=128)
            logits = [stepper.prefill(prompt(tiny))]
            with live.measuring(meter):
                for _ in range(STEPS):
                    logits.append(stepper.step(int(logits[-1].argmax())))
                stepper.flush()
            return torch.stack(logits[1:]), meter, live.state
        stepper = ModelStepper(tiny.model)
        token = int(stepper.prefill(prompt(tiny)).argmax())
        logits = []
        with live.measuring(meter):
            for _ in range(STEPS):
                logits.append(stepper.step(token))
                token = int(logits[-1].argmax())
        return torch.stack(logits), meter, live.state


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_kernel_mode_follows_the_reselections(tiny, backend, monkeypatch) -> None:
    if backend == "torch":
        monkeypatch.setattr(native, "load", lambda: None)
    expected, hooks, sim_state = generate(tiny, attach("clada", tiny, *ADAPTIVE), kernel=False)
    got, kernels, ker_state = generate(tiny, attach("clada", tiny, *ADAPTIVE), kernel=True)
    assert sim_state.triggers > 0 and sim_state.triggers == ker_state.triggers
    assert_same_decode(expected, got)
    assert kernels.counts() == hooks.counts()
    assert all(torch.equal(sim_state.frozen[i], ker_state.frozen[i]) for i in sim_state.frozen)


def test_without_adaptation_the_prompt_set_stays(tiny) -> None:
    fixed = attach("clada", tiny, *ADAPTIVE, "strategy.adaptive=false")
    _, meter, state = generate(tiny, fixed, kernel=False)
    assert state.triggers == 0
    _, adaptive, _ = generate(tiny, attach("clada", tiny, *ADAPTIVE), kernel=False)
    # refresh steps run the full MLP: fewer entries skipped than the frozen set alone
    assert adaptive.site_sparsity < meter.site_sparsity == pytest.approx(0.5, abs=0.01)


def test_generation_changes_the_set(tiny) -> None:
    live = attach("clada", tiny, *ADAPTIVE)
    with live:
        greedy(ModelStepper(tiny.model), prompt(tiny), 1)
        first = {i: s.clone() for i, s in live.state.frozen.items()}
        greedy(ModelStepper(tiny.model), prompt(tiny), STEPS)
        assert live.state.triggers > 0
        assert any(not torch.equal(first[i], live.state.frozen[i]) for i in first)
