"""CHESS: channel-wise thresholds on SiLU(gate) from importance |SiLU(gate)_j| * mean|up_j|.

Calibration measures mean|up_j| per channel and the per-layer s-quantile tau of the importance
|SiLU(gate)_j| * mean|up_j|; a channel is kept when its importance reaches tau, i.e. channel j's
threshold on |SiLU(gate)_j| is tau / mean|up_j| (He et al., EMNLP 2024;
junhuihe-hjh/CHESS). ``sites=[gate_act,q_input,o_proj_input]`` gives CHESS+ as its code runs it:
per-layer magnitude thresholds on q_proj's input alone (k and v read the dense input) and on
o_proj's input. Every position runs sparse, and the thresholds are the dense model's, as in the
code. Departure: a threshold is the quantile over every calibration token pooled; CHESS's script
averages the quantiles of its calibration samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moyu_exp.families import adapter_for
from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import register
from moyu_exp.strategies.threshold import ThresholdStrategy

torch = lazy_import("torch")

GATE = "gate_act"


@register("chess")
@dataclass(eq=False)
class Chess(ThresholdStrategy):
    name: str = "chess"
    sites: list[str] = field(default_factory=lambda: [GATE])

    allowed_sites = (GATE, "q_input", "o_proj_input", "attn_input")
    calibration_version = 2  # 1 stored mean|up| as up_mean.<layer>

    def calibration_scales(self, model, layers: list[int]) -> tuple[list, dict]:
        """mean|up_j| per channel of each layer, measured on the calibration pass's MLP input."""
        if GATE not in self.sites:
            return [], {}
        adapter = adapter_for(model)
        blocks = adapter.layers(model)
        scales: dict[tuple[str, int], torch.Tensor] = {}

        def up_mean(layer: int):
            def fn(x: torch.Tensor) -> torch.Tensor:
                up = adapter.mlp_up(blocks[layer], x).abs().float()
                scales[(GATE, layer)] = up.reshape(-1, up.shape[-1]).mean(0)
                return x

            return fn

        return [(("mlp_input", layer), up_mean(layer)) for layer in layers], scales
