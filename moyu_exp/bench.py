"""Batch-1 timing in the style of nanoGPT's bench.py: burn-in steps, then measured steps.

``mode=simulated`` times the masked model's own forward (what the strategy's hooks cost, not
what skipping weights would save): per repeat one prefill of ``prompt_tokens`` real tokens (the
embedded evaluation text), ``burn_in`` untimed greedy steps, then ``decode_tokens`` timed steps;
medians over repeats.

``mode=kernel`` measures speed the way one can trust on a shared machine: a dense and a sparse
lean decoder (:mod:`moyu_exp.kernels`, the same kernels on both sides) prefill the same prompt,
burn in, then decode windows of ``decode_tokens`` steps that alternate between them for
``rounds`` rounds (in alternating order). ``speedup`` is the median of the rounds' sparse/dense
ratios (a slow phase of the machine hits both sides of a ratio), with its interquartile range;
``ideal_speedup`` is the bytes-bound ratio from the sets the strategy really kept in those
windows, and ``efficiency`` = speedup / ideal. ``benchmarks/decode_speed.py`` is a loop over
:func:`paired`.

Both modes count only decode steps into the meter they are handed (prefill and burn-in run
under a scratch meter), so the bench phase's sparsity and bytes are those of decoding.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from moyu_exp import datasets
from moyu_exp.decode import ModelStepper, steps, synchronize, timed_steps
from moyu_exp.models import LoadedModel
from moyu_exp.strategies import Attachment

# what a paired measurement reports of its meter (the bytes the sets it decoded with read);
# a point's results keep them in sparsity_detail.bench, where the rest of the meter is
METER_FIELDS = ("weight_bytes_per_token", "dense_weight_bytes_per_token", "ideal_speedup")


def prompt_ids(tokenizer, length: int) -> torch.Tensor:
    """The first ``length`` tokens of the embedded evaluation text (repeated if it is shorter)."""
    ids = tokenizer("\n\n".join(datasets.embedded(split="evaluation")), add_special_tokens=False)
    ids = ids.input_ids
    while len(ids) < length:
        ids = ids + ids
    return torch.tensor([ids[:length]])


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


def run(loaded: LoadedModel, cfg: DictConfig, live: Attachment) -> dict[str, Any]:
    """Time decoding of the model with ``live`` attached. The measured decode steps count into
    the attachment's meter of the phase (``live.measuring()``); what they kept (bytes, the
    ideal) is that meter's to report, so the timing holds only what the clock says."""
    if not cfg.enabled:
        return {}
    mode = str(getattr(cfg.mode, "value", cfg.mode))
    ids = prompt_ids(loaded.tokenizer, cfg.prompt_tokens).to(loaded.device)
    with torch.inference_mode(), live.measuring():
        loaded.model(ids[:, : min(8, ids.shape[1])])  # warm-up: allocator, kernels, lazy init
    with PeakMemory(loaded.device) as memory:
        if mode == "kernel":
            timing = paired(loaded, live, ids, cfg.decode_tokens, cfg.rounds, cfg.burn_in)
            for key in METER_FIELDS:  # sparsity_detail.bench holds them
                timing.pop(key)
        else:
            timing = simulated(loaded, live, ids, cfg)
    return {
        "mode": mode,
        "device": str(loaded.device),
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "prompt_tokens": int(ids.shape[1]),
        "decode_tokens": cfg.decode_tokens,
        **timing,
        "peak_memory_mb": memory.mb,
        "memory_kind": memory.kind,
    }


def simulated(loaded, live: Attachment, ids, cfg) -> dict[str, Any]:
    """The model's own forward with the strategy's hooks and the KV cache; medians of repeats."""
    device = loaded.device
    prefill_s, decode_s = [], []
    stepper = ModelStepper(loaded.model)
    for _ in tqdm(range(cfg.repeats), desc="bench", leave=False):
        with live.measuring():
            synchronize(device)
            start = time.perf_counter()
            token = int(stepper.prefill(ids).argmax())
            synchronize(device)
            prefill_s.append(time.perf_counter() - start)
            token = steps(stepper, token, cfg.burn_in)
        decode_s.append(timed_steps(stepper, token, cfg.decode_tokens, device))
    decode_median = statistics.median(decode_s)
    return {
        "repeats": cfg.repeats,
        "prefill_ms": 1000 * statistics.median(prefill_s),
        "decode_tokens_per_s": cfg.decode_tokens / decode_median,
        "decode_ms_per_token": 1000 * decode_median / cfg.decode_tokens,
    }


def paired(
    loaded,
    live: Attachment,
    ids: torch.Tensor,
    decode_tokens: int,
    rounds: int,
    burn_in: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Dense and sparse lean decoders on one prompt, windows alternating (see the module
    docstring). The sparse windows count into the attachment's current meter (the caller's
    phase: ``with live.measuring():``); the prefill and the burn-in into a scratch one."""
    from moyu_exp.kernels.decoder import DecoderWeights, LeanDecoder

    model, device = loaded.model, loaded.device
    prompt_len = ids.shape[1]
    max_tokens = prompt_len + max(burn_in, decode_tokens) + 2
    with live.paused():  # the original weights, whatever the strategy patched in
        weights = DecoderWeights(model, max_tokens)
    dense = LeanDecoder(model, None, max_tokens, weights=weights)
    patched = DecoderWeights(model, max_tokens) if live.patches_weights else weights
    sparse = LeanDecoder(model, live, max_tokens, weights=patched)
    with live.paused():
        dense_first = int(dense.prefill(ids).argmax())
    with live.measuring():
        synchronize(device)
        start = time.perf_counter()
        sparse_first = int(sparse.prefill(ids).argmax())
        synchronize(device)
        prefill_s = time.perf_counter() - start
        for decoder, first in ((dense, dense_first), (sparse, sparse_first)):
            steps(decoder, first, burn_in)
        sparse.rewind(prompt_len)  # the burn-in's counts stay in the scratch meter
    dense_rates: list[float] = []
    sparse_rates: list[float] = []
    pair = [(dense, dense_first, dense_rates), (sparse, sparse_first, sparse_rates)]
    for r in tqdm(range(rounds), desc="bench (kernel, paired)", leave=False, disable=not progress):
        for decoder, first, rates in pair if r % 2 == 0 else pair[::-1]:
            decoder.rewind(prompt_len)
            rates.append(decode_tokens / timed_steps(decoder, first, decode_tokens, device))
    sparse.flush()
    ratios = [s / d for s, d in zip(sparse_rates, dense_rates, strict=True)]
    q25, _, q75 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    summary = live.meter.summary()
    speedup = statistics.median(ratios)
    sparse_rate = statistics.median(sparse_rates)
    return {
        "kernel_backend": sparse.backend,
        "rounds": rounds,
        "prefill_ms": 1000 * prefill_s,
        "decode_tokens_per_s": sparse_rate,
        "decode_ms_per_token": 1000 / sparse_rate,
        "dense_tokens_per_s": statistics.median(dense_rates),
        "speedup": speedup,
        "speedup_q25": q25,
        "speedup_q75": q75,
        "speedup_iqr": q75 - q25,
        "weight_bytes_per_token": summary["weight_bytes_per_token"],
        "dense_weight_bytes_per_token": summary["dense_weight_bytes_per_token"],
        "ideal_speedup": summary["ideal_speedup"],
        "efficiency": speedup / summary["ideal_speedup"],
    }
