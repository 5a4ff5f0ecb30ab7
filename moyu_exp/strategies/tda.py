"""TDA ("First Activations Matter", Ma et al. 2024): per-layer thresholds on a prompt statistic.

No public code exists; this is our reading of the paper ("a layer-wise threshold on the L2 norm
of neurons over the prompt"). A neuron's statistic is the RMS over the prompt of its activation
in each token's unit-normalised intermediate, a_j = ||(z_{t,j} / ||z_t||)_t||_2 / sqrt(T) (GRIFFIN's
score, made comparable across prompt lengths); neurons with a_j below the layer's threshold are
dropped for every later token (the prompt itself runs dense). Thresholds are calibrated offline:
the s-quantile of a_j over calibration prompts of ``prompt_tokens`` tokens, so the kept set's
size varies per prompt and the target is met on average. The spread of a_j narrows as prompts
grow, so the achieved sparsity depends on how close ``prompt_tokens`` is to the prompts in use
(measured on SmolLM2's held-out prose, prompts of ~140 tokens, target 0.5: 0.458 when calibrated
on 64-token prompts, 0.496 on 128, 0.522 on 256). Without the per-token normalisation the first
tokens' large activations dominate and it falls ~0.02 short.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from moyu_exp.activations import ValueSample, observe, threshold_at
from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import register
from moyu_exp.strategies.sequence import SITE, SequenceLevel, prompt_norms

torch = lazy_import("torch")

PROMPTS_PER_FORWARD = 16  # calibration prompts run side by side (each row its own prompt)


@register("tda")
@dataclass(eq=False)
class Tda(SequenceLevel):
    name: str = "tda"
    prompt_tokens: int = 128

    needs_calibration = True
    calibration_version = 3  # 2: one prompt a forward; 1 used the raw (unnormalised) RMS

    def calibration_key(self) -> dict[str, Any]:
        return super().calibration_key() | {"prompt_tokens": self.prompt_tokens}

    def calibrate(self, model, batches: list[torch.Tensor], cached) -> dict[str, torch.Tensor]:
        """The per-layer quantile tables of a_j over the calibration text cut into prompts of
        ``prompt_tokens`` tokens, PROMPTS_PER_FORWARD prompts (independent rows) a forward."""
        layers = self.layer_ids(model)
        ids = torch.cat(batches, dim=1)
        n = ids.shape[1] // self.prompt_tokens
        prompts = ids[0, : n * self.prompt_tokens].reshape(n, self.prompt_tokens)
        rows = list(prompts.split(PROMPTS_PER_FORWARD)) if n else batches
        sample = ValueSample(calls=len(rows))

        def stat(_site: str, layer: int, z: torch.Tensor) -> None:
            everywhere = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
            sample.add(layer, rms_over_prompt(z, everywhere))

        observe(model, rows, [(SITE, layer) for layer in layers], stat)
        return {f"{SITE}.{layer}": sample.table(layer) for layer in layers}

    def prepare(self, model, adapter, layers, calibration) -> SimpleNamespace:
        thresholds = {
            layer: threshold_at(calibration[f"{SITE}.{layer}"], self.sparsity) for layer in layers
        }
        return SimpleNamespace(frozen={}, thresholds=thresholds)

    def select(self, z: torch.Tensor, prompt: torch.Tensor, state=None, layer: int = 0):
        return rms_over_prompt(z, prompt) >= state.thresholds[layer]


def rms_over_prompt(z: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    tokens = prompt.sum(dim=1, keepdim=True).clamp_min(1)
    return prompt_norms(z, prompt, normalize_tokens=True) / tokens.sqrt()
