"""The one greedy decode loop, over the model's own forward or the lean decoder.

A *stepper* takes a prompt with ``prefill(ids) -> logits`` and then one token at a time with
``step(token) -> logits`` (logits of the next token, shape (vocab,)). :class:`ModelStepper` is
the model's forward with its KV cache (simulated mode: the strategy's hooks run as they do in
evaluation); :class:`~moyu_exp.kernels.decoder.LeanDecoder` is the kernel-mode stepper. The
timing loop, the probes that watch activations along generation, the tests and the benchmarks
all decode through :func:`greedy` and :func:`steps`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Protocol

from moyu_exp.lazy import lazy_import

torch = lazy_import("torch")


class Stepper(Protocol):
    def prefill(self, ids: torch.Tensor) -> torch.Tensor: ...

    def step(self, token: int) -> torch.Tensor: ...


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument (``cache`` in newer transformers 5.x, else the old name)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class ModelStepper:
    """Greedy decoding with the model's own forward and its dynamic KV cache (batch 1)."""

    def __init__(self, model):
        self.model = model
        self.kw = cache_kwarg(model)
        self.device = next(model.parameters()).device
        self.cache = None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(ids.to(self.device), use_cache=True)
        self.cache = getattr(out, self.kw)
        return out.logits[0, -1]

    def step(self, token: int) -> torch.Tensor:
        with torch.inference_mode():
            ids = torch.tensor([[token]], device=self.device)
            out = self.model(ids, use_cache=True, **{self.kw: self.cache})
        self.cache = getattr(out, self.kw)
        return out.logits[0, -1]


def greedy(
    stepper: Stepper,
    prompt: torch.Tensor,
    steps: int,
    after_forward: Callable[[int], None] | None = None,
) -> tuple[list[int], torch.Tensor]:
    """Prefill ``prompt`` (1, T) and decode ``steps`` greedy tokens: the generated tokens and
    the logits that chose each of them, (steps, vocab). ``after_forward(i)`` is called after
    the prefill (i = 0) and after each step (i = 1, 2, ...), e.g. to collect what hooks saw."""
    logits = [stepper.prefill(prompt)]
    tokens = [int(logits[-1].argmax())]
    if after_forward is not None:
        after_forward(0)
    while len(tokens) < steps:
        logits.append(stepper.step(tokens[-1]))
        tokens.append(int(logits[-1].argmax()))
        if after_forward is not None:
            after_forward(len(tokens) - 1)
    return tokens[:steps], torch.stack(logits[:steps]) if steps else logits[0][:0]


def steps(stepper: Stepper, token: int, count: int) -> int:
    """``count`` greedy steps from ``token`` (already chosen, not yet fed): the last token."""
    for _ in range(count):
        token = int(stepper.step(token).argmax())
    return token


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(stepper: Stepper, token: int, count: int, device: torch.device) -> float:
    """Seconds that ``count`` greedy steps from ``token`` take (device work included)."""
    synchronize(device)
    start = time.perf_counter()
    steps(stepper, token, count)
    synchronize(device)
    return time.perf_counter() - start
