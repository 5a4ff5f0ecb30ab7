"""The strategy contract, shared by every dynamic-activation method.

A strategy is a dataclass of its own parameters (the config schema is derived from its fields).
``with strategy.attach(model) as live:`` installs one hook per (site, layer); each hook passes the
site's tensor through :meth:`Strategy.sparsify` and counts the entries it really zeroed. Leaving
the block removes every hook, so the model is restored bit-exactly, also after an exception.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from moyu_exp.config import check_sparsity
from moyu_exp.sites import SITES, adapter_for, check_sites, resolve_layers

STRATEGIES: dict[str, type[Strategy]] = {}


def register(name: str):
    """Class decorator: make a strategy available as ``strategy=<name>``."""

    def wrap(cls: type[Strategy]) -> type[Strategy]:
        if name in STRATEGIES:
            raise RuntimeError(f"strategy '{name}' registered twice")
        STRATEGIES[name] = cls
        return cls

    return wrap


def keep_count(sparsity: float, dim: int) -> int:
    """Entries kept per token at a target sparsity: k = round((1 - s) * d)."""
    return round((1.0 - sparsity) * dim)


@dataclass
class SparsityStats:
    """Entries zeroed and entries seen, per (site, layer); the achieved sparsity derives from it."""

    counts: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)

    def __add__(self, other: SparsityStats) -> SparsityStats:
        merged = dict(self.counts)
        for key, (z, n) in other.counts.items():
            z0, n0 = merged.get(key, (0, 0))
            merged[key] = (z0 + z, n0 + n)
        return SparsityStats(merged)

    @staticmethod
    def _ratio(pairs: list[tuple[int, int]]) -> float:
        total = sum(n for _, n in pairs)
        return sum(z for z, _ in pairs) / total if total else 0.0

    @property
    def overall(self) -> float:
        return self._ratio(list(self.counts.values()))

    def by(self, index: int) -> dict[Any, float]:
        groups: dict[Any, list[tuple[int, int]]] = {}
        for key, pair in self.counts.items():
            groups.setdefault(key[index], []).append(pair)
        return {k: self._ratio(v) for k, v in sorted(groups.items())}

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall,
            "entries": sum(n for _, n in self.counts.values()),
            "by_site": self.by(0),
            "by_layer": {str(k): v for k, v in self.by(1).items()},
        }


@dataclass(eq=False)
class Strategy:
    """Base class. Subclasses set ``name``/``sites`` defaults and implement :meth:`sparsify`."""

    name: str = "base"
    sparsity: float = 0.0
    layers: Any = "all"  # "all", a list of layer indices, or a slice string such as "1:-1"
    sites: list[str] = field(default_factory=list)

    allowed_sites: ClassVar[tuple[str, ...]] = tuple(SITES)
    needs_calibration: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_sites(list(self.sites), self.allowed_sites)
        check_sparsity(self.sparsity)
        self.layer_ids: list[int] = []
        self._handles: list[Any] = []
        self._enabled = True
        self._acc: dict[tuple[str, int], torch.Tensor] = {}
        self._valid_lengths: torch.Tensor | None = None
        self._mask_from_model: torch.Tensor | None = None

    # ------------------------------------------------------------------ method API
    def sparsify(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` (batch, tokens, dim) with the entries this method drops set to zero."""
        raise NotImplementedError

    # -------------------------------------------------------------------- contract
    @contextmanager
    def attach(self, model: nn.Module) -> Iterator[Strategy]:
        """Install the hooks; restore the model exactly on exit."""
        if self._handles:
            raise RuntimeError(f"strategy '{self.name}' is already attached to a model")
        adapter = adapter_for(model)
        blocks = adapter.layers(model)
        self.layer_ids = resolve_layers(self.layers, len(blocks))
        self.reset_stats()
        try:
            if self.sites:
                self._handles.append(
                    model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)
                )
            for site in self.sites:
                for layer in self.layer_ids:
                    fn = self._site_fn(site, layer)
                    self._handles.append(adapter.hook(blocks[layer], site, fn))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    def stats(self) -> SparsityStats:
        """Entries zeroed / entries seen since the last reset (padding excluded)."""
        return SparsityStats({k: (int(v[0]), int(v[1])) for k, v in self._acc.items()})

    def reset_stats(self) -> None:
        self._acc = {}

    def take_stats(self) -> SparsityStats:
        """The stats so far, then reset: one snapshot per phase (eval, bench)."""
        stats = self.stats()
        self.reset_stats()
        return stats

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run the model dense inside this block (for a dense reference); nothing is counted."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    @contextmanager
    def segments(self, valid_lengths: torch.Tensor) -> Iterator[None]:
        """Declare right padding for the next forward: row b holds ``valid_lengths[b]`` tokens."""
        previous, self._valid_lengths = self._valid_lengths, valid_lengths
        try:
            yield
        finally:
            self._valid_lengths = previous

    # ------------------------------------------------------------------ internals
    def _capture_mask(self, _module, args, kwargs):
        """Remember the 2-D attention mask of this forward (left padding in generation)."""
        mask = kwargs.get("attention_mask")
        self._mask_from_model = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return None

    def valid_tokens(self, x: torch.Tensor) -> torch.Tensor | None:
        """Bool (batch, tokens): which positions of ``x`` are real tokens; None when all are."""
        batch, tokens = x.shape[:2]
        if self._valid_lengths is not None and self._valid_lengths.numel() == batch:
            positions = torch.arange(tokens, device=x.device)
            return positions[None, :] < self._valid_lengths.to(x.device)[:, None]
        mask = self._mask_from_model
        if mask is not None and mask.shape[0] == batch and mask.shape[1] >= tokens:
            return mask[:, -tokens:].to(device=x.device, dtype=torch.bool)
        return None

    def _site_fn(self, site: str, layer: int):
        def fn(x: torch.Tensor) -> torch.Tensor:
            if not self._enabled:
                return x
            y = self.sparsify(site, layer, x)
            self._count(site, layer, x, y)
            return y

        return fn

    def _count(self, site: str, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        zeroed = (y == 0) & (x != 0)
        valid = self.valid_tokens(x)
        if valid is not None:
            zeroed = zeroed[valid]
        key = (site, layer)
        acc = self._acc.get(key)
        if acc is None:
            acc = self._acc[key] = torch.zeros(2, dtype=torch.int64, device=x.device)
        acc[0] += zeroed.sum()
        acc[1] += zeroed.numel()
