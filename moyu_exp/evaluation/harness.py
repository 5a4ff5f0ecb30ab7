"""lm-evaluation-harness as a library: ``HFLM(pretrained=<loaded model>)`` + ``simple_evaluate``.

No result cache is ever used (``use_cache=None``, ``cache_requests=False``), so one
configuration's scores can never be served to another. :class:`MoyuLM` only adds one thing to
``HFLM``: before each forward it tells the strategy how many tokens of every row are real (lm-eval
right-pads its batches), so padding is never counted in the achieved sparsity.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

from moyu_exp.evaluation.tasks import task_manager, task_spec
from moyu_exp.models import LoadedModel
from moyu_exp.strategies import Strategy


class MoyuLM(HFLM):
    """HFLM over an already-loaded model, reporting each batch's real token counts to ``live``."""

    def __init__(self, loaded: LoadedModel, live: Strategy, batch_size: int):
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
        self._live = live
        self._known_inputs: set[tuple[int, ...]] = set()
        self._known_lengths: list[int] = []

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        # Same input construction as HFLM: (context + continuation), left-truncated, last dropped.
        self._known_inputs = {
            tuple((ctx + cont)[-(self.max_length + 1) :][:-1]) for _, ctx, cont in requests
        }
        self._known_lengths = sorted({len(t) for t in self._known_inputs}, reverse=True)
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        finally:
            self._known_inputs, self._known_lengths = set(), []

    def _valid_length(self, row: list[int]) -> int:
        """The longest known input that ``row`` is, followed only by padding."""
        for length in self._known_lengths:
            if length <= len(row) and tuple(row[:length]) in self._known_inputs:
                if not any(row[length:]):
                    return length
        return len(row)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        lengths = torch.tensor([self._valid_length(r) for r in inps.tolist()])
        with self._live.segments(lengths):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)


def clean_metrics(result: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.6, "alias": ...}`` -> ``{"acc": 0.6}``; other filters keep their suffix."""
    cleaned = {}
    for key, value in result.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or key == "sample_len":
            continue
        metric, _, filt = key.partition(",")
        cleaned[metric if filt in ("", "none") else key] = float(value)
    return cleaned


def evaluate(
    loaded: LoadedModel,
    live: Strategy,
    tasks: list[str],
    *,
    limit: float | None,
    batch_size: int,
    num_fewshot: int | None,
    bootstrap_iters: int,
    data_dir: str | None,
    seed: int,
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Run lm-eval tasks on the (sparsified) model: ({task: {metric: value}}, per-task details)."""
    from lm_eval import simple_evaluate

    specs = [task_spec(name, data_dir) for name in tasks]
    lm = MoyuLM(loaded, live, batch_size=batch_size)
    if limit is not None and limit >= 1:
        limit = int(limit)
    out = simple_evaluate(
        model=lm,
        tasks=specs,
        num_fewshot=num_fewshot,
        limit=limit,
        use_cache=None,
        cache_requests=False,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
        task_manager=task_manager(tuple(tasks)),
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    metrics = {task: clean_metrics(res) for task, res in out["results"].items()}
    details = {
        task: {"n_samples": out.get("n-samples", {}).get(task), "version": out["versions"].get(task)}
        for task in out["results"]
    }
    return metrics, details
