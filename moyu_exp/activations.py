"""Observing activations of the dense model, and quantile tables of what was seen.

The building blocks of calibration, shared by strategies (thresholds) and probes (statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from tqdm.auto import tqdm

from moyu_exp.families import adapter_for, hooked
from moyu_exp.lazy import lazy_import

torch = lazy_import("torch")

TABLE_SIZE = 1001  # quantile levels 0, 0.001, ..., 1 of every table

Tap = Callable[[str, int, "torch.Tensor"], None]
SiteFn = Callable[["torch.Tensor"], "torch.Tensor"]


def run_with_hooks(
    model: torch.nn.Module,
    batches: list[torch.Tensor],
    fns: Iterable[tuple[tuple[str, int], SiteFn]] | dict[tuple[str, int], SiteFn],
    desc: str = "calibration",
) -> None:
    """Run ``batches`` through the model's decoder stack (no LM head) with each function hooked
    at its (site, layer) (see :func:`moyu_exp.families.hooked`); a function may observe its tensor
    or return a changed one."""
    items = fns.items() if isinstance(fns, dict) else fns
    backbone = adapter_for(model).backbone(model)
    with hooked(model, items), torch.inference_mode():
        for batch in tqdm(batches, desc=desc, leave=False):
            backbone(batch, use_cache=False)


def forward_seconds(model, batches: list[torch.Tensor], sample: int = 256) -> float:
    """About how long one forward pass of the decoder stack over ``batches`` takes here: a
    timed forward of ``sample`` of their tokens, scaled to all of them."""
    import time

    ids = batches[0][:1, :sample]
    backbone = adapter_for(model).backbone(model)
    with torch.inference_mode():
        backbone(ids, use_cache=False)  # warm (first-call costs are not the pass's)
        start = time.perf_counter()
        backbone(ids, use_cache=False)
    tokens = sum(b.numel() for b in batches)
    return (time.perf_counter() - start) * tokens / ids.numel()


def observe(model, batches, keys: Iterable[tuple[str, int]], tap: Tap, desc="calibration"):
    """Show ``tap`` every (site, layer) tensor of the dense model on ``batches``."""

    def observer(site: str, layer: int) -> SiteFn:
        def fn(x: torch.Tensor) -> torch.Tensor:
            tap(site, layer, x)
            return x

        return fn

    run_with_hooks(model, batches, [(key, observer(*key)) for key in keys], desc)


def capture_block_inputs(model, layers: list[int], ids: torch.Tensor) -> dict[int, tuple]:
    """The (args, kwargs) each decoder block in ``layers`` receives when ``ids`` run through the
    model as it is now (attached strategies included)."""
    adapter = adapter_for(model)
    blocks = adapter.layers(model)
    captured: dict[int, tuple] = {}

    def grab(layer):
        def hook(_module, args, kwargs):
            captured[layer] = (args, dict(kwargs))

        return hook

    handles = [blocks[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in layers]
    try:
        with torch.inference_mode():
            adapter.backbone(model)(ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def calibrate_thresholds(
    model: torch.nn.Module,
    ids: torch.Tensor,
    levels: dict[tuple[str, int], float],
    score: Callable[[str, int, torch.Tensor], torch.Tensor],
    extra: Iterable[tuple[tuple[str, int], SiteFn]] = (),
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

    fns = [*extra, *((key, calibrate(*key)) for key in levels)]
    run_with_hooks(model, [ids], fns, desc="threshold calibration")
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
