"""Fidelity of the sparse model to the dense one on the same text.

For every next-token position: KL(p_dense || p_sparse) in nats and whether the two argmax tokens
agree. The dense reference comes from the same forward with the strategy paused.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from moyu_exp.evaluation.harness import window_prompt
from moyu_exp.models import LoadedModel
from moyu_exp.strategies import Attachment

HIGHER_IS_BETTER = {"kl": False, "top1_agreement": True}


def prefix_token(tokenizer) -> int:
    """The token lm-eval puts before a rolling window (BOS, else EOS)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


@torch.inference_mode()
def measure(
    loaded: LoadedModel,
    live: Attachment,
    documents: list[str],
    prompt_fraction: float,
    window: int = 1024,
) -> dict[str, float]:
    """Mean KL and top-1 agreement over every position of every window of ``documents``; the
    first ``prompt_fraction`` of a window is its prompt (as in the rolling-perplexity task)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    kl_sum, agree, positions, sparse = 0.0, 0, 0, 0
    for doc in tqdm(documents, desc="fidelity", leave=False):
        ids = [prefix_token(tokenizer), *tokenizer(doc, add_special_tokens=False).input_ids]
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start : start + window]], device=loaded.device)
            n = chunk.shape[1]
            roles = (torch.tensor([n]), torch.tensor([window_prompt(n, prompt_fraction)]))
            with live.segments(*roles):
                with live.paused():
                    dense = model(chunk).logits.float().log_softmax(-1)
                logits = model(chunk).logits.float().log_softmax(-1)
            kl = (dense.exp() * (dense - logits)).sum(-1)
            kl_sum += float(kl.sum())
            agree += int((dense.argmax(-1) == logits.argmax(-1)).sum())
            positions += kl.numel()
            where = live.last_positions if live.sites else None
            sparse += 0 if where is None else int(where.sparse)
    return {
        "kl": kl_sum / positions,
        "top1_agreement": agree / positions,
        "tokens": positions,
        "sparse_fraction": sparse / positions,  # positions that ran sparse (the protocol)
    }
