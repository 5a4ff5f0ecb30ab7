"""lm-evaluation-harness as a library: ``HFLM(pretrained=<loaded model>)`` + ``simple_evaluate``.

No result cache is ever used (``use_cache=None``, ``cache_requests=False``), so one
configuration's scores can never be served to another. :class:`MoyuLM` only adds one thing to
``HFLM``: before each forward it tells the strategy how many tokens of every row are real (lm-eval
right-pads its batches), so padding is never counted in the achieved sparsity.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
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
    ``prompt_fraction`` of the window plays the prompt. After each forward it counts, per task,
    how many of the positions whose logits are scored (those that predict continuation tokens)
    ran sparse under the strategy's protocol (``scored``: task -> [sparse, total]).
    """

    def __init__(
        self, loaded: LoadedModel, live: Attachment, batch_size: int, prompt_fraction: float
    ):
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
        self._live = live
        self._prompt_fraction = prompt_fraction
        self._rolling_task: str | None = None
        self._task_of: dict[Any, str] = {}
        self._rows: dict[tuple[int, ...], tuple[int, int, str | None]] = {}
        self._lengths: list[int] = []
        self.scored: dict[str, list[int]] = {}

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._task_of = {req.args: req.task_name for req in requests}
        try:
            return super().loglikelihood(requests, disable_tqdm)
        finally:
            self._task_of = {}

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """Each task's documents in turn (so that every window is attributed to its task)."""
        out: list[Any] = [None] * len(requests)
        for task in dict.fromkeys(req.task_name for req in requests):
            indices = [i for i, req in enumerate(requests) if req.task_name == task]
            self._rolling_task = task
            try:
                results = super().loglikelihood_rolling(
                    [requests[i] for i in indices], disable_tqdm
                )
            finally:
                self._rolling_task = None
            for i, value in zip(indices, results, strict=True):
                out[i] = value
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        rows: dict[tuple[int, ...], tuple[int, int, str | None]] = {}
        inputs = rows_of(requests, self.max_length)
        for (key, _, continuation), inp in zip(requests, inputs, strict=True):
            if self._rolling_task is not None:
                prompt = window_prompt(len(inp), self._prompt_fraction)
                task = self._rolling_task
            else:
                prompt = max(0, len(inp) - len(continuation) + 1)
                task = self._task_of.get(key)
            scored = min(len(continuation), len(inp))
            if inp not in rows or prompt < rows[inp][0]:
                rows[inp] = (prompt, scored, task)
        self._rows, self._lengths = rows, sorted({len(t) for t in rows}, reverse=True)
        try:
            lengths = [len(inp) for inp in inputs]
            chunks = budgeted_chunks(lengths, self.batch_size, batch_token_budget(self._model))
            if len(chunks) == 1:  # lm-eval's own batching
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            out: list[Any] = [None] * len(requests)
            previous = self.batch_size_per_gpu
            try:
                for chunk in chunks:  # long windows in smaller batches, alone if need be
                    self.batch_size_per_gpu = len(chunk)
                    results = super()._loglikelihood_tokens([requests[i] for i in chunk], True)
                    for i, result in zip(chunk, results, strict=True):
                        out[i] = result
            finally:
                self.batch_size_per_gpu = previous
            return out
        finally:
            self._rows, self._lengths = {}, []

    def _row_segment(self, row: list[int]) -> tuple[int, int, int, str | None]:
        """(real tokens, prompt tokens, scored positions at its end, task) of a batch row: the
        longest known input it starts with, followed only by padding. Rows from elsewhere count
        in full, all prompt, none scored."""
        for length in self._lengths:
            known = tuple(row[:length]) if length <= len(row) else None
            if known in self._rows and not any(row[length:]):
                return (length, *self._rows[known])
        return len(row), len(row), 0, None

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        segments = [self._row_segment(r) for r in inps.tolist()]
        valid = torch.tensor([s[0] for s in segments])
        prompt = torch.tensor([s[1] for s in segments])
        with self._live.segments(valid, prompt):
            out = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        self._count_scored(segments)
        return out

    def _count_scored(self, segments: list[tuple[int, int, int, str | None]]) -> None:
        where = self._live.last_positions if self._live.sites else None
        active = None if where is None or where.active is None else where.active.cpu()
        for row, (length, _, scored, task) in enumerate(segments):
            if task is None or not scored:
                continue
            counts = self.scored.setdefault(task, [0, 0])
            if where is not None:
                counts[0] += (
                    scored if active is None else int(active[row, length - scored : length].sum())
                )
            counts[1] += scored


def rows_of(requests, max_length: int) -> list[tuple[int, ...]]:
    """The input each request becomes in HFLM: (context + continuation), left-truncated to
    ``max_length + 1`` tokens, the last dropped."""
    return [tuple((ctx + cont)[-(max_length + 1) :][:-1]) for _, ctx, cont in requests]


def batch_token_budget(model, share: float = 0.5) -> int:
    """How many tokens one forward may hold within ``share`` of the free memory, counting the
    full-vocabulary logits and their log-softmax (fp32) and a margin for the rest."""
    import torch

    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    per_token = 3 * 4 * vocab + 64 * model.config.hidden_size
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = available_memory()
    return max(1, int(share * free / per_token))


def available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (or 8 GiB where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 << 30


def budgeted_chunks(lengths: list[int], batch_size: int, budget: int) -> list[list[int]]:
    """Request indices in batches: one batch of everything when lm-eval's own batches of
    ``batch_size`` fit the token ``budget`` (then lm-eval batches them itself), else longest
    first, as many per batch as the budget allows (one at least)."""
    if not lengths or max(lengths) * min(batch_size, len(lengths)) <= budget:
        return [list(range(len(lengths)))]
    if max(lengths) > budget:
        from moyu_exp.errors import EnvironmentFault

        raise EnvironmentFault(
            f"a {max(lengths)}-token input needs more memory for its logits than is free "
            f"(room for {budget} tokens): shorten the task's inputs or free memory"
        )
    chunks: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        current = chunks[-1] if chunks else None
        fits = current is not None and len(current) < batch_size
        if fits and (len(current) + 1) * lengths[current[0]] <= budget:
            current.append(i)
        else:
            chunks.append([i])
    return chunks


def sparse_fraction(counts: list[int] | None) -> float | None:
    """Sparse / total of [sparse, total] counts (None when nothing was counted)."""
    return counts[0] / counts[1] if counts and counts[1] else None


@functools.cache
def environment_report_once() -> None:
    """``simple_evaluate`` adds torch's environment report to every result; building it runs
    ``pip list`` and other commands (about 0.5 s here, more in a large environment), and a sweep
    evaluates every point in one process. The report cannot change within a process and we keep
    none of it (results.json has its own ``env``), so it is built once per process."""
    from torch.utils import collect_env

    collect_env.get_pretty_env_info = functools.cache(collect_env.get_pretty_env_info)


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

    environment_report_once()
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
        log_samples=True,  # each item's score (:func:`item_scores`)
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
            "sparse_scored_fraction": sparse_fraction(lm.scored.get(task)),
            "items": item_scores((out.get("samples") or {}).get(task) or []),
        }
        for task in out["results"]
    }
    return metrics, details


def item_scores(samples: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each item's score as lm-eval logged it: {"doc_id": [...], metric: [...]} by doc id, for
    every per-item number (acc, acc_norm, ...; the unfiltered responses). Two points scored on
    the same items can then be compared item by item (paired errors, :mod:`moyu_exp.trinity`)."""
    rows = sorted((s for s in samples if s.get("filter", "none") == "none"), key=_doc_id)
    if not rows:
        return {}
    names = [m for m in rows[0].get("metrics", []) if all(_is_number(r.get(m)) for r in rows)]
    if not names:
        return {}
    out: dict[str, list[float]] = {"doc_id": [_doc_id(r) for r in rows]}
    for name in names:
        out[name] = [_compact(r[name]) for r in rows]
    return out


def _doc_id(sample: dict[str, Any]) -> int:
    return int(sample["doc_id"])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _compact(value: float) -> float:
    """1.0 -> 1 (a 0/1 score is most of a task's items: half the bytes in results.json)."""
    return int(value) if float(value).is_integer() else float(value)
