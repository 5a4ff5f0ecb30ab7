"""Batch-1 timing in the style of nanoGPT's bench.py: burn-in steps, then measured steps.

Per repeat: one prefill of ``prompt_tokens`` real tokens (the embedded evaluation text), then
``burn_in`` greedy decode steps that are not timed, then ``decode_tokens`` timed steps. Reported
numbers are medians over repeats. ``mode=simulated`` times the masked model (accuracy, not speed);
it is what a strategy's hooks cost, not what skipping weights would save.
"""

from __future__ import annotations

import inspect
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from moyu_exp import datasets
from moyu_exp.models import LoadedModel
from moyu_exp.strategies import Strategy


def prompt_ids(tokenizer, length: int) -> torch.Tensor:
    """The first ``length`` tokens of the embedded evaluation text (repeated if it is shorter)."""
    ids = tokenizer("\n\n".join(datasets.embedded(split="evaluation")), add_special_tokens=False)
    ids = ids.input_ids
    while len(ids) < length:
        ids = ids + ids
    return torch.tensor([ids[:length]])


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument (``cache`` in newer transformers 5.x, else the old name)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or the process's peak RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:  # Linux: writing 5 resets VmHWM, the peak resident set size
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.kind = "process_lifetime_peak_rss"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        self.mb = _peak_rss_mb()


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(loaded: LoadedModel, cfg: DictConfig, live: Strategy) -> dict[str, Any]:
    """Time prefill and decode of the model as it is now (with ``live`` attached)."""
    if not cfg.enabled:
        return {}
    mode = str(getattr(cfg.mode, "value", cfg.mode))
    timer = _kernel_decode if mode == "kernel" else _simulated_decode
    ids = prompt_ids(loaded.tokenizer, cfg.prompt_tokens).to(loaded.device)
    with torch.inference_mode():
        loaded.model(ids[:, : min(8, ids.shape[1])])  # warm-up: allocator, kernels, lazy init
    with PeakMemory(loaded.device) as memory:
        prefill_s, decode_s, extra = timer(loaded, cfg, live, ids)
    decode_median = statistics.median(decode_s)
    return {
        "mode": mode,
        "device": str(loaded.device),
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "prompt_tokens": int(ids.shape[1]),
        "decode_tokens": cfg.decode_tokens,
        "repeats": cfg.repeats,
        "prefill_ms": 1000 * statistics.median(prefill_s),
        "decode_tokens_per_s": cfg.decode_tokens / decode_median,
        "decode_ms_per_token": 1000 * decode_median / cfg.decode_tokens,
        "peak_memory_mb": memory.mb,
        "memory_kind": memory.kind,
        **extra,
    }


@torch.inference_mode()
def _simulated_decode(loaded, cfg, live, ids):
    """The model's own forward with the strategy's hooks, with the KV cache."""
    model, device = loaded.model, loaded.device
    kw = cache_kwarg(model)
    prefill_s, decode_s = [], []
    for _ in tqdm(range(cfg.repeats), desc="bench", leave=False):
        _sync(device)
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        _sync(device)
        prefill_s.append(time.perf_counter() - start)
        cache = getattr(out, kw)
        token = out.logits[:, -1:].argmax(-1)
        for step in range(cfg.burn_in + cfg.decode_tokens):
            if step == cfg.burn_in:
                _sync(device)
                start = time.perf_counter()
            out = model(token, use_cache=True, **{kw: cache})
            cache = getattr(out, kw)
            token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        decode_s.append(time.perf_counter() - start)
    return prefill_s, decode_s, {}


def _kernel_decode(loaded, cfg, live, ids):
    """The lean decoder (see moyu_exp.kernels): sparse kernels read only active weights."""
    from moyu_exp.kernels.decoder import LeanDecoder

    device = loaded.device
    max_tokens = ids.shape[1] + cfg.burn_in + cfg.decode_tokens + 1
    decoder = LeanDecoder(loaded.model, live, max_tokens)
    prefill_s, decode_s = [], []
    for _ in tqdm(range(cfg.repeats), desc="bench (kernel)", leave=False):
        _sync(device)
        start = time.perf_counter()
        token = int(decoder.prefill(ids).argmax())
        _sync(device)
        prefill_s.append(time.perf_counter() - start)
        for step in range(cfg.burn_in + cfg.decode_tokens):
            if step == cfg.burn_in:
                _sync(device)
                start = time.perf_counter()
                decoder.reset_counters()
            token = int(decoder.step(token).argmax())
        _sync(device)
        decode_s.append(time.perf_counter() - start)
    decoder.flush_stats()
    return (
        prefill_s,
        decode_s,
        {
            "kernel_backend": decoder.backend,
            "weight_bytes_per_token": decoder.bytes_per_token(),
            "dense_weight_bytes_per_token": decoder.dense_bytes(),
            "ideal_speedup": decoder.dense_bytes() / decoder.bytes_per_token(),
        },
    )
