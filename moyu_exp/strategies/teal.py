"""TEAL: magnitude thresholds on the input of every linear layer (Liu et al., ICLR 2025).

Sites: the attention input (shared by q, k, v), the o_proj input, the MLP input (shared by gate
and up) and the down_proj input. ``allocation=uniform`` puts the target sparsity on every site.
``allocation=greedy`` follows TEAL's greedy per-block search: starting dense, repeatedly raise
the sparsity of the site whose step adds the least block-output error (mean L2 over the last
quarter of the calibration tokens), steps sized so that each skips the same number of weights;
the path is recorded once (on the dense block inputs) and the target picks the point closest to
it in model-wide, weight-weighted sparsity. Unlike TEAL's code, which may give q, k and v (and
gate and up) different levels, one level per shared input is used here: one mask per input,
which is what one kernel per input can exploit. Thresholds are then calibrated in order (see
:mod:`moyu_exp.strategies.threshold`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moyu_exp.activations import ValueSample, capture_block_inputs, observe, threshold_at
from moyu_exp.errors import ConfigError
from moyu_exp.lazy import lazy_import
from moyu_exp.sites import adapter_for, hooked
from moyu_exp.strategies.base import register
from moyu_exp.strategies.threshold import ThresholdStrategy

torch = lazy_import("torch")

TEAL_SITES = ("attn_input", "o_proj_input", "mlp_input", "mlp_intermediate")
ALLOCATIONS = ("uniform", "greedy")


@register("teal")
@dataclass(eq=False)
class Teal(ThresholdStrategy):
    name: str = "teal"
    sites: list[str] = field(default_factory=lambda: list(TEAL_SITES))
    allocation: str = "uniform"
    greedy_step: float = 0.05  # level step of the site gating the fewest weights, as in TEAL
    greedy_tokens: int = 256
    greedy_max: float = 0.9

    allowed_sites = TEAL_SITES

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(
                f"strategy.allocation='{self.allocation}' is unknown: accepted are uniform, greedy"
            )
        if self.allocation == "greedy" and self.sparsity > self.greedy_max:
            raise ConfigError(
                f"sparsity={self.sparsity} is beyond the greedy path "
                f"(strategy.greedy_max={self.greedy_max}): raise greedy_max or use uniform"
            )

    def greedy_params(self) -> dict[str, Any]:
        return {
            "sites": list(self.sites),
            "layers": self.layers,
            "step": self.greedy_step,
            "tokens": self.greedy_tokens,
            "max": self.greedy_max,
        }

    def calibration_key(self) -> dict[str, Any]:
        key = super().calibration_key() | {"allocation": self.allocation}
        return key | ({"greedy": self.greedy_params()} if self.allocation == "greedy" else {})

    def calibrate_first(self, model, batches, cached) -> dict[str, torch.Tensor]:
        """The greedy paths (computed once for every sparsity, then cached)."""
        if self.allocation != "greedy":
            return {}
        layers = self.layer_ids(model)
        paths = cached(
            "greedy", self.greedy_params(), lambda: greedy_paths(model, batches, self, layers)
        )
        return dict(paths)

    def site_levels(self, calibration: dict, layer: int) -> dict[str, float]:
        if self.allocation == "uniform" or self.sparsity == 0.0:
            return super().site_levels(calibration, layer)
        path = calibration[f"greedy.{layer}"]
        row = path[(path[:, 0] - self.sparsity).abs().argmin()]
        return {site: float(level) for site, level in zip(self.sites, row[1:], strict=True)}


# ------------------------------------------------------------------------ greedy allocation
def greedy_paths(model, batches, teal: Teal, layers: list[int]) -> dict[str, torch.Tensor]:
    """Per layer, the greedy path as rows [model-wide sparsity, level of each site]."""
    with torch.inference_mode():
        return _greedy_paths(model, batches, teal, layers)


def _greedy_paths(model, batches, teal: Teal, layers: list[int]) -> dict[str, torch.Tensor]:
    adapter = adapter_for(model)
    blocks = adapter.layers(model)
    sites = list(teal.sites)
    ids = torch.cat(batches, dim=1)[:, : teal.greedy_tokens]
    tables = dense_tables(model, [ids], sites, layers)
    inputs = capture_block_inputs(model, layers, ids)
    paths = {}
    for layer in layers:
        block = blocks[layer]
        gated = {s: adapter.weights_per_entry(block, s) * adapter.dim(model, s) for s in sites}
        total, smallest = sum(gated.values()), min(gated.values())
        steps = {s: teal.greedy_step * smallest / gated[s] for s in sites}
        levels = dict.fromkeys(sites, 0.0)
        rows = [[0.0] + [0.0] * len(sites)]
        search = CandidateSearch(model, layer, sites, inputs[layer])
        with search:
            reference = search.outputs([dict.fromkeys(sites, 0.0)])[0]
            while rows[-1][0] < teal.greedy_max:
                options = [s for s in sites if levels[s] + steps[s] <= 0.99]
                if not options:
                    break
                trials = [{**levels, s: levels[s] + steps[s]} for s in options]
                thresholds = [
                    {s: threshold_at(tables[(s, layer)], lv) for s, lv in trial.items()}
                    for trial in trials
                ]
                errors = [_error(out, reference) for out in search.outputs(thresholds)]
                best = options[min(range(len(options)), key=errors.__getitem__)]
                levels[best] += steps[best]
                wide = sum(levels[s] * gated[s] for s in sites) / total
                rows.append([wide] + [levels[s] for s in sites])
        paths[f"greedy.{layer}"] = torch.tensor(rows)
    return paths


def dense_tables(model, batches, sites, layers) -> dict[tuple[str, int], torch.Tensor]:
    sample = ValueSample(calls=len(batches))
    keys = [(site, layer) for site in sites for layer in layers]
    observe(model, batches, keys, lambda s, layer, x: sample.add((s, layer), x.abs()))
    return {key: sample.table(key) for key in keys}


class CandidateSearch:
    """Evaluates several threshold settings of one block at once, as rows of one batch."""

    def __init__(self, model, layer: int, sites: list[str], captured):
        self.model, self.layer, self.sites = model, layer, sites
        self.block = adapter_for(model).layers(model)[layer]
        args, kwargs = captured
        kwargs = dict(kwargs)
        if "hidden_states" in kwargs:
            self.hidden, self.args = kwargs.pop("hidden_states"), args
        else:
            self.hidden, self.args = args[0], args[1:]
        self.kwargs = kwargs
        self.thresholds: dict[str, torch.Tensor] = {}

    def __enter__(self) -> CandidateSearch:
        fns = [((site, self.layer), self._fn(site)) for site in self.sites]
        self._hooks = hooked(self.model, fns)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _fn(self, site: str):
        def fn(x: torch.Tensor) -> torch.Tensor:
            threshold = self.thresholds[site].to(x.device, x.dtype)[:, None, None]
            return x.masked_fill(x.abs() < threshold, 0.0)

        return fn

    def outputs(self, settings: list[dict[str, float]]) -> list[torch.Tensor]:
        n = len(settings)
        self.thresholds = {s: torch.tensor([t[s] for t in settings]) for s in self.sites}
        hidden = self.hidden.expand(n, *self.hidden.shape[1:])
        out = self.block(hidden, *self.args, **self.kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return list(out.unbind(0))


def _error(output: torch.Tensor, reference: torch.Tensor, last_fraction: float = 0.25) -> float:
    """Mean L2 distance of the block outputs over the last quarter of the positions (TEAL)."""
    start = int(output.shape[0] * (1 - last_fraction))
    return float((output[start:] - reference[start:]).float().norm(dim=-1).mean())
