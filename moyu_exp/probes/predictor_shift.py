"""History-related uncertainty for learned predictors: trained on one source, do they transfer?

A DejaVu predictor per layer (the ``predictor`` strategy: look-ahead input, class-balanced
BCE, early stopping on validation recall) is trained on ``train_tokens`` of the calibration
source (A: by default the project's calibration prose, then CPython's documentation). Its
predictions are scored against the true top-k sets on held-out text of the same source (A: the
tokens right after those it trained on) and of another source (B: the project's evaluation
prose, never calibrated on): precision and recall of the neurons it calls active (logit > 0)
and recall@k of its top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

from moyu_exp.activations import observe
from moyu_exp.lazy import lazy_import
from moyu_exp.probes import common, figures
from moyu_exp.probes.base import Probe, ProbeOutput, register
from moyu_exp.strategies.base import topk_mask
from moyu_exp.strategies.predictor import INPUT, Predictor, scores

torch = lazy_import("torch")


@register("predictor_shift")
@dataclass(eq=False)
class PredictorShift(Probe):
    name: str = "predictor_shift"
    tokens: int = 1024  # held-out tokens of each source scored
    rank: int = 128
    train_tokens: int = 102_400
    max_epochs: int = 30

    question = "Does a predictor trained on one text predict the active neurons of another?"

    def run(self, loaded, cfg) -> ProbeOutput:
        predictor = Predictor(
            sparsity=self.sparsity,
            rank=self.rank,
            train_tokens=self.train_tokens,
            max_epochs=self.max_epochs,
        )
        from moyu_exp import calibration
        from moyu_exp.config import build

        state, meta = calibration.prepare(predictor, loaded, cfg)
        layers = predictor.layer_ids(loaded.model)
        source = calibration.token_stream(loaded.tokenizer, build(cfg.dataset))
        used = meta["tokens_used"]
        evaluation = {
            "A_heldout": torch.tensor([source[used : used + self.tokens]]),
            "B_other_source": _eval_prose(loaded.tokenizer, self.tokens),
        }
        numbers: dict = {
            "trained_on": meta["dataset"],
            "calibration_tokens": used,
            "A_heldout_tokens": int(evaluation["A_heldout"].numel()),
            "validation_recall": {
                "per_layer": [float(state[f"recall.{i}"][0]) for i in layers],
                "epochs": [int(state[f"recall.{i}"][1]) for i in layers],
            },
        }
        for name, ids in evaluation.items():
            metrics = self.score(loaded, state, layers, ids)
            numbers[name] = {
                key: {"per_layer": values.tolist(), "mean": float(values.mean())}
                for key, values in metrics.items()
            }
        fig, axes = figures.figure(3, width=4.6, height=3.8)
        for ax, metric in zip(axes, ("precision", "recall", "recall_at_k"), strict=True):
            for name, style in (("A_heldout", "-"), ("B_other_source", "--")):
                ax.plot(layers, numbers[name][metric]["per_layer"], style, label=name)
            ax.set(xlabel="layer", ylabel=metric, ylim=(0, 1), title=metric)
            ax.legend(fontsize=7)
        return ProbeOutput(numbers, {"predictor_shift": figures.finish(fig, self.question)})

    def score(self, loaded, state, layers, ids) -> dict[str, torch.Tensor]:
        inputs: dict[int, torch.Tensor] = {}
        truth: dict[int, torch.Tensor] = {}

        def tap(site: str, layer: int, x: torch.Tensor) -> None:
            rows = x[0].float().cpu()
            if site == INPUT:
                inputs[layer] = rows
            else:
                truth[layer] = common.topk_sets(rows, self.sparsity)

        keys = [(s, i) for i in layers for s in (INPUT, "mlp_intermediate")]
        observe(loaded.model, [ids.to(loaded.device)], keys, tap, desc="predictor eval")
        out = {"precision": [], "recall": [], "recall_at_k": []}
        for layer in layers:
            logits = scores(inputs[layer], state[f"w1.{layer}"], state[f"w2.{layer}"])
            called = logits > 0
            hits = (called & truth[layer]).sum().float()
            out["precision"].append(hits / called.sum().clamp_min(1))
            out["recall"].append(hits / truth[layer].sum().clamp_min(1))
            k = int(truth[layer][0].sum())
            top = topk_mask(logits, k)
            out["recall_at_k"].append((top & truth[layer]).sum().float() / truth[layer].sum())
        return {key: torch.stack(values) for key, values in out.items()}


def _eval_prose(tokenizer, tokens: int) -> torch.Tensor:
    from moyu_exp import datasets

    text = "\n\n".join(datasets.embedded(split="evaluation"))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return torch.tensor([ids[:tokens]])
