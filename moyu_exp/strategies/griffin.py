"""GRIFFIN: per layer, keep the top-k neurons of the prompt statistic, frozen for what follows.

Score s_j = || (z_{t,j} / ||z_t||_2)_t ||_2 over the prompt tokens t; the k = round((1 - s) d_ff)
best neurons form the reduced MLP used for every later token (Dong et al., COLM 2024;
hdong920/GRIFFIN ``src/griffin/llama.py``). Its protocol is GRIFFIN's (``prefill=last_token``):
in lm-eval's scoring (classification mode) the statistic uses every position of a row but the
last and only the last position runs the reduced MLP; in generation the prompt runs dense, the
selection uses all of it, and every decode step runs the reduced MLP.

Departures: k is rounded where GRIFFIN's code truncates (int(d_ff * k_factor)); the selection
of each row of a batch is its own (GRIFFIN's code supports batch 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import keep_count, register, topk_mask
from moyu_exp.strategies.sequence import SequenceLevel, prompt_norms

torch = lazy_import("torch")


@register("griffin")
@dataclass(eq=False)
class Griffin(SequenceLevel):
    name: str = "griffin"
    prefill: str = "last_token"  # GRIFFIN's classification mode in lm-eval, generation mode else

    def select(self, z: torch.Tensor, prompt: torch.Tensor, state=None, layer: int = 0):
        score = prompt_norms(z, prompt, normalize_tokens=True)
        return topk_mask(score, keep_count(self.sparsity, score.shape[-1]))
