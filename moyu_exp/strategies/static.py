"""Static: one input-independent neuron set per layer, by weight magnitude (GRIFFIN's baseline).

Neuron j of a layer scores ||W_gate[j]|| * ||W_up[j]||; the k = round((1 - s) * d_ff) best are
kept for every token (Dong et al., 2024, the "magnitude" selection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import Strategy, keep_count, register
from moyu_exp.strategies.topk import topk_mask

torch = lazy_import("torch")


@register("static")
@dataclass(eq=False)
class Static(Strategy):
    name: str = "static"
    sites: list[str] = field(default_factory=lambda: ["mlp_intermediate"])

    allowed_sites = ("mlp_intermediate",)

    def prepare(self, model, adapter) -> None:
        blocks = adapter.layers(model)
        self._keep: dict[int, torch.Tensor] = {}
        for layer in self.layer_ids:
            gate, up = adapter.readers(blocks[layer], "mlp_input")
            score = gate.weight.float().norm(dim=1) * up.weight.float().norm(dim=1)
            k = keep_count(self.sparsity, score.numel())
            self._keep[layer] = topk_mask(score, min(k, score.numel()))

    def decode_neurons(self, layer: int) -> torch.Tensor | None:
        return self._keep[layer]

    def sparsify(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        keep = self._keep[layer]
        return x if bool(keep.all()) else x.masked_fill(~keep, 0.0)
