"""Calibration: activation statistics on a text, computed once and cached by content.

A strategy that needs calibration returns plain tensors from ``calibrate`` (thresholds, quantile
tables, greedy paths); they are stored as safetensors under ``$MOYU_CACHE_DIR/calibration``,
keyed by a digest of the model's weights, the calibration tokens actually used (a digest of the
token ids, not of the text they were cut from) and what the strategy says determines them
(``calibration_key``: its sites, layers, parameters and version). A rerun, or a second task at
the same point, never recalibrates.

Costly parts (TEAL's and WINA's greedy paths, dense statistics) are stored apart through
:class:`Parts`, so that methods and sparsities share them; a part may also come from the files
shipped with the package (:mod:`moyu_exp.shipped`: the greedy paths of the built-in models), used
only when their key, which holds all of the above, matches. ``results.json`` records where each
part came from (``shipped``, ``cache``, ``computed``) and the token digest.

The text is ``dataset`` (by default the project's calibration prose, then CPython's
documentation), tokenized into rows of ``calibration.seq_len`` tokens (2,048, capped by the
model's context), ``calibration.tokens`` in all (16,384; a strategy may need more, e.g. a
learned predictor). Fewer tokens than asked for is a warning; results.json records the tokens
really used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig

from moyu_exp import cache, shipped
from moyu_exp.config import build
from moyu_exp.costs import announce
from moyu_exp.models import LoadedModel, weights_fingerprint
from moyu_exp.strategies import Strategy

log = logging.getLogger(__name__)

# bump when a statistic's definition changes, to invalidate old cache entries (and shipped
# files: their test says so)
VERSION = 4  # 4: keyed by the weights and the token ids
ORIGINS = ("shipped", "cache", "computed")


class Parts:
    """The costly parts of one calibration, each under its own key (the model's weights, the
    tokens, the owner, the part's label and parameters): read from the shipped files, from the
    cache, or computed and cached. ``origins`` counts where each part kind came from."""

    def __init__(self, data_key: str, owner: str, use_shipped: bool = True):
        self.data_key = data_key
        self.owner = owner  # the calibrating strategy: the default owner of its parts
        self.use_shipped = use_shipped
        self.origins: dict[str, Counter] = {}
        # {label: (key, tensors)} of every part used, when set (what moyu_exp.shipped writes)
        self.keep: dict[str, tuple[str, dict]] | None = None

    def key(self, owner: str, label: str, params: dict[str, Any]) -> str:
        return cache.content_key(self.data_key, owner, label, params)

    def _record(self, label: str, origin: str, key: str, tensors: dict) -> None:
        kind = re.sub(r"-\d+$", "", label)  # greedy-12 -> greedy
        self.origins.setdefault(kind, Counter())[origin] += 1
        if self.keep is not None:
            self.keep[label] = (key, tensors)

    def __call__(
        self,
        label: str,
        params: dict[str, Any],
        compute: Callable[[], dict],
        owner: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """The tensors of a part, as stored or from ``compute()``; ``owner`` (another strategy's
        name) shares that strategy's part (TEAL's greedy paths, read by moyu)."""
        owner = owner or self.owner
        key = self.key(owner, label, params)
        found = shipped.find(key) if self.use_shipped else None
        if found is not None:
            self._record(label, "shipped", key, found)
            return found
        tensors, hit = cache.cached_tensors(f"{owner}-{label}", key, compute)
        self._record(label, "cache" if hit else "computed", key, tensors)
        return tensors

    def stored(
        self, label: str, params: dict[str, Any], owner: str | None = None
    ) -> dict[str, torch.Tensor] | None:
        """A part's tensors if shipped or cached, else None (nothing is computed)."""
        owner = owner or self.owner
        key = self.key(owner, label, params)
        found = shipped.find(key) if self.use_shipped else None
        return found if found is not None else cache.read_cached(f"{owner}-{label}", key)

    def stored_path(
        self, label: str, params: dict[str, Any], owner: str | None = None
    ) -> tuple[torch.Tensor | None, str]:
        """The longest stored rows of a prefix-closed part (a greedy path: a longer one starts
        with a shorter one), shipped or cached, and where they came from."""
        owner = owner or self.owner
        key = self.key(owner, label, params)
        best, origin = None, "computed"
        shipped_rows = shipped.find(key) if self.use_shipped else None
        for source, found in (
            ("shipped", shipped_rows),
            ("cache", cache.read_cached(owner + "-" + label, key)),
        ):
            if found is not None and (best is None or len(found["path"]) > len(best)):
                best, origin = found["path"], source
        return best, origin

    def path(
        self,
        label: str,
        params: dict[str, Any],
        enough: Callable[[torch.Tensor], bool],
        search: Callable[[torch.Tensor | None], torch.Tensor],
        owner: str | None = None,
    ) -> torch.Tensor:
        """A prefix-closed part: the stored rows when they are ``enough``, else ``search``
        continuing the longest stored rows (None: from the start), cached once found (under a
        lock: parallel jobs search it once)."""
        owner = owner or self.owner
        kind = f"{owner}-{label}"
        key = self.key(owner, label, params)
        with cache.exclusive(cache.entry(kind, key)):
            rows, origin = self.stored_path(label, params, owner)
            if rows is None or not enough(rows):
                rows, origin = search(rows), "computed"
                cache.write_cached(kind, key, {"path": rows})
        self._record(label, origin, key, {"path": rows})
        return rows

    def summary(self) -> dict[str, str]:
        """{part kind: origin} ("shipped", or "shipped 28, computed 2" when mixed)."""
        out = {}
        for kind, counts in self.origins.items():
            ordered = [o for o in ORIGINS if counts.get(o)]
            out[kind] = (
                ordered[0] if len(ordered) == 1 else ", ".join(f"{o} {counts[o]}" for o in ordered)
            )
        return out


def prepare(
    strategy: Strategy, loaded: LoadedModel, cfg: DictConfig
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """Calibrate ``strategy`` if it needs it (from the cache when possible): its calibration
    state (what :meth:`Strategy.attach` takes) and metadata for results.json (the source, the
    tokens asked for and really used, the rows, where each part came from)."""
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
    digest = token_digest(batches)
    data_key = cache.content_key(VERSION, weights_fingerprint(loaded.model), digest)
    parts = Parts(data_key, strategy.name, use_shipped=cfg.calibration.shipped)
    # an assembled state holds shipped parts unless shipped=false: that one is local throughout
    key = cache.content_key(data_key, strategy.calibration_key(), parts.use_shipped)

    def compute() -> dict[str, torch.Tensor]:
        log.info("calibrating %s on %d tokens of '%s'", strategy.name, tokens, cfg.dataset.name)
        with torch.inference_mode():
            ids = [b.to(loaded.device) for b in batches]
            seconds = strategy.calibration_estimate(loaded.model, ids, parts)
            announce(f"calibrating {strategy.name}", seconds, strategy.cheaper_calibration)
            return strategy.calibrate(loaded.model, ids, parts)

    state, hit = cache.cached_tensors(
        strategy.name,
        key,
        compute,
        valid=strategy.serves,
        meta=lambda: {"parts": json.dumps(parts.summary())},
    )
    if hit:  # as assembled when it was stored: what was searched then is cached now
        stored = json.loads(cache.read_meta(strategy.name, key).get("parts", "{}"))
        parts_origin = {k: v.replace("computed", "cache") for k, v in stored.items()}
    else:
        parts_origin = parts.summary()
    return state, {
        "cache": "hit" if hit else "miss",
        "key": key,
        "dataset": cfg.dataset.name,
        "tokens_requested": wanted,
        "tokens_used": tokens,
        "token_digest": digest,
        "rows": len(batches),
        "seq_len": seq_len,
        "parts": parts_origin,
        "seconds": round(time.perf_counter() - start, 2),
    }


def token_digest(batches: list[torch.Tensor]) -> str:
    """A digest of the calibration token ids, row by row (what the statistics are computed
    from; the documents they were cut from may differ beyond them)."""
    digest = hashlib.sha256()
    for row in batches:
        digest.update(f"{tuple(row.shape)};".encode())
        digest.update(row.to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


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
