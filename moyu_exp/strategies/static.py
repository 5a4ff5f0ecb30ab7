"""Static: one input-independent neuron set per layer, by weight magnitude (GRIFFIN's baseline).

Neuron j of a layer scores ||W_gate[j]|| * ||W_up[j]||; the k = round((1 - s) * d_ff) best are
kept for every token (Dong et al., 2024, the "magnitude" selection). The set is known before any
token, so kernel mode gathers it into a compact MLP. It runs under GRIFFIN's protocol, as
GRIFFIN ran it (``prefill=last_token``: only the last position of an lm-eval row, and every
decode step). Departure: k is rounded where GRIFFIN's code truncates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import Strategy, keep_count, register, topk_mask

torch = lazy_import("torch")


@register("static")
@dataclass(eq=False)
class Static(Strategy):
    name: str = "static"
    sites: list[str] = field(default_factory=lambda: ["mlp_intermediate"])
    prefill: str = "last_token"  # as GRIFFIN ran its magnitude baseline (see protocol.py)

    allowed_sites = ("mlp_intermediate",)
    compact_mlp = True

    def prepare(self, model, adapter, layers, calibration) -> SimpleNamespace:
        blocks = adapter.layers(model)
        keep = {}
        for layer in layers:
            gate, up = adapter.gate_up_weights(blocks[layer])
            score = gate.float().norm(dim=1) * up.float().norm(dim=1)
            keep[layer] = topk_mask(score, keep_count(self.sparsity, score.numel()))
        return SimpleNamespace(keep=keep)

    def decode_neurons(self, state, layer: int) -> torch.Tensor | None:
        return state.keep[layer]

    def keep(self, state, site, layer, x, where) -> torch.Tensor | None:
        keep = state.keep[layer]
        return None if bool(keep.all()) else keep.to(x.device)
