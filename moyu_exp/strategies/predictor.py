"""A learned predictor per layer, as DejaVu trains it (Liu et al., ICML 2023; FMInference/DejaVu,
``sparse_predictor/main_mlp.py``), adapted to SiLU-gated MLPs.

Per layer, a low-rank network Linear(d -> r) -> Linear(r -> d_ff) reads the block's *input*
hidden state, before the attention (DejaVu's look-ahead: the prediction can run while the
attention computes), and scores every MLP neuron. It is trained on ``train_tokens`` calibration
tokens (>= 100K; rows of the calibration source) with a class-balanced binary cross-entropy
(positives weighted by negatives / positives), Adam, and early stopping on the recall of the
true active set over a held-out ``validation_fraction`` of the tokens (the best epoch's weights
are kept). At inference each token keeps its k = round((1 - s) d_ff) best-scored neurons, so the
achieved sparsity is exact. Its cost is DejaVu's: the predicted set is known before the MLP runs,
so a dropped neuron skips its gate row, up row and down column, and the predictor's own
r (d + d_ff) weights are read every token (kernel mode reads exactly these).

Departures from DejaVu: a neuron's label is membership in the token's top-k of |z| at the
target sparsity (DejaVu's OPT has ReLU, whose label is z > 0); the predictor keeps a fixed k
rather than thresholding its probabilities at 0.5, so every method is compared at the same
sparsity; training runs on the CPU in fp32 from bf16-stored features. Training is cached with
the calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

from tqdm.auto import tqdm

from moyu_exp.activations import observe
from moyu_exp.config import FRACTION, Range
from moyu_exp.costs import announce
from moyu_exp.families import adapter_for
from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import Strategy, keep_count, register, topk_mask

torch = lazy_import("torch")

SITE = "mlp_intermediate"
INPUT = "block_input"
EPOCHS = 12  # epochs a layer's training is expected to take (early stopping), for estimates


@register("predictor")
@dataclass(eq=False)
class Predictor(Strategy):
    name: str = "predictor"
    sites: list[str] = field(default_factory=lambda: [SITE])
    rank: int = 128
    train_tokens: int = 102_400  # DejaVu trains on ~400K; at least 100K here
    validation_fraction: float = 0.1
    max_epochs: int = 30
    patience: int = 3  # epochs without a better validation recall before stopping
    lr: float = 1e-3
    batch_size: int = 1024
    seed: int = 0

    RANGES: ClassVar[dict[str, Range]] = {
        **Strategy.RANGES,
        "validation_fraction": FRACTION,
        "lr": Range(0, low_open=True),
    }
    allowed_sites = (SITE,)
    masks_from_elsewhere = True
    needs_calibration = True
    calibration_passes = 0.0  # its training estimate (data pass included) says the cost
    calibration_version = 2  # 1: MLP input, plain BCE, fixed epochs
    compact_mlp = True  # the set is known before the MLP: a dropped neuron skips 3 d weights

    def calibration_key(self) -> dict[str, Any]:
        return super().calibration_key() | {"training": self.training_params()}

    def calibration_tokens(self, requested: int) -> int:
        return max(requested, math.ceil(self.train_tokens / (1 - self.validation_fraction)))

    def training_params(self) -> dict[str, Any]:
        """What one layer's trained predictor depends on besides the model and the tokens."""
        return {
            "version": self.calibration_version,
            "sparsity": self.sparsity,
            "rank": self.rank,
            "train_tokens": self.train_tokens,
            "validation_fraction": self.validation_fraction,
            "max_epochs": self.max_epochs,
            "patience": self.patience,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def calibrate(self, model, batches, cached) -> dict[str, torch.Tensor]:
        """One predictor per layer, each cached as soon as it is trained (an interrupted
        training resumes at the first layer it had not finished)."""
        layers = self.layer_ids(model)
        params = self.training_params()
        todo = [layer for layer in layers if cached.stored(f"layer-{layer}", params) is None]
        features, labels = {}, {}
        if todo:
            tokens = sum(b.numel() for b in batches)
            announce(
                f"predictor training ({len(todo)} layers)",
                self.training_estimate(model, batches, len(todo), tokens),
                "a smaller strategy.train_tokens (or strategy.max_epochs)",
            )
            features, labels = training_pairs(model, batches, todo, self.sparsity)
        state = {}
        for layer in tqdm(layers, desc="predictor training (layers)", leave=False):

            def fit(layer: int = layer) -> dict[str, torch.Tensor]:
                result = train(features.pop(layer), labels.pop(layer), self)
                return {
                    f"w1.{layer}": result.w1,
                    f"w2.{layer}": result.w2,
                    f"recall.{layer}": torch.tensor([result.recall, result.epochs]),
                }

            state |= cached(f"layer-{layer}", params, fit)
        return state

    def training_estimate(self, model, batches, layers: int, tokens: int) -> float:
        """Seconds the data pass and the training of ``layers`` layers should take here: a
        timed forward of 256 calibration tokens and a timed training step, scaled up (an
        expected EPOCHS epochs per layer: early stopping usually ends sooner than max_epochs)."""
        import time

        sample = batches[0][:, :256]
        start = time.perf_counter()
        with torch.inference_mode():
            adapter_for(model).backbone(model)(sample, use_cache=False)
        forward = (time.perf_counter() - start) * tokens / sample.numel()
        d = adapter_for(model).dim(model, "block_input")
        d_ff = adapter_for(model).dim(model, SITE)
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.randn(self.batch_size, d)
            y = (torch.rand(self.batch_size, d_ff) < 0.5).float()
            w1 = torch.randn(self.rank, d, requires_grad=True)
            w2 = torch.randn(d_ff, self.rank, requires_grad=True)
            optimizer = torch.optim.Adam([w1, w2], lr=self.lr)
            start = time.perf_counter()
            for _ in range(3):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(scores(x, w1, w2), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            step = (time.perf_counter() - start) / 3
        steps = math.ceil(self.train_tokens / self.batch_size)
        epochs = min(EPOCHS, self.max_epochs)
        return forward + layers * epochs * steps * step

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

        return [((INPUT, layer), predict(layer)) for layer in layers]

    def extra_weights(self, state) -> dict[tuple[str, int], int]:
        """The predictor's own weights, read every token: W1 (r x d) and W2 (d_ff x r)."""
        return {(SITE, i): w1.numel() + w2.numel() for i, (w1, w2) in state.weights.items()}

    def scorer(self, state, layer: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        w1, w2 = state.weights[layer]
        return w1, w2, keep_count(self.sparsity, w2.shape[0])

    def keep(self, state, site, layer, x, where) -> torch.Tensor | None:
        k = keep_count(self.sparsity, x.shape[-1])
        return None if k >= x.shape[-1] else topk_mask(state.scores[layer], k)


def scores(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Neuron logits from block inputs x (..., d)."""
    return (x @ w1.T) @ w2.T


def training_pairs(model, batches, layers, sparsity: float):
    """Per layer: block inputs (N, d), stored as bf16, and the top-k labels of the MLP
    intermediate (N, d_ff), packed 8 to a byte (one pass over the calibration rows)."""
    import numpy as np

    features: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    labels: dict[int, list[np.ndarray]] = {i: [] for i in layers}

    def tap(site: str, layer: int, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1])
        if site == INPUT:
            features[layer].append(rows.to(torch.bfloat16).cpu())
        else:
            top = topk_mask(rows.abs(), keep_count(sparsity, rows.shape[-1])).cpu().numpy()
            labels[layer].append(np.packbits(top, axis=-1))

    keys = [(s, i) for i in layers for s in (INPUT, SITE)]
    observe(model, batches, keys, tap, desc="predictor data")
    return (
        {i: torch.cat(v) for i, v in features.items()},
        {i: np.concatenate(v) for i, v in labels.items()},
    )


@dataclass
class Trained:
    w1: torch.Tensor
    w2: torch.Tensor
    recall: float  # validation recall of the kept epoch
    epochs: int


def train(features, packed_labels, cfg: Predictor) -> Trained:
    """Fit one layer's predictor (see the module docstring); the last validation_fraction of
    the tokens is held out."""
    import numpy as np

    generator = torch.Generator().manual_seed(cfg.seed)
    d_ff = packed_labels.shape[1] * 8
    total = len(features)
    split = total - max(1, int(total * cfg.validation_fraction))

    def rows(index) -> tuple[torch.Tensor, torch.Tensor]:
        x = features[index].float()
        bits = np.unpackbits(packed_labels[index.numpy()], axis=-1)[:, :d_ff]
        return x, torch.from_numpy(bits).float()

    k = keep_count(cfg.sparsity, d_ff)
    positive = k / d_ff
    with torch.inference_mode(False), torch.enable_grad():
        d = features.shape[1]
        w1 = (torch.randn(cfg.rank, d, generator=generator) / d**0.5).requires_grad_()
        w2 = (torch.randn(d_ff, cfg.rank, generator=generator) / cfg.rank**0.5).requires_grad_()
        optimizer = torch.optim.Adam([w1, w2], lr=cfg.lr)
        balance = torch.tensor((1 - positive) / max(positive, 1e-6))  # negatives / positives
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=balance)
        validation = torch.arange(split, total)
        best = Trained(w1.detach().clone(), w2.detach().clone(), -1.0, 0)
        stale = 0
        for epoch in range(1, cfg.max_epochs + 1):
            order = torch.randperm(split, generator=generator)
            for start in range(0, split, cfg.batch_size):
                x, y = rows(order[start : start + cfg.batch_size])
                loss = loss_fn(scores(x, w1, w2), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            recall = validation_recall(rows, validation, w1.detach(), w2.detach(), k)
            if recall > best.recall:
                best, stale = Trained(w1.detach().clone(), w2.detach().clone(), recall, epoch), 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        return best


def validation_recall(rows, index: torch.Tensor, w1, w2, k: int, chunk: int = 4096) -> float:
    """Mean over held-out tokens of |predicted top-k ∩ true active set| / |true active set|."""
    hits = truth = 0.0
    for start in range(0, len(index), chunk):
        x, y = rows(index[start : start + chunk])
        predicted = topk_mask(scores(x, w1, w2), k)
        hits += float((predicted & y.bool()).sum())
        truth += float(y.sum())
    return hits / max(truth, 1.0)
