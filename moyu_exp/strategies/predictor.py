"""A learned predictor (DejaVu-style, Liu et al., ICML 2023), adapted to SiLU-gated MLPs.

Per layer, a low-rank network Linear(d -> r) -> Linear(r -> d_ff) reads the MLP input and scores
every neuron; it is trained (binary cross-entropy) on the calibration text to predict which
neurons are in the token's top-k of |z|. At inference the k best-scored neurons are kept, so the
achieved sparsity is exact; how well the scores transfer to other text is what the
``predictor_shift`` probe measures. Training takes seconds to minutes on a CPU and is cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from moyu_exp.activations import observe
from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import Strategy, keep_count, register, topk_mask

torch = lazy_import("torch")

SITE = "mlp_intermediate"


@register("predictor")
@dataclass(eq=False)
class Predictor(Strategy):
    name: str = "predictor"
    sites: list[str] = field(default_factory=lambda: [SITE])
    rank: int = 128
    epochs: int = 40
    lr: float = 3e-3
    batch_size: int = 256
    seed: int = 0

    allowed_sites = (SITE,)
    needs_calibration = True
    kernel_support = False  # its scores come from a hook the lean decoder does not run

    def calibration_key(self) -> dict[str, Any]:
        params = [self.rank, self.epochs, self.lr, self.batch_size, self.seed]
        return super().calibration_key() | {"sparsity": self.sparsity, "training": params}

    def calibrate(self, model, batches, cached) -> dict[str, torch.Tensor]:
        layers = self.layer_ids(model)
        inputs, labels = training_pairs(model, batches, layers, self.sparsity)
        state = {}
        for layer in layers:
            w1, w2 = train(
                inputs[layer],
                labels[layer],
                self.rank,
                self.epochs,
                self.lr,
                self.batch_size,
                self.seed,
            )
            state[f"w1.{layer}"], state[f"w2.{layer}"] = w1, w2
        return state

    def prepare(self, model, adapter, layers, calibration) -> SimpleNamespace:
        param = next(model.parameters())
        weights = {
            layer: (
                calibration[f"w1.{layer}"].to(param.device, param.dtype),
                calibration[f"w2.{layer}"].to(param.device, param.dtype),
            )
            for layer in layers
        }
        return SimpleNamespace(weights=weights, scores={})

    def taps(self, state, model, adapter, layers) -> list:
        def predict(layer: int):
            def fn(x: torch.Tensor) -> torch.Tensor:
                state.scores[layer] = scores(x, *state.weights[layer])
                return x

            return fn

        return [(("mlp_input", layer), predict(layer)) for layer in layers]

    def keep(self, state, site, layer, x, roles) -> torch.Tensor | None:
        k = keep_count(self.sparsity, x.shape[-1])
        return None if k >= x.shape[-1] else topk_mask(state.scores[layer], k)


def scores(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Neuron logits from MLP inputs x (..., d)."""
    return (x @ w1.T) @ w2.T


def training_pairs(model, batches, layers, sparsity: float):
    """Per layer: MLP inputs (N, d) and top-k labels (N, d_ff) of the MLP intermediate."""
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    labels: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def tap(site: str, layer: int, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float().cpu()
        if site == "mlp_input":
            inputs[layer].append(rows)
        else:
            labels[layer].append(topk_mask(rows.abs(), keep_count(sparsity, rows.shape[-1])))

    keys = [(s, i) for i in layers for s in ("mlp_input", SITE)]
    observe(model, batches, keys, tap, desc="predictor data")
    return (
        {i: torch.cat(v) for i, v in inputs.items()},
        {i: torch.cat(v) for i, v in labels.items()},
    )


def train(x, y, rank: int, epochs: int, lr: float, batch_size: int, seed: int):
    """Fit the low-rank predictor with binary cross-entropy; returns (w1, w2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), torch.enable_grad():
        x, y = x.clone().float(), y.clone().float()
        d, d_ff = x.shape[1], y.shape[1]
        w1 = (torch.randn(rank, d, generator=generator) / d**0.5).requires_grad_()
        w2 = (torch.randn(d_ff, rank, generator=generator) / rank**0.5).requires_grad_()
        optimizer = torch.optim.Adam([w1, w2], lr=lr)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch_size):
                rows = order[start : start + batch_size]
                loss = loss_fn(scores(x[rows], w1, w2), y[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return w1.detach(), w2.detach()
