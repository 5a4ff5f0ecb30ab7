"""Calibration: activation statistics on a text, computed once and cached by content.

A strategy that needs calibration returns plain tensors from ``calibrate`` (thresholds, quantile
tables, means); they are stored as safetensors under ``$MOYU_CACHE_DIR/calibration``, keyed by
the model's fingerprint, what the strategy says determines them (``calibration_key``: its sites,
layers, parameters and, for thresholds calibrated in order, the sparsity), the calibration
text and its token count. A rerun, or a second task at the same point, never recalibrates.

The text is ``dataset`` (by default the project's calibration prose, then CPython's own
documentation), tokenized into rows of ``calibration.seq_len`` tokens (2,048, capped by the
model's context), ``calibration.tokens`` in all (16,384; a strategy may need more, e.g. a
learned predictor). Fewer tokens than asked for is a warning; results.json records the tokens
really used.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from moyu_exp import cache
from moyu_exp.config import build
from moyu_exp.models import LoadedModel
from moyu_exp.strategies import Strategy

log = logging.getLogger(__name__)

VERSION = 3  # bump when a statistic's definition changes, to invalidate old cache entries


def prepare(
    strategy: Strategy, loaded: LoadedModel, cfg: DictConfig
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """Calibrate ``strategy`` if it needs it (from the cache when possible): its calibration
    state (what :meth:`Strategy.attach` takes) and metadata for results.json (the source, the
    tokens asked for and really used, the rows)."""
    if not strategy.needs_calibration:
        return None, None
    start = time.perf_counter()
    documents: list[str] = build(cfg.dataset)
    wanted = strategy.calibration_tokens(cfg.calibration.tokens)
    seq_len = min(cfg.calibration.seq_len, context_length(loaded.model))
    batches = token_batches(loaded.tokenizer, documents, wanted, seq_len)
    tokens = sum(b.numel() for b in batches)
    if tokens < wanted:
        log.warning(
            "calibration: dataset '%s' has only %d of the %d tokens asked for; calibrating %s "
            "on those (choose a larger source, e.g. dataset=default or dataset=wikitext2)",
            cfg.dataset.name,
            tokens,
            wanted,
            strategy.name,
        )
    data_key = cache.content_key(
        VERSION,
        loaded.info["fingerprint"],
        OmegaConf.to_container(cfg.dataset, resolve=True),
        cache.content_key(documents),
        tokens,
        seq_len,
    )
    key = cache.content_key(data_key, strategy.calibration_key())

    def cached(
        label: str, params: dict[str, Any], compute, owner: str | None = None
    ) -> dict[str, torch.Tensor]:
        owner = owner or strategy.name  # another method's name: share its cached part
        part_key = cache.content_key(data_key, owner, label, params)
        return cache.cached_tensors(f"{owner}-{label}", part_key, compute)[0]

    def compute() -> dict[str, torch.Tensor]:
        log.info("calibrating %s on %d tokens of '%s'", strategy.name, tokens, cfg.dataset.name)
        with torch.inference_mode():
            ids = [b.to(loaded.device) for b in batches]
            return strategy.calibrate(loaded.model, ids, cached)

    state, hit = cache.cached_tensors(strategy.name, key, compute)
    return state, {
        "cache": "hit" if hit else "miss",
        "key": key,
        "dataset": cfg.dataset.name,
        "tokens_requested": wanted,
        "tokens_used": tokens,
        "rows": len(batches),
        "seq_len": seq_len,
        "seconds": round(time.perf_counter() - start, 2),
    }


def context_length(model) -> int:
    """The longest sequence the model was built for (positions), or a generous default."""
    return int(getattr(model.config, "max_position_embeddings", None) or 1 << 20)


def token_stream(tokenizer, documents: list[str], limit: int | None = None) -> list[int]:
    """The documents' tokens, EOS after each (the first ``limit`` or more; all when None)."""
    ids: list[int] = []
    for doc in documents:
        ids += tokenizer(doc, add_special_tokens=False).input_ids
        ids.append(tokenizer.eos_token_id)
        if limit is not None and len(ids) >= limit:
            break
    return ids


def token_batches(tokenizer, documents: list[str], tokens: int, seq_len: int) -> list[torch.Tensor]:
    """Up to ``tokens`` tokens of ``documents`` (EOS between them) as equal (1, seq_len) rows
    (one shorter row when there are fewer than ``seq_len`` tokens in all)."""
    ids = token_stream(tokenizer, documents, tokens)[:tokens]
    if len(ids) < seq_len:
        return [torch.tensor([ids])]
    return [torch.tensor([ids[i : i + seq_len]]) for i in range(0, len(ids) - seq_len + 1, seq_len)]
