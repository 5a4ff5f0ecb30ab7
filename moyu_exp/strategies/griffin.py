"""GRIFFIN: per layer, keep the top-k neurons of the prompt statistic, frozen for what follows.

Score s_j = || (z_{t,j} / ||z_t||_2)_t ||_2 over the prompt tokens t; the k = round((1 - s) d_ff)
best neurons form the reduced MLP used for every later token (Dong et al., COLM 2024).
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

    def select(self, z: torch.Tensor, prompt: torch.Tensor, state=None, layer: int = 0):
        score = prompt_norms(z, prompt, normalize_tokens=True)
        return topk_mask(score, keep_count(self.sparsity, score.shape[-1]))
