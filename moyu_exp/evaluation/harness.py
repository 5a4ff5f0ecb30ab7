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
from moyu_exp.strategies import Attachment


def window_prompt(tokens: int, fraction: float) -> int:
    """Prompt length of a window that has no prompt of its own (rolling perplexity, fidelity)."""
    return min(tokens, max(1, round(tokens * fraction)))


class MoyuLM(HFLM):
    """HFLM over an already-loaded model that declares every batch row's token roles to ``live``.

    lm-eval right-pads its batches and scores a multiple-choice item in one forward over
    context + continuation; before each forward the strategy learns each row's real length and
    where its context ends, so padding is never counted and a sequence-level method selects from
    the context only. Rolling-perplexity windows have a one-token context; for them the first
    ``prompt_fraction`` of the window plays the prompt.
    """

    def __init__(
        self, loaded: LoadedModel, live: Attachment, batch_size: int, prompt_fraction: float
    ):
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
        self._live = live
        self._prompt_fraction = prompt_fraction
        self._rolling = False
        self._prompts: dict[tuple[int, ...], int] = {}
        self._lengths: list[int] = []

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._rolling = True
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm)
        finally:
            self._rolling = False

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        prompts: dict[tuple[int, ...], int] = {}
        for _, context, continuation in requests:
            # The same input HFLM builds: (context + continuation), left-truncated, last dropped.
            inp = tuple((context + continuation)[-(self.max_length + 1) :][:-1])
            if self._rolling:
                prompt = window_prompt(len(inp), self._prompt_fraction)
            else:
                prompt = max(0, len(inp) - len(continuation) + 1)
            prompts[inp] = min(prompt, prompts.get(inp, prompt))
        self._prompts, self._lengths = prompts, sorted({len(t) for t in prompts}, reverse=True)
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        finally:
            self._prompts, self._lengths = {}, []

    def _row_segment(self, row: list[int]) -> tuple[int, int]:
        """(real tokens, prompt tokens) of a batch row: the longest known input it starts with,
        followed only by padding. Rows from elsewhere count in full, all prompt."""
        for length in self._lengths:
            known = tuple(row[:length]) if length <= len(row) else None
            if known in self._prompts and not any(row[length:]):
                return length, self._prompts[known]
        return len(row), len(row)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        valid, prompt = zip(*(self._row_segment(r) for r in inps.tolist()), strict=True)
        with self._live.segments(torch.tensor(valid), torch.tensor(prompt)):
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
    live: Attachment,
    tasks: list[str],
    *,
    limit: float | None,
    batch_size: int,
    num_fewshot: int | None,
    bootstrap_iters: int,
    data_dir: str | None,
    prompt_fraction: float,
    seed: int,
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Run lm-eval tasks on the (sparsified) model: ({task: {metric: value}}, per-task details)."""
    from lm_eval import simple_evaluate

    specs = [task_spec(name, data_dir) for name in tasks]
    lm = MoyuLM(loaded, live, batch_size=batch_size, prompt_fraction=prompt_fraction)
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
        task: {
            "n_samples": out.get("n-samples", {}).get(task),
            "version": out["versions"].get(task),
            "higher_is_better": out.get("higher_is_better", {}).get(task, {}),
        }
        for task in out["results"]
    }
    return metrics, details
