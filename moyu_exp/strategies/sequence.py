"""Shared machinery of sequence-level methods: select neurons from the prompt, then freeze.

A sequence-level method runs the prompt dense, scores every MLP neuron over the prompt
positions, and uses the selected neurons for every later token: the continuation positions of
the same forward (an lm-eval multiple-choice item), or the decode steps that follow a prefill
(generation). The selection is one (batch, d_ff) mask per layer, kept in the attachment's state
(``state.frozen``) and dropped when a new sequence starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import Strategy

torch = lazy_import("torch")

SITE = "mlp_intermediate"


@dataclass(eq=False)
class SequenceLevel(Strategy):
    """Subclasses implement :meth:`select` (prompt activations -> kept neurons)."""

    sites: list[str] = field(default_factory=lambda: [SITE])
    prefill: str = "dense"
    prompt_limit: int | None = None  # select from at most the first N prompt tokens

    allowed_sites = (SITE,)
    sequence_level = True
    compact_mlp = True

    def select(self, z: torch.Tensor, prompt: torch.Tensor, state=None, layer: int = 0):
        """Bool (batch, d_ff) of kept neurons from ``z`` (batch, tokens, d_ff) at the ``prompt``
        positions (bool (batch, tokens)). Probes call it too."""
        raise NotImplementedError

    def prepare(self, model, adapter, layers, calibration) -> SimpleNamespace:
        return SimpleNamespace(frozen={})

    def begin_forward(self, state, fresh: bool) -> None:
        if fresh:  # a new sequence: the old selection must not leak into it
            state.frozen = {}

    def keep(self, state, site, layer, x, where) -> torch.Tensor | None:
        if self.sparsity == 0.0:
            return None
        prompt = where.select
        if prompt is not None and self.prompt_limit is not None:
            prompt = prompt & (prompt.cumsum(dim=1) <= self.prompt_limit)
        if prompt is not None and bool(prompt.any()):
            keep = self.select(x, prompt, state, layer)
            keep[~prompt.any(dim=1)] = True  # a row without prompt tokens has nothing to go on
            state.frozen[layer] = keep
        keep = state.frozen.get(layer)
        if keep is None or keep.shape[0] != x.shape[0]:
            return None  # nothing selected yet for these rows: stay dense
        return keep[:, None, :]

    def decode_neurons(self, state, layer: int) -> torch.Tensor | None:
        keep = state.frozen.get(layer)
        return None if keep is None or keep.shape[0] != 1 else keep[0]


def prompt_norms(z: torch.Tensor, prompt: torch.Tensor, normalize_tokens: bool) -> torch.Tensor:
    """Per neuron, the L2 norm over prompt positions of z (each token first scaled to unit norm
    when ``normalize_tokens``): (batch, d_ff)."""
    return prompt_energy(z, prompt, normalize_tokens).sqrt()


def prompt_energy(
    z: torch.Tensor, prompt: torch.Tensor | None, normalize_tokens: bool
) -> torch.Tensor:
    """Per neuron, the sum of z^2 over the ``prompt`` positions (bool (batch, tokens); None:
    every position), each token first scaled to unit norm when ``normalize_tokens``:
    (batch, d_ff)."""
    z = z.float()
    if normalize_tokens:
        z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    energy = z.square()
    return (energy if prompt is None else energy * prompt[..., None]).sum(dim=1)
