"""Which positions of a forward run sparse, and which a sequence-level method selects from.

A strategy's ``prefill`` names its evaluation protocol, the one its paper used:

- ``sparse``: every real position runs sparse (CATS, CHESS, the top-k oracle).
- ``dense``: the prompt runs dense (lm-eval's context, or the whole of a fresh prefill), later
  positions sparse; sequence-level methods select from the prompt (TDA).
- ``last_half``: in any multi-token forward of T real positions (each row's own T, not the
  padded length), the last floor(T/2) run sparse and the rest dense; a single-token forward (a
  decode step) is sparse. TEAL's ``SparsifyFn`` with ``apply_prefill``.
- ``last_fraction``: the same with the last floor(f T) positions, f = ``prefill_fraction``
  (WINA: 0.99, its first 1% of positions dense).
- ``last_token``: GRIFFIN. In a forward whose rows the lm-eval bridge declared (a scored
  context + continuation), only each row's last position runs sparse and the selection uses
  every position but the last (GRIFFIN's classification mode); a fresh prefill without declared
  rows runs dense and selects from every position, and decode steps run sparse (its generation
  mode).

Under a prompt-dense protocol the position that predicts the first continuation token belongs
to the context, so a single-token continuation (yes/no, a letter) is scored by the dense model;
the lm-eval bridge records, per task, the fraction of scored positions that ran sparse.
"""

from __future__ import annotations

from dataclasses import dataclass

from moyu_exp.lazy import lazy_import

torch = lazy_import("torch")

PROTOCOLS = ("sparse", "dense", "last_half", "last_fraction", "last_token")
SELECTING = ("dense", "last_half", "last_fraction", "last_token")  # sequence-level methods


@dataclass
class TokenRoles:
    """Per position of the current forward: real token or padding, prompt or not."""

    valid: torch.Tensor | None = None  # (batch, tokens) bool; None: every position is real
    prompt: torch.Tensor | None = None  # (batch, tokens) bool; None: no prompt position
    declared: bool = False  # rows declared by the lm-eval bridge (context + continuation)
    fresh: bool = False  # the forward starts a sequence (empty KV cache)

    def matches(self, x: torch.Tensor) -> bool:
        ref = self.valid if self.valid is not None else self.prompt
        return ref is None or tuple(ref.shape) == tuple(x.shape[:2])


class Positions:
    """What a protocol makes of one forward's roles: ``active`` (bool (batch, tokens), or None
    for every position) runs sparse; ``select`` is where a sequence-level method selects from;
    ``sparse`` / ``dense`` count real positions of each kind."""

    def __init__(self, roles: TokenRoles, protocol: str, fraction: float, x: torch.Tensor):
        shape = tuple(x.shape[:2])
        self.roles = roles
        self.active, self.select = _positions(roles, protocol, fraction, shape, x.device)
        total = roles.valid.sum() if roles.valid is not None else shape[0] * shape[1]
        self.sparse = self.active.sum() if self.active is not None else total
        self.dense = total - self.sparse


def _positions(roles: TokenRoles, protocol: str, fraction: float, shape, device):
    valid, prompt = roles.valid, roles.prompt
    if protocol == "sparse":
        return valid, prompt
    if protocol == "dense" or (protocol == "last_token" and not roles.declared):
        if prompt is None:  # a decode step: nothing of the prompt left
            return valid, None
        return _valid(valid, shape, device) & ~prompt, prompt
    real = _valid(valid, shape, device)
    count = real.sum(dim=1, keepdim=True)
    rank = real.cumsum(dim=1) - 1  # index of each real position within its row
    if protocol == "last_token":
        sparse_count = (count > 0).long()
    else:
        share = 0.5 if protocol == "last_half" else fraction
        sparse_count = torch.where(count > 1, (share * count).floor().long(), count)
    active = real & (rank >= count - sparse_count)
    return active, real & ~active


def _valid(valid: torch.Tensor | None, shape, device) -> torch.Tensor:
    return valid if valid is not None else torch.ones(shape, dtype=torch.bool, device=device)
