"""LaRoSA: per-token top-k of each layer's linear inputs in a PCA-rotated basis (Liu et al.,
"La RoSA: Layerwise Rotated Sparse Activation", ICML 2025; alibaba/EfficientAI ``larosa/``).

As published (the paper and its public code, ``inference/modeling_llama_larosa.py`` and
``gen_act/grab_acts_rotate_diff_Q_llama.py``), by default:

- one orthogonal Q_l per layer: the eigenvectors of the damped second-moment matrix
  sum_t x_t^T x_t (+ 0.01 mean diag) of the layer's attention input (after ``input_layernorm``)
  on the calibration rows (the code uses 10 x 2048 tokens of wikitext; here the calibration text),
  in float64;
- the attention input and the MLP input of layer l are rotated by the same Q_l (x -> x Q_l) and
  the k = round((1 - 0.8 s) d) largest |x Q_l| are kept (``input_factor``); the readers compute
  with W Q_l, so that W (top-k(x Q_l) Q_l^T) = (W Q_l) top-k(x Q_l): exact when nothing is
  dropped. The o_proj and down_proj inputs keep their top-k at 1.2 s without rotation
  (``output_factor``), as the code does; a level is capped so that one entry stays;
- every position runs sparse (``prefill=sparse``): the code applies top-k to every token.

Top-k per token is LaRoSA's point: the sparsity of each site is exactly the target on every
token, so the speed-up does not vary with the input.

Departures: k is rounded where the code truncates (and keeps ties); the paper folds Q_l into the
residual stream as SliceGPT does (norm gains into the weights, an adapter Q_l^T Q_(l+1) between
layers), while its public code and this module apply the rotation to the normalised input
online. The kernel path does the same: each rotated input costs one d x d product, charged as
d^2 weights read per token (the folded form would read one adapter of d^2 per layer instead of
two rotations). At sparsity 0 nothing is rotated, so the model is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

from moyu_exp.activations import observe
from moyu_exp.config import Range
from moyu_exp.lazy import lazy_import
from moyu_exp.masking import KernelRule
from moyu_exp.strategies.base import Strategy, register, topk_rule
from moyu_exp.strategies.teal import TEAL_SITES

torch = lazy_import("torch")

ROTATED = ("attn_input", "mlp_input")  # the block inputs, rotated by the layer's Q
COVARIANCE_SITE = "attn_input"  # whose second moments define Q_l (the code's self_attn h1)


@register("larosa")
@dataclass(eq=False)
class Larosa(Strategy):
    name: str = "larosa"
    sites: list[str] = field(default_factory=lambda: list(TEAL_SITES))
    prefill: str = "sparse"  # LaRoSA's code applies top-k at every position
    input_factor: float = 0.8  # level of the rotated block inputs: factor x sparsity
    output_factor: float = 1.2  # level of the o_proj and down_proj inputs
    damp: float = 0.01  # added to the diagonal: damp x its mean
    rotate: bool = True  # false: the same top-k levels without the rotation (ablation)

    RANGES: ClassVar[dict[str, Range]] = {
        **Strategy.RANGES,
        "input_factor": Range(0, low_open=True),
        "output_factor": Range(0, low_open=True),
        "damp": Range(0),
    }
    allowed_sites = TEAL_SITES
    calibration_version = 1
    calibration_passes = 1.3  # one pass and the eigendecompositions

    @property
    def rotated(self) -> bool:
        """The rotation is applied (never at sparsity 0, where it would change only rounding)."""
        return self.rotate and self.sparsity > 0.0

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.rotated

    def calibration_key(self) -> dict[str, Any]:
        return super().calibration_key() | {"damp": self.damp, "site": COVARIANCE_SITE}

    def level(self, site: str, dim: int) -> float:
        factor = self.input_factor if site in ROTATED else self.output_factor
        return min(factor * self.sparsity, 1.0 - 1.0 / dim)

    # ------------------------------------------------------------------ calibration
    def calibrate(self, model, batches, cached) -> dict[str, torch.Tensor]:
        """Q_l per layer: eigenvectors of the damped second moments of the attention input."""
        layers = self.layer_ids(model)
        moments: dict[int, torch.Tensor] = {}

        def accumulate(_site: str, layer: int, x: torch.Tensor) -> None:
            x = x.reshape(-1, x.shape[-1]).double()
            moments[layer] = moments.get(layer, 0) + x.t() @ x

        keys = [(COVARIANCE_SITE, layer) for layer in layers]
        observe(model, batches, keys, accumulate, desc="LaRoSA covariance")
        return {
            f"rotation.{layer}": pca_rotation(moments[layer], self.damp).float() for layer in layers
        }

    # -------------------------------------------------------------------- decisions
    def prepare(self, model, adapter, layers, calibration) -> SimpleNamespace:
        blocks = adapter.layers(model)
        state = SimpleNamespace(rules={}, rotations={}, weights={}, extra={})
        for layer in layers:
            rotation = None
            if self.rotated:
                weight = adapter.readers(blocks[layer], ROTATED[0])[0].weight
                rotation = calibration[f"rotation.{layer}"].double().to(weight.device)
            for site in self.sites:
                dim = adapter.dim(model, site)
                state.rules[(site, layer)] = topk_rule(self.level(site, dim), dim)
                if rotation is None or site not in ROTATED:
                    continue
                readers = adapter.readers(blocks[layer], site)
                dtype = readers[0].weight.dtype
                state.rotations[(site, layer)] = rotation.to(dtype)
                for linear in readers:
                    state.weights[linear] = (linear.weight.double() @ rotation).to(dtype)
                state.extra[(site, layer)] = dim * dim  # x Q_l: one d x d product per token
        return state

    def kernel_rule(self, state, site: str, layer: int) -> KernelRule:
        return state.rules[(site, layer)]

    def basis(self, state, site: str, layer: int) -> torch.Tensor | None:
        return state.rotations.get((site, layer))

    def patches(self, state, model, adapter, layers) -> list[tuple[Any, str, Any]]:
        """The readers of a rotated input compute with W Q_l."""
        return [
            (linear, "weight", torch.nn.Parameter(weight, requires_grad=False))
            for linear, weight in state.weights.items()
        ]

    def extra_weights(self, state) -> dict[tuple[str, int], int]:
        return dict(state.extra)


def pca_rotation(moments: torch.Tensor, damp: float) -> torch.Tensor:
    """Orthogonal eigenvectors (columns, float64) of ``moments`` with ``damp`` x its mean
    diagonal added (LaRoSA's ``perform_eigen_decomp``)."""
    matrix = moments.double().clone()
    matrix.diagonal().add_(damp * matrix.diagonal().mean())
    return torch.linalg.eigh(matrix).eigenvectors
