"""CHESS: channel-wise thresholds on SiLU(gate) from importance |SiLU(gate)_j| * mean|up_j|.

Calibration measures mean|up_j| per channel and the per-layer s-quantile tau of the importance
|SiLU(gate)_j| * mean|up_j|; channel j's threshold on |SiLU(gate)_j| is tau / mean|up_j| (He et
al., EMNLP 2024). Adding ``attn_input`` and ``o_proj_input`` to ``sites`` gives CHESS+ (per-layer
magnitude thresholds there; unlike CHESS's code, which sparsifies only q's input, the shared
attention input feeds q, k and v here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moyu_exp.lazy import lazy_import
from moyu_exp.sites import adapter_for
from moyu_exp.strategies.base import register
from moyu_exp.strategies.threshold import ThresholdStrategy

torch = lazy_import("torch")

GATE = "gate_act"


@register("chess")
@dataclass(eq=False)
class Chess(ThresholdStrategy):
    name: str = "chess"
    sites: list[str] = field(default_factory=lambda: [GATE])

    allowed_sites = (GATE, "attn_input", "o_proj_input")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._up_mean: dict[int, torch.Tensor] = {}

    def score(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        scale = self.score_scale(site, layer)
        return x.abs() if scale is None else x.abs() * scale.to(device=x.device, dtype=x.dtype)

    def score_scale(self, site: str, layer: int) -> torch.Tensor | None:
        return self._up_mean[layer] if site == GATE else None

    def calibration_taps(self, model, layers: list[int]) -> dict:
        if GATE not in self.sites:
            return {}
        adapter = adapter_for(model)
        blocks = adapter.layers(model)

        def up_mean(layer: int):
            def fn(x: torch.Tensor) -> torch.Tensor:
                up = adapter.mlp_up(blocks[layer], x).abs().float()
                self._up_mean[layer] = up.reshape(-1, up.shape[-1]).mean(0)
                return x

            return fn

        return {("mlp_input", layer): up_mean(layer) for layer in layers}

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {f"up_mean.{layer}": mean for layer, mean in self._up_mean.items()}

    def prepare(self, model, adapter) -> None:
        super().prepare(model, adapter)
        if GATE in self.sites:
            self._up_mean = {
                layer: self.calibration[f"up_mean.{layer}"].to(next(model.parameters()).device)
                for layer in self.layer_ids
            }
