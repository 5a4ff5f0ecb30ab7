"""Kept sets stated as data, and applying them to a batch of activations.

A :class:`KernelRule` says which entries of a site's vector a strategy keeps: those whose score
``|x_i| * scale_i`` reaches a threshold (one number, or one per entry), or the ``k`` best
scores. Kernel mode selects by the same rule inside its native decode step
(:mod:`moyu_exp.kernels`); simulated mode applies it to every active row of a batch with
:func:`apply_rule`: one native pass on the CPU (select, zero, count), stock PyTorch ops
elsewhere. Either way an entry counts as dropped exactly when the rule does not keep it, so
simulated and kernel mode count the same entries (an exact zero the rule drops included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moyu_exp.kernels import native
from moyu_exp.lazy import lazy_import

torch = lazy_import("torch")


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask with exactly ``k`` True entries per row: the largest ``score`` on the last dim."""
    keep = torch.zeros_like(score, dtype=torch.bool)
    return keep.scatter_(-1, score.topk(k, dim=-1, sorted=False).indices, True)


@dataclass(eq=False)
class KernelRule:
    """Keep the entries whose score ``|x_i| * scale_i`` is at least ``threshold`` (a number, or a
    tensor with one per entry), or, with ``k`` set, the ``k`` best scores."""

    threshold: float | torch.Tensor = 0.0
    k: int | None = None
    scale: torch.Tensor | None = None
    _native: tuple | None = field(default=None, init=False, repr=False)

    def keeps_all(self, dim: int) -> bool:
        if self.k is not None:
            return self.k >= dim
        return not isinstance(self.threshold, torch.Tensor) and self.threshold <= 0

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs() if self.scale is None else x.abs() * self.scale.to(x.device, x.dtype)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The bool mask of kept entries of ``x`` (..., dim), with stock PyTorch ops."""
        if self.keeps_all(x.shape[-1]):
            return torch.ones_like(x, dtype=torch.bool)
        score = self.score(x)
        if self.k is not None:
            return topk_mask(score, self.k)
        threshold = self.threshold
        if isinstance(threshold, torch.Tensor):
            threshold = threshold.to(device=x.device, dtype=x.dtype)
        return score >= threshold

    def native_args(self) -> tuple[Any, ...]:
        """(scale, thresholds, threshold, k) as the C kernels take them: fp32 CPU tensors made
        once (kept alive by the rule), a float and an int (-1: no top-k)."""
        if self._native is None:
            thresholds = self.threshold if isinstance(self.threshold, torch.Tensor) else None
            scale, thresholds = (_f32(t) for t in (self.scale, thresholds))
            number = 0.0 if thresholds is not None else float(self.threshold)
            self._native = (scale, thresholds, number, -1 if self.k is None else self.k)
        return self._native

    def native_pointers(self) -> tuple[Any, ...]:
        scale, thresholds, number, k = self.native_args()
        return (_ptr(scale), _ptr(thresholds), number, k)


def apply_rule(x: torch.Tensor, rule: KernelRule, active: torch.Tensor | None):
    """``x`` (..., tokens, dim) with the entries ``rule`` drops zeroed at ``active`` positions
    (bool (..., tokens); None: every position), and the number of entries dropped."""
    dim = x.shape[-1]
    if rule.keeps_all(dim):
        return x, 0
    lib = _native_for(x)
    if lib is None:
        return apply_mask(x, rule.mask(x), active)
    x = x.contiguous()
    y = torch.empty_like(x)
    rows = x.numel() // dim
    flags = None if active is None else active.reshape(-1).to(torch.uint8).contiguous()
    threads = max(1, torch.get_num_threads())
    work = torch.empty(threads * (2 * dim + 2048), dtype=torch.float32)  # radix-select scratch
    dropped = lib.lib.mask_rows(
        x.data_ptr(),
        y.data_ptr(),
        rows,
        dim,
        _ptr(flags),
        *rule.native_pointers(),
        threads,
        work.data_ptr(),
    )
    return y, int(dropped)


def random_keep(shape: tuple[int, ...], k: int, generator: torch.Generator) -> torch.Tensor:
    """A bool mask of ``shape`` keeping exactly ``k`` uniformly random entries of every row (last
    dim), drawn from ``generator``: natively on the CPU (one seed per call), else as the top-k
    of uniform scores."""
    lib = native.load() if generator.device.type == "cpu" else None
    if lib is None:
        scores = torch.rand(shape, generator=generator, device=generator.device)
        return topk_mask(scores, k)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    mask = torch.empty(shape, dtype=torch.bool)
    dim = shape[-1]
    threads = max(1, torch.get_num_threads())
    lib.lib.random_keep(mask.data_ptr(), mask.numel() // dim, dim, k, seed, threads)
    return mask


def apply_mask(x: torch.Tensor, keep: torch.Tensor, active: torch.Tensor | None):
    """``x`` (batch, tokens, dim) zeroed where ``keep`` (bool, broadcastable to x) is False at
    ``active`` positions, and the number of entries dropped (natively in one pass on the CPU;
    else stock ops, the count a tensor: no device sync)."""
    lib = _native_for(x)
    if lib is None or x.dim() != 3:
        if active is not None:
            keep = keep | ~active[..., None]
        drop = ~keep.expand(x.shape)
        return x.masked_fill(drop, 0.0), drop.sum()
    x = x.contiguous()
    keep = keep.to(device=x.device).expand(x.shape)
    if keep.stride(-1) != 1:
        keep = keep.contiguous()
    y = torch.empty_like(x)
    flags = None if active is None else active.reshape(-1).to(torch.uint8).contiguous()
    dropped = lib.lib.apply_keep(
        x.data_ptr(),
        y.data_ptr(),
        x.shape[0],
        x.shape[1],
        x.shape[2],
        keep.data_ptr(),
        keep.stride(0),
        keep.stride(1),
        _ptr(flags),
        max(1, torch.get_num_threads()),
    )
    return y, int(dropped)


def _native_for(x: torch.Tensor):
    """The native kernels when they can run on ``x`` (an fp32 CPU tensor), else None."""
    return native.load() if x.device.type == "cpu" and x.dtype == torch.float32 else None


def _f32(tensor):
    return None if tensor is None else tensor.detach().to("cpu", torch.float32).contiguous()


def _ptr(tensor) -> int | None:
    return None if tensor is None else tensor.data_ptr()
