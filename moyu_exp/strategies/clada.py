"""CLADA: a prompt-level neuron set, re-selected when surprisal and entropy spike (Ma et al. 2025,
"Sparse Brains are Also Adaptive Brains", arXiv 2502.19078; Oldify/CLADA ``src/clada/clada.py``).

The rule, as in the public code:

- *global statistical sparsity*: after the prompt, each layer keeps the
  k = max(round((1 - s) d_ff), ``min_active_neurons``) neurons of largest mean |z_j| over the
  prompt positions (z: the MLP intermediate, GRIFFIN's site), for every later token;
- *local semantic adaptability*: each generated token x gets its normalised surprisal
  -log2 p(x) / log2 V and the normalised entropy H(p) / log2 V of the distribution it was chosen
  from (V: the vocabulary). Every ``update_window`` tokens the two thresholds become the
  ``surprisal_threshold`` / ``entropy_threshold`` percentiles (0.7) of the last window's values;
  once more than a window of tokens has been generated, a token above both thresholds
  (cognitive load) triggers a re-selection.

Departures, each forced by decoding with a KV cache (the public code re-runs the whole sequence
every step, and its hook on ``gate_proj``'s input makes the re-selection reuse the prompt's
statistic): the step that feeds the triggering token runs the full MLP (a *refresh*: nothing of
it is skipped, and it is counted so), its |z| joins the statistic, which is the mean over every
position that ran the full MLP (the prompt and the refresh steps), and the new set serves from
the next step on. k is rounded where the code truncates. In lm-eval's loglikelihood scoring a
forward holds the whole continuation, so no token is generated and the rule is the prompt-level
set alone: there, and by default, the protocol is GRIFFIN's (``prefill=last_token``), on whose
implementation CLADA builds; the re-selection acts in generation (the bench, generation
fidelity, kernel mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

from moyu_exp.config import FRACTION, Range
from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import Strategy, keep_count, register, topk_mask
from moyu_exp.strategies.sequence import SequenceLevel

torch = lazy_import("torch")

MIN_HISTORY = 5  # CLADA updates its thresholds only from more than five values


@register("clada")
@dataclass(eq=False)
class Clada(SequenceLevel):
    name: str = "clada"
    prefill: str = "last_token"  # GRIFFIN's protocol in scoring; generation re-selects
    min_active_neurons: int = 100  # k = max(round((1 - s) d_ff), this)
    surprisal_threshold: float = 0.7  # percentile of the last window's normalised surprisals
    entropy_threshold: float = 0.7  # percentile of the last window's normalised entropies
    update_window: int = 10  # thresholds refreshed every this many generated tokens
    adaptive: bool = True  # False: the prompt-level set alone (no re-selection)

    RANGES: ClassVar[dict[str, Range]] = {
        **Strategy.RANGES,
        "surprisal_threshold": FRACTION,
        "entropy_threshold": FRACTION,
    }
    watches_output = True

    def keep_size(self, d_ff: int) -> int:
        return min(d_ff, max(keep_count(self.sparsity, d_ff), self.min_active_neurons))

    def prepare(self, model, adapter, layers, calibration) -> SimpleNamespace:
        return fresh_state()

    def begin_forward(self, state, fresh: bool) -> None:
        if fresh:
            state.__dict__.update(vars(fresh_state()))
            return
        refreshing = state.due
        if bool(refreshing.any()) or bool(state.refreshing.any()):
            state.version += 1
        state.refreshing, state.due = refreshing, torch.zeros_like(refreshing)

    def select(self, z: torch.Tensor, prompt: torch.Tensor, state=None, layer: int = 0):
        """The prompt's set: top-k of mean |z_j| over the prompt positions (and starts the
        statistic a refresh adds to)."""
        total = (z.float().abs() * prompt[..., None]).sum(dim=1)
        count = prompt.sum(dim=1, keepdim=True).float()
        if state is not None:
            state.total[layer], state.count[layer] = total, count
        return topk_mask(total / count.clamp_min(1), self.keep_size(z.shape[-1]))

    def keep(self, state, site, layer, x, where) -> torch.Tensor | None:
        if self.sparsity == 0.0:
            return None
        refreshing = state.refreshing
        refresh = where.select is None and bool(refreshing.any()) and layer in state.total
        if refresh and refreshing.shape[0] == x.shape[0]:
            rows = refreshing.to(x.device)
            self._refresh(state, layer, x, rows)
            keep = state.frozen[layer][:, None, :].clone()
            keep[rows] = True  # the refresh step runs the full MLP
            return keep
        return super().keep(state, site, layer, x, where)

    def _refresh(self, state, layer: int, z: torch.Tensor, rows: torch.Tensor) -> None:
        """Add this step's |z| of the refreshing ``rows`` and select their set again."""
        step = z.float().abs().sum(dim=1) * rows[:, None]
        state.total[layer] = state.total[layer] + step
        state.count[layer] = state.count[layer] + rows[:, None].float() * z.shape[1]
        mean = state.total[layer] / state.count[layer].clamp_min(1)
        reselected = topk_mask(mean, self.keep_size(z.shape[-1]))
        state.frozen[layer] = torch.where(rows[:, None], reselected, state.frozen[layer])

    def decode_neurons(self, state, layer: int) -> torch.Tensor | None:
        if bool(state.refreshing.any()):
            return None  # a refresh step: the full MLP
        return super().decode_neurons(state, layer)

    def decode_version(self, state) -> int:
        return state.version

    # ------------------------------------------------------------------ the load signal
    def end_forward(self, state, ids, logits, fresh: bool) -> None:
        logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
        if fresh or state.previous is None or state.previous.shape[0] != logp.shape[0]:
            state.previous, state.surprisal, state.entropy = logp, [], []
            state.due = torch.zeros(logp.shape[0], dtype=torch.bool)
            state.refreshing = state.due
            return
        token = ids[:, -1].to(logp.device)
        nats = math.log(logp.shape[-1])  # -log2 p / log2 V = -ln p / ln V
        previous = state.previous
        surprisal = (-previous.gather(1, token[:, None])[:, 0] / nats).cpu()
        entropy = (-(previous.exp() * previous).sum(dim=-1) / nats).cpu()
        state.previous = logp
        state.surprisal.append(surprisal)
        state.entropy.append(entropy)
        index = len(state.surprisal) - 1  # CLADA's i: the index of the generated token
        if index > 0 and index % self.update_window == 0:
            window = min(index + 1, self.update_window)
            if window > MIN_HISTORY:
                recent_s = torch.stack(state.surprisal[-window:]).double()
                recent_e = torch.stack(state.entropy[-window:]).double()
                state.thresholds = (
                    torch.quantile(recent_s, self.surprisal_threshold, dim=0),
                    torch.quantile(recent_e, self.entropy_threshold, dim=0),
                )
        if self.adaptive and len(state.surprisal) > self.update_window:
            high_s, high_e = state.thresholds
            state.due = (surprisal > high_s) & (entropy > high_e)
            state.triggers += int(state.due.sum())


def fresh_state() -> SimpleNamespace:
    """A new sequence: no set, no statistic, no history."""
    none = torch.zeros(0, dtype=torch.bool)
    return SimpleNamespace(
        frozen={},
        total={},
        count={},
        previous=None,
        surprisal=[],
        entropy=[],
        thresholds=(torch.zeros(()), torch.zeros(())),
        due=none,
        refreshing=none,
        version=0,
        triggers=0,
    )
