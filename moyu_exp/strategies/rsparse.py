"""R-Sparse: input channels above a threshold through the full weight, the rest through a rank-r
SVD remainder (Zhang et al., "R-Sparse: Rank-Aware Activation Sparsity", ICLR 2025).

For a linear y = W x (W: out x d) with the SVD W = U S V^T, the channels with |x_i| >= tau form
the sparse part and the others reach the output through the top-r singular components only:

    y ~= W (x * m) + U_r S_r V_r^T (x * (1 - m)),   m_i = 1[|x_i| >= tau].

A kernel reads the kept channels' columns of W plus the r (d + out) weights of the factors, so
at a target ``sparsity`` s each (site, layer) has the budget (1 - s) d out of weights per token,
spent between channels and rank. The sites are TEAL's (the inputs of every linear); a shared input
(q, k, v; gate, up) has one mask and one SVD of its readers' stacked weights.

As published, by default: thresholds are quantiles of the dense model's |x| on the calibration
rows; every position runs sparse (``prefill=sparse``, the paper applies
the rule to every token); sparsity is model-level (the low-rank factors count as weights read).

Departures: the paper picks each layer's (sparsity, rank) with an evolutionary search of the
model's output error; here each (site, layer) picks, within its budget, the split of ``rank_grid``
candidates (a share 0, 1/g, ..., (g-1)/g of the budget on the factors) whose output error
||R (W - W_r)^T|| on ``search_tokens`` calibration tokens is least (R: the channels the mask
drops), a local search with the same objective per linear and no search across layers;
``rank_share`` fixes the share instead (an ablation of the search). The
public repository (VITA-Group/R-Sparse) holds no code; the rule follows the paper's text.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

from moyu_exp.activations import observe, threshold_at
from moyu_exp.config import Range
from moyu_exp.families import adapter_for
from moyu_exp.lazy import lazy_import
from moyu_exp.masking import KernelRule
from moyu_exp.strategies.base import Strategy, register
from moyu_exp.strategies.teal import TEAL_SITES, dense_statistics

torch = lazy_import("torch")


@register("rsparse")
@dataclass(eq=False)
class RSparse(Strategy):
    name: str = "rsparse"
    sites: list[str] = field(default_factory=lambda: list(TEAL_SITES))
    prefill: str = "sparse"  # R-Sparse applies the rule at every position
    rank_grid: int = 10  # candidate shares of the budget spent on the low-rank factors
    search_tokens: int = 2048  # calibration tokens the (sparsity, rank) search reads
    rank_share: float | None = None  # a fixed share of the budget on the factors (no search)

    RANGES: ClassVar[dict[str, Range]] = {
        **Strategy.RANGES,
        "rank_grid": Range(1, 100),
        "rank_share": Range(0, 1, high_open=True),
    }
    allowed_sites = TEAL_SITES
    needs_calibration = True
    calibration_version = 1
    calibration_passes = 2.5  # the dense tables' pass, the search's pass and the SVDs

    def calibration_key(self) -> dict[str, Any]:
        search = {
            "sparsity": self.sparsity,
            "grid": self.rank_grid,
            "tokens": self.search_tokens,
            "share": self.rank_share,
        }
        return super().calibration_key() | {"search": search}

    # ------------------------------------------------------------------ calibration
    def calibrate(self, model, batches, cached) -> dict[str, torch.Tensor]:
        """The dense quantile tables (shared by every sparsity), then each (site, layer)'s
        split of its budget between channels and rank."""
        params = {"sites": list(self.sites), "layers": self.layers}
        layers = self.layer_ids(model)
        state = cached(
            "dense-tables", params, lambda: dense_statistics(model, batches, self.sites, layers)
        )
        if self.sparsity > 0.0:
            state = state | budget_search(model, batches, self, state)
        return state

    def split(self, calibration: dict, site: str, layer: int) -> tuple[float, int]:
        """(channel sparsity, rank) of (site, layer): all channels at sparsity 0."""
        if self.sparsity == 0.0:
            return 0.0, 0
        level = float(calibration[f"level.{site}.{layer}"])
        return level, int(calibration[f"rank.{site}.{layer}"])

    # -------------------------------------------------------------------- decisions
    def prepare(self, model, adapter, layers, calibration) -> SimpleNamespace:
        blocks = adapter.layers(model)
        state = SimpleNamespace(rules={}, factors={}, extra={}, inputs={}, z={}, readers={})
        for layer in layers:
            for site in self.sites:
                level, rank = self.split(calibration, site, layer)
                threshold = threshold_at(calibration[f"table.{site}.{layer}"], level)
                state.rules[(site, layer)] = KernelRule(threshold=max(threshold, 0.0))
                if rank == 0:
                    continue
                readers = adapter.readers(blocks[layer], site)
                weight = stacked(readers)
                v, us = factors(weight, rank)
                state.factors[(site, layer)] = (v.to(weight.dtype), us.to(weight.dtype))
                state.extra[(site, layer)] = rank * (weight.shape[0] + weight.shape[1])
                state.readers[(site, layer)] = readers
        return state

    def kernel_rule(self, state, site: str, layer: int) -> KernelRule:
        return state.rules[(site, layer)]

    def lowrank(self, state, site: str, layer: int):
        return state.factors.get((site, layer))

    def extra_weights(self, state) -> dict[tuple[str, int], int]:
        return dict(state.extra)

    def taps(self, state, model, adapter, layers) -> list:
        """Each low-rank site's input before the mask (the remainder is x - kept)."""

        def tap(key):
            def fn(x):
                state.inputs[key] = x
                return x

            return fn

        return [(key, tap(key)) for key in state.factors]

    def patches(self, state, model, adapter, layers) -> list[tuple[Any, str, Any]]:
        """Each reader's forward gains its rows of ((x - kept) V_r) (U_r S_r)^T."""
        out = []
        for key, readers in state.readers.items():
            start = 0
            for linear in readers:
                rows = slice(start, start + linear.out_features)
                start = rows.stop
                out.append((linear, "forward", reader_forward(state, key, linear, rows)))
        return out


def reader_forward(state, key, linear, rows: slice):
    """A linear's forward plus its share of the low-rank path of the remainder."""
    functional = torch.nn.functional

    def forward(kept: torch.Tensor) -> torch.Tensor:
        y = functional.linear(kept, linear.weight, linear.bias)
        cached = state.z.get(key)
        if cached is None or cached[0]() is not kept:  # the site's first reader in this pass
            x = state.inputs.pop(key, None)  # not kept alive beyond its use
            if x is None or x.shape != kept.shape:
                return y
            v, _ = state.factors[key]
            cached = state.z[key] = (weakref.ref(kept), (x - kept) @ v)
        us = state.factors[key][1][rows]
        return y + cached[1] @ us.t()

    return forward


def stacked(readers) -> torch.Tensor:
    """The readers' weights stacked by output rows (the order of their outputs)."""
    return torch.cat([linear.weight.detach() for linear in readers], dim=0)


def factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """V_r (d, r) and U_r S_r (out, r) of the rank-``rank`` SVD of ``weight`` (in float64)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return vh[:rank].t(), u[:, :rank] * s[:rank]


# ---------------------------------------------------------------------- budget search
def split_for(share: float, sparsity: float, d: int, out: int) -> tuple[float, int]:
    """The (channel sparsity, rank) that spends ``share`` of the budget (1 - s) d out on rank-r
    factors (r (d + out) weights) and the rest on channels."""
    budget = (1.0 - sparsity) * d * out
    rank = int(share * budget / (d + out))
    channels = (budget - rank * (d + out)) / out
    return min(max(1.0 - channels / d, 0.0), 1.0), rank


def candidates(sparsity: float, d: int, out: int, grid: int) -> list[tuple[float, int]]:
    """The splits the search compares: shares 0, 1/grid, ..., (grid-1)/grid."""
    splits = []
    for i in range(grid):
        split = split_for(i / grid, sparsity, d, out)
        if split not in splits and split[0] < 1.0:
            splits.append(split)
    return splits


def budget_search(model, batches, rsparse: RSparse, tables: dict) -> dict[str, torch.Tensor]:
    """Per (site, layer), the split whose output error ||R (W - W_r)^T||^2 on the search
    tokens is least (R: the dropped channels of the dense model's inputs)."""
    adapter = adapter_for(model)
    blocks = adapter.layers(model)
    layers = rsparse.layer_ids(model)
    ids = torch.cat([b.reshape(-1) for b in batches])[: rsparse.search_tokens][None]
    spectra, errors, splits = {}, {}, {}
    for layer in layers:
        for site in rsparse.sites:
            weight = stacked(adapter.readers(blocks[layer], site)).double()
            out, d = weight.shape
            options = (
                candidates(rsparse.sparsity, d, out, rsparse.rank_grid)
                if rsparse.rank_share is None
                else [split_for(rsparse.rank_share, rsparse.sparsity, d, out)]
            )
            splits[(site, layer)] = options
            errors[(site, layer)] = torch.zeros(len(options), dtype=torch.float64)
            if len(options) > 1:  # only a choice needs the spectrum and a search pass
                _, s, vh = torch.linalg.svd(weight, full_matrices=False)
                spectra[(site, layer)] = (s.float(), vh.t().float().contiguous())

    def measure(site: str, layer: int, x: torch.Tensor) -> None:
        s, v = spectra[(site, layer)]
        x = x.reshape(-1, x.shape[-1]).float()
        table = tables[f"table.{site}.{layer}"]
        for j, (level, rank) in enumerate(splits[(site, layer)]):
            dropped = x.masked_fill(x.abs() >= threshold_at(table, level), 0.0)
            tail = (dropped @ v[:, rank:]) * s[rank:]
            errors[(site, layer)][j] += tail.double().square().sum()

    if spectra:
        observe(model, [ids], list(spectra), measure, desc="R-Sparse budget search")
    out = {}
    for (site, layer), errs in errors.items():
        level, rank = splits[(site, layer)][int(errs.argmin())]
        out[f"level.{site}.{layer}"] = torch.tensor([level])
        out[f"rank.{site}.{layer}"] = torch.tensor([rank])
    return out
