"""Observing activations of the dense model, and quantile tables of what was seen.

The building blocks of calibration, shared by strategies (thresholds) and probes (statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from tqdm.auto import tqdm

from moyu_exp.lazy import lazy_import
from moyu_exp.sites import adapter_for

torch = lazy_import("torch")

TABLE_SIZE = 1001  # quantile levels 0, 0.001, ..., 1 of every table

Tap = Callable[[str, int, "torch.Tensor"], None]
SiteFn = Callable[["torch.Tensor"], "torch.Tensor"]


def run_with_hooks(
    model: torch.nn.Module,
    batches: list[torch.Tensor],
    fns: dict[tuple[str, int], SiteFn],
    desc: str = "calibration",
) -> None:
    """Run ``batches`` through the model's decoder stack (no LM head) with ``fns[(site, layer)]``
    hooked at each site; a function may observe its tensor or return a changed one."""
    adapter = adapter_for(model)
    blocks = adapter.layers(model)
    handles = []
    try:
        for (site, layer), fn in fns.items():
            handles.append(adapter.hook(blocks[layer], site, fn))
        with torch.inference_mode():
            for batch in tqdm(batches, desc=desc, leave=False):
                adapter.backbone(model)(batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def observe(model, batches, keys: Iterable[tuple[str, int]], tap: Tap, desc="calibration"):
    """Show ``tap`` every (site, layer) tensor of the dense model on ``batches``."""

    def observer(site: str, layer: int) -> SiteFn:
        def fn(x: torch.Tensor) -> torch.Tensor:
            tap(site, layer, x)
            return x

        return fn

    run_with_hooks(model, batches, {key: observer(*key) for key in keys}, desc)


def calibrate_thresholds(
    model: torch.nn.Module,
    ids: torch.Tensor,
    levels: dict[tuple[str, int], float],
    score: Callable[[str, int, torch.Tensor], torch.Tensor],
    extra: dict[tuple[str, int], SiteFn] | None = None,
    in_order: bool = True,
) -> tuple[dict[tuple[str, int], torch.Tensor], dict[tuple[str, int], float]]:
    """Quantile tables of ``score`` per (site, layer) over all of ``ids`` in one pass, and the
    thresholds that drop a ``levels[key]`` fraction of entries.

    With ``in_order`` each threshold is applied as soon as it is found, so every later site sees
    the inputs that the earlier thresholds leave it; without it the statistics are those of the
    dense model, which overstate the sparsity later layers reach once earlier ones are sparse.
    ``extra`` hooks run in the same pass (statistics a score needs, e.g. CHESS's mean |up|).
    """
    tables: dict[tuple[str, int], torch.Tensor] = {}
    thresholds: dict[tuple[str, int], float] = {}

    def calibrate(site: str, layer: int) -> SiteFn:
        def fn(x: torch.Tensor) -> torch.Tensor:
            s = score(site, layer, x)
            table = tables[(site, layer)] = quantile_table(subsample(s))
            threshold = thresholds[(site, layer)] = threshold_at(table, levels[(site, layer)])
            if not in_order or threshold <= 0:
                return x
            return x.masked_fill(s < threshold, 0.0)

        return fn

    fns = {key: calibrate(*key) for key in levels}
    run_with_hooks(model, [ids], {**(extra or {}), **fns}, desc="threshold calibration")
    return tables, thresholds


def subsample(values: torch.Tensor, cap: int = 1 << 20) -> torch.Tensor:
    """At most ``cap`` of ``values`` (flattened), a fixed random choice when there are more."""
    flat = values.detach().reshape(-1).float()
    if flat.numel() <= cap:
        return flat
    generator = torch.Generator(device=flat.device).manual_seed(0)
    return flat[torch.randint(flat.numel(), (cap,), generator=generator, device=flat.device)]


class ValueSample:
    """A bounded random subsample of every value seen, per key, for quantiles."""

    def __init__(self, calls: int, cap: int = 1 << 18, seed: int = 0):
        self.per_call = max(1, math.ceil(cap / max(1, calls)))
        self.generator = torch.Generator().manual_seed(seed)
        self.values: dict[Any, list[torch.Tensor]] = {}

    def add(self, key: Any, values: torch.Tensor) -> None:
        flat = values.detach().reshape(-1).float().cpu()
        if flat.numel() > self.per_call:
            pick = torch.randint(flat.numel(), (self.per_call,), generator=self.generator)
            flat = flat[pick]
        self.values.setdefault(key, []).append(flat)

    def table(self, key: Any) -> torch.Tensor:
        return quantile_table(torch.cat(self.values[key]))


def quantile_table(values: torch.Tensor) -> torch.Tensor:
    """Values at the :data:`TABLE_SIZE` quantile levels 0..1 (monotone by construction)."""
    levels = torch.linspace(0.0, 1.0, TABLE_SIZE, device=values.device)
    return torch.quantile(values.float(), levels)


def threshold_at(table: torch.Tensor, sparsity: float) -> float:
    """The threshold below which a ``sparsity`` fraction of calibration values lies; 0 at s=0
    (so that sparsity 0 never drops anything, even values below the calibration minimum)."""
    if sparsity <= 0.0:
        return 0.0
    position = sparsity * (len(table) - 1)
    low = min(int(position), len(table) - 2)
    frac = position - low
    return float(table[low] * (1 - frac) + table[low + 1] * frac)
