"""Generation fidelity: how far the sparse model drifts along a generated continuation.

History-related activation uncertainty bites during generation: a set chosen from the prompt, or
a predictor trained on past activations, drifts as the text moves on. For each of ``prompts``
prompts (the first ``prompt_tokens`` tokens of the embedded evaluation documents) the dense
model greedily generates ``tokens`` tokens; the sparse model (the attached strategy under its
protocol: the prompt is a fresh prefill, every later token a decode step through the KV cache)
is then fed the same tokens, and at each distance d (the d-th generated token) KL(p_dense ||
p_sparse) in nats and top-1 agreement are recorded. Reported overall and per distance bucket
(1-16, 17-64, 65-256), with the model-level sparsity of the positions that ran sparse; the
per-distance means themselves (the curves ``report`` draws in ``generation.png``) go into the
run's details.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from moyu_exp.decode import ModelStepper, greedy
from moyu_exp.errors import ConfigError
from moyu_exp.evaluation.fidelity import prefix_token
from moyu_exp.models import LoadedModel
from moyu_exp.strategies import Attachment

BUCKETS = ((1, 16), (17, 64), (65, 256))
HIGHER_IS_BETTER = {"kl": False, "top1_agreement": True} | {
    f"{kind}_{low}_{high}": kind == "top1" for kind in ("kl", "top1") for low, high in BUCKETS
}


def prompts_from(loaded: LoadedModel, documents: list[str], count: int, length: int):
    """The first ``length`` tokens (after lm-eval's prefix token) of the first ``count``
    documents long enough to have them."""
    tokenizer = loaded.tokenizer
    out = []
    for doc in documents:
        ids = [prefix_token(tokenizer), *tokenizer(doc, add_special_tokens=False).input_ids]
        if len(ids) >= length:
            out.append(torch.tensor([ids[:length]], device=loaded.device))
        if len(out) == count:
            break
    return out


@torch.inference_mode()
def measure(
    loaded: LoadedModel,
    live: Attachment,
    documents: list[str],
    prompts: int,
    prompt_tokens: int,
    tokens: int,
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """KL and top-1 agreement along the dense model's own continuations: the metrics (overall
    and per bucket) and the curves, {"kl": [...], "top1": [...]}, the mean over prompts at
    each distance 1..``tokens``."""
    model = loaded.model
    starts = prompts_from(loaded, documents, prompts, prompt_tokens)
    if not starts:
        raise ConfigError(
            f"eval.generation_prompt_tokens={prompt_tokens}: no evaluation document is that long"
        )
    kl = torch.zeros(tokens, dtype=torch.float64)
    agree = torch.zeros(tokens, dtype=torch.float64)
    with live.measuring() as meter:
        for prompt in tqdm(starts, desc="generation fidelity", leave=False):
            with live.paused():
                generated, dense = greedy(ModelStepper(model), prompt, tokens)
            stepper = ModelStepper(model)
            sparse = [stepper.prefill(prompt)]
            for token in generated[:-1]:
                sparse.append(stepper.step(token))
            dense_lp = dense.float().log_softmax(-1)
            sparse_lp = torch.stack(sparse).float().log_softmax(-1)
            kl += (dense_lp.exp() * (dense_lp - sparse_lp)).sum(-1).double().cpu()
            agree += (dense_lp.argmax(-1) == sparse_lp.argmax(-1)).double().cpu()
    kl, agree = kl / len(starts), agree / len(starts)
    out: dict[str, Any] = {
        "kl": float(kl.mean()),
        "top1_agreement": float(agree.mean()),
        "prompts": len(starts),
        "tokens": tokens,
    }
    for low, high in BUCKETS:
        if low <= tokens:
            out[f"kl_{low}_{high}"] = float(kl[low - 1 : high].mean())
            out[f"top1_{low}_{high}"] = float(agree[low - 1 : high].mean())
    summary = meter.summary()
    if "model_sparsity" in summary and meter.measured:
        out["model_sparsity"] = summary["model_sparsity"]
    return out, {"kl": kl.tolist(), "top1": agree.tolist()}
