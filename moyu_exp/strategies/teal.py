"""TEAL: magnitude thresholds on the input of every linear layer (Liu et al., ICLR 2025).

Sites: the attention input (shared by q, k, v), the o_proj input, the MLP input (shared by gate
and up) and the down_proj input. An entry whose |x| is below its site's threshold is dropped.

As published (FasterDecoding/TEAL), by default:

- thresholds come from the dense model's activations on the calibration rows
  (``threshold_mode=dense``), as the quantile of |x| at the site's level (``thresholds=quantile``)
  or, with ``thresholds=histogram``, as TEAL's ``Distribution.icdf(0.5 + s/2)`` over a 10,000-bin
  histogram of the signed values (1% tails in the outer bins);
- levels come from TEAL's block-wise greedy search (``allocation=greedy``, see
  :mod:`moyu_exp.strategies.greedy`): on the calibration rows (16,384 tokens in rows of 2,048 by
  default; TEAL used 10 x 2,048), under the last-half protocol, with TEAL's error (norm over
  positions of the block-output difference on the last quarter, then the mean over channels);
  ``allocation=uniform`` puts the target on every site;
- evaluation runs under TEAL's ``apply_prefill`` protocol (``prefill=last_half``): in any
  multi-token forward only the last half of each row's positions runs sparse.

Departures: TEAL's code gives q, k and v (and gate and up) separate levels; here one level, and
so one mask, serves each shared input (what one input-sparse kernel per input can use), and
greedy steps are sized by the weights each shared input gates. A layer's greedy path is searched
as far as the target needs (at most ``greedy_max``), continued when a higher target comes, and
cached; a target picks the closest row, as TEAL's lookup does. For the built-in models the paths
up to ``greedy_max`` ship with the package (:mod:`moyu_exp.shipped`), as TEAL ships its lookup
tables; ``calibration.shipped=false`` searches them here. ``threshold_mode=progressive``
(calibrating in execution order, which meets the target sparsity) is an option, not TEAL's
protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from moyu_exp.activations import (
    ValueSample,
    capture_block_inputs,
    observe,
    quantile_table,
    threshold_at,
)
from moyu_exp.config import FRACTION, Range, check_choice
from moyu_exp.costs import announce
from moyu_exp.errors import ConfigError
from moyu_exp.families import adapter_for
from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.base import Strategy, register
from moyu_exp.strategies.greedy import SEARCH_VERSION, BlockSearch, ModelPaths, paths_reach
from moyu_exp.strategies.threshold import ThresholdStrategy

torch = lazy_import("torch")

TEAL_SITES = ("attn_input", "o_proj_input", "mlp_input", "mlp_intermediate")
ALLOCATIONS = ("uniform", "greedy")
THRESHOLD_SOURCES = ("quantile", "histogram")
HISTOGRAM_BINS = 10_000  # TEAL's Distribution: bins between the 1% and 99% quantiles, plus two


@register("teal")
@dataclass(eq=False)
class Teal(ThresholdStrategy):
    name: str = "teal"
    sites: list[str] = field(default_factory=lambda: list(TEAL_SITES))
    prefill: str = "last_half"  # TEAL's apply_prefill
    threshold_mode: str = "dense"  # TEAL's thresholds: the dense model's statistics
    thresholds: str = "quantile"  # or histogram: TEAL's icdf(0.5 + s/2) of signed values
    allocation: str = "greedy"  # or uniform: the target on every site
    greedy_step: float = 0.05  # level step of a hidden x hidden projection (TEAL: q_proj)
    greedy_max: float = 0.9  # the greedy path is searched (once, cached) up to this sparsity
    RANGES: ClassVar[dict[str, Range]] = {
        **Strategy.RANGES,
        "greedy_step": FRACTION,
        "greedy_max": FRACTION,
    }
    allowed_sites = TEAL_SITES
    cheaper_calibration = "strategy.allocation=uniform"
    calibration_version = 3  # 2: greedy on 256 tokens, mean L2 over tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("strategy.allocation", self.allocation, ALLOCATIONS)
        check_choice("strategy.thresholds", self.thresholds, THRESHOLD_SOURCES)
        if self.thresholds == "histogram" and self.in_order:
            raise ConfigError(
                "strategy.thresholds=histogram reads the dense model's histograms: "
                "it needs strategy.threshold_mode=dense"
            )
        if self.allocation == "greedy" and self.sparsity > self.greedy_max:
            raise ConfigError(
                f"sparsity={self.sparsity} is beyond the greedy path "
                f"(strategy.greedy_max={self.greedy_max}): raise greedy_max or use uniform"
            )

    def greedy_params(self) -> dict[str, Any]:
        """What a layer's greedy path depends on besides the model, the tokens and the layer
        (not which other layers are sparse: the search reads the dense model's block inputs;
        nor how far it goes: a path is searched as far as a target needs, and continued)."""
        return {
            "search": SEARCH_VERSION,
            "version": self.calibration_version,
            "sites": list(self.sites),
            "step": self.greedy_step,
            "thresholds": self.thresholds,
        }

    def shipped_part(self) -> tuple[str, dict[str, Any]]:
        """(owner, parameters) of the per-layer greedy path parts (:mod:`moyu_exp.shipped`)."""
        return self.name, self.greedy_params()

    def calibration_key(self) -> dict[str, Any]:
        key = super().calibration_key() | {
            "allocation": self.allocation,
            "thresholds": self.thresholds,
        }
        return key | ({"greedy": self.greedy_params()} if self.allocation == "greedy" else {})

    def serves(self, calibration: dict) -> bool:
        """A stored state serves this sparsity when its greedy paths reach it."""
        return paths_reach(calibration, self.sparsity)

    def calibrate_first(self, model, batches, cached) -> dict[str, torch.Tensor]:
        """TEAL's histograms (when asked for) and the greedy paths, both of the dense model and
        the same for every sparsity (a path is searched as far as this sparsity needs)."""
        state: dict[str, torch.Tensor] = {}
        paths = self.model_paths(model, cached) if self.allocation == "greedy" else None
        if paths is not None:
            paths.plan(self.sparsity)
            tokens = batches[0].shape[1]
            seconds = paths.estimate(model, len(batches), tokens, sparse_fraction=0.5)
            announce(
                f"TEAL's greedy search ({len(paths.todo)} layers)",
                seconds,
                "strategy.allocation=uniform",
            )
        if not self.in_order or paths is not None:
            state |= self.dense_stats(model, batches, cached)
        if paths is not None:
            state |= search_paths(model, batches, self, state, paths)
        return state

    def model_paths(self, model, cached) -> ModelPaths:
        return ModelPaths(
            cached,
            self.name,
            self.greedy_params(),
            self.layer_ids(model),
            list(self.sites),
            self.greedy_step,
        )

    def dense_stats(self, model, batches, cached) -> dict[str, torch.Tensor]:
        """:func:`dense_statistics` of this configuration, cached once per model and text. Taken
        over every layer whichever ``layers`` are asked for: the value sample draws from one
        stream across layers, so a layer's statistics (and its greedy path, keyed without the
        layer set) must not depend on which other layers were observed."""
        params = {"sites": list(self.sites), "layers": None, "kind": self.thresholds}
        histogram = self.thresholds == "histogram"
        layers = list(range(len(adapter_for(model).layers(model))))
        return cached(
            "dense-stats",
            params,
            lambda: dense_statistics(model, batches, self.sites, layers, histogram),
            owner=self.name,
        )

    def site_levels(self, calibration: dict, layer: int) -> dict[str, float]:
        if self.allocation == "uniform" or self.sparsity == 0.0:
            return super().site_levels(calibration, layer)
        return path_levels(calibration[f"greedy.{layer}"], self.sparsity, self.sites)

    def threshold(self, calibration: dict, site: str, layer: int, level: float) -> float:
        if self.in_order:
            return super().threshold(calibration, site, layer, level)
        return self.dense_threshold(calibration, site, layer, level)

    def dense_threshold(self, stats: dict, site: str, layer: int, level: float) -> float:
        """The threshold at ``level`` from the dense model's statistics (what the greedy search
        and dense-mode thresholds use): the quantile of |x|, or TEAL's histogram icdf."""
        if self.thresholds == "histogram":
            return histogram_threshold(stats[f"hist.{site}.{layer}"], level)
        return threshold_at(stats[f"table.{site}.{layer}"], level)


# ------------------------------------------------------------------ dense statistics
def dense_statistics(
    model, batches, sites, layers: list[int], histogram: bool = False
) -> dict[str, torch.Tensor]:
    """Per (site, layer) of the dense model on every calibration row: the quantile table of |x|
    (``table.<site>.<layer>``, what dense-mode thresholds read) and, with ``histogram``, TEAL's
    histogram of x (``hist.<site>.<layer>``)."""
    sample = ValueSample(calls=len(batches))
    keys = [(site, layer) for site in sites for layer in layers]
    observe(model, batches, keys, lambda s, i, x: sample.add((s, i), x))
    stats = {}
    for site, layer in keys:
        values = torch.cat(sample.values[(site, layer)])
        stats[f"table.{site}.{layer}"] = quantile_table(values.abs())
        if histogram:
            stats[f"hist.{site}.{layer}"] = teal_histogram(values)
    return stats


def teal_histogram(values: torch.Tensor) -> torch.Tensor:
    """TEAL's ``ActivationModule.find_histogram``: 10,000 bins, the inner ones evenly between
    the 1% and 99% quantiles, the outer ones reaching the extremes. Rows: bin centres, counts."""
    ordered = values.float().sort().values
    n = len(ordered)
    tail = int(0.01 * n)
    low, high = ordered[tail], ordered[-max(tail, 1)]
    inner = torch.linspace(float(low), float(high), HISTOGRAM_BINS - 1)
    edges = torch.cat([ordered[:1], inner, ordered[-1:]])
    counts = torch.histogram(ordered, bins=edges).hist
    return torch.stack([(edges[:-1] + edges[1:]) / 2, counts])


def histogram_threshold(histogram: torch.Tensor, sparsity: float) -> float:
    """TEAL's ``set_threshold``: ``Distribution.icdf(0.5 + s / 2)`` (linear between the bin
    centres' cumulative counts; assumes a zero-mean symmetric distribution); 0 at s = 0."""
    if sparsity <= 0.0:
        return 0.0
    centres, counts = histogram[0], histogram[1]
    cumulative = counts.cumsum(0)
    target = (0.5 + sparsity / 2) * cumulative[-1]
    i = int(torch.searchsorted(cumulative, target))
    if i == 0:
        return float(centres[0])
    if i >= len(centres):
        return float(centres[-1])
    fraction = (target - cumulative[i - 1]) / (cumulative[i] - cumulative[i - 1])
    return float(centres[i - 1] + fraction * (centres[i] - centres[i - 1]))


# ------------------------------------------------------------------------ greedy allocation
def path_levels(path: torch.Tensor, target: float, sites: list[str]) -> dict[str, float]:
    """Each site's level in the row of a greedy ``path`` whose sparsity is closest to
    ``target`` (TEAL's lookup)."""
    row = path[(path[:, 0] - target).abs().argmin()]
    return {site: float(level) for site, level in zip(sites, row[1:], strict=True)}


def published_paths(model, batches, layers: Any, reach: float, cached) -> dict[str, torch.Tensor]:
    """TEAL's greedy paths as ``strategy=teal`` computes them by default (its four sites, the
    dense model's quantile thresholds), up to ``reach``, stored as TEAL's own parts: another
    method that reads them (MOYU's attention levels) shares TEAL's search (and its shipped
    paths) rather than running it again.
    Returns {"greedy.<layer>": rows [weighted sparsity, level of each of TEAL_SITES]}."""
    state = Teal(layers=layers, sparsity=reach).calibrate_first(model, batches, cached)
    return {k: v for k, v in state.items() if k.startswith("greedy.")}


def search_paths(model, batches, teal: Teal, stats: dict, paths: ModelPaths):
    """Per layer, TEAL's greedy path as rows [weighted sparsity, level of each site]."""
    inputs = capture_block_inputs(model, list(paths.todo), torch.cat(batches)) if paths.todo else {}

    def make_search(layer: int, captured: tuple) -> BlockSearch:
        def sparsify(site: str, level: float, x: torch.Tensor) -> torch.Tensor:
            threshold = teal.dense_threshold(stats, site, layer, level)
            return x.masked_fill(x.abs() < threshold, 0.0)

        return BlockSearch(model, layer, paths.sites, captured, sparsify)

    return paths.run(model, inputs, make_search, "TEAL greedy search")
