"""Calibration: activation statistics on a text, computed once and cached by content.

A strategy that needs calibration returns plain tensors from ``calibrate`` (thresholds, quantile
tables, means); they are stored as safetensors under ``$MOYU_CACHE_DIR/calibration``, keyed by
the model's fingerprint, what the strategy says determines them (``calibration_key``: its sites,
layers, parameters and, for thresholds calibrated in order, the sparsity), the calibration
text and its token count. A rerun, or a second task at the same point, never recalibrates.
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

VERSION = 2  # bump when a statistic's definition changes, to invalidate old cache entries


def prepare(
    strategy: Strategy, loaded: LoadedModel, cfg: DictConfig
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """Calibrate ``strategy`` if it needs it (from the cache when possible): its calibration
    state (what :meth:`Strategy.attach` takes) and metadata for results.json."""
    if not strategy.needs_calibration:
        return None, None
    start = time.perf_counter()
    documents: list[str] = build(cfg.dataset)
    batches = token_batches(
        loaded.tokenizer, documents, cfg.calibration.tokens, cfg.calibration.seq_len
    )
    tokens = sum(b.numel() for b in batches)
    data_key = cache.content_key(
        VERSION,
        loaded.info["fingerprint"],
        OmegaConf.to_container(cfg.dataset, resolve=True),
        cache.content_key(documents),
        tokens,
        cfg.calibration.seq_len,
    )
    key = cache.content_key(data_key, strategy.calibration_key())

    def cached(label: str, params: dict[str, Any], compute) -> dict[str, torch.Tensor]:
        part_key = cache.content_key(data_key, strategy.name, label, params)
        return cache.cached_tensors(f"{strategy.name}-{label}", part_key, compute)[0]

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
        "tokens": tokens,
        "seconds": round(time.perf_counter() - start, 2),
    }


def token_batches(tokenizer, documents: list[str], tokens: int, seq_len: int) -> list[torch.Tensor]:
    """Up to ``tokens`` tokens of ``documents`` (EOS between them) as equal (1, seq_len) rows
    (one shorter row when there are fewer than ``seq_len`` tokens in all)."""
    ids: list[int] = []
    for doc in documents:
        ids += tokenizer(doc, add_special_tokens=False).input_ids
        ids.append(tokenizer.eos_token_id)
        if len(ids) >= tokens:
            break
    ids = ids[:tokens]
    if len(ids) < seq_len:
        return [torch.tensor([ids])]
    return [torch.tensor([ids[i : i + seq_len]]) for i in range(0, len(ids) - seq_len + 1, seq_len)]
