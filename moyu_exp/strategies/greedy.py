"""TEAL's block-wise greedy allocation of sparsity between a block's sites, for any sparsifier.

Following TEAL (Liu et al., ICLR 2025; ``teal/greedyopt.py``): per decoder block, on the dense
block inputs of the calibration rows, start dense and repeatedly raise the level of the one site
whose step adds the least error, steps sized so that every step skips the same number of
weights; the path [weighted sparsity, level of each site] is recorded up to ``max_sparsity``
and a target sparsity picks the row closest to it. As in TEAL's code, the candidate block runs
under the last-half protocol (the last floor(T/2) positions of each row sparse, the rest dense),
and the error is the L2 norm over positions of the block-output difference on the last quarter
of the positions, averaged over rows and channels.

A block is evaluated in its two halves (the adapter's ``attention_residual`` and
``mlp_residual``): the attention half once per setting of the attention sites (cached across
steps), the position-wise MLP half only on the positions the error reads.
"""

from __future__ import annotations

from collections.abc import Callable

from moyu_exp.lazy import lazy_import
from moyu_exp.sites import ATTENTION_SITES, adapter_for, hooked
from moyu_exp.strategies.attachment import RotationCache

torch = lazy_import("torch")

# (site, level, x) -> x with the entries that level drops set to zero
Sparsify = Callable[[str, float, "torch.Tensor"], "torch.Tensor"]


class BlockSearch:
    """Errors of one block's output under per-site levels, on captured dense inputs."""

    def __init__(
        self,
        model,
        layer: int,
        sites: list[str],
        captured: tuple,
        sparsify: Sparsify,
        sparse_fraction: float = 0.5,
        error_fraction: float = 0.25,
        bases: dict[str, torch.Tensor] | None = None,
    ):
        self.model, self.layer, self.sparsify = model, layer, sparsify
        self.adapter = adapter_for(model)
        self.block = self.adapter.layers(model)[layer]
        args, kwargs = captured
        kwargs = dict(kwargs)
        self.x = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
        self.kwargs = kwargs
        tokens = self.x.shape[1]
        positions = torch.arange(tokens, device=self.x.device)
        self.active = (positions >= tokens - int(sparse_fraction * tokens))[None, :, None]
        self.start = int(tokens * (1 - error_fraction))
        self.attention_sites = [s for s in sites if s in ATTENTION_SITES]
        self.bases = bases or {}
        self._rotated = RotationCache()
        self.levels: dict[str, float] = {}
        self._attention: dict[tuple, torch.Tensor] = {}
        self._fns = [((site, layer), self._site_fn(site)) for site in sites]
        with hooked(model, self._fns), torch.inference_mode():
            self.reference = self._output({})

    def _site_fn(self, site: str):
        attention = site in ATTENTION_SITES

        basis = self.bases.get(site)

        def fn(x: torch.Tensor) -> torch.Tensor:
            if basis is not None:  # the site's readers were patched to read x R
                x = self._rotated.get(x, basis)
            level = self.levels.get(site, 0.0)
            if level <= 0.0:
                return x
            y = self.sparsify(site, level, x)
            # the attention half sees every position (last half sparse); the MLP half only the
            # error's positions, all of them in the sparse half
            return torch.where(self.active, y, x) if attention else y

        return fn

    def _output(self, levels: dict[str, float]) -> torch.Tensor:
        self.levels = levels
        key = tuple(round(levels.get(s, 0.0), 9) for s in self.attention_sites)
        h = self._attention.get(key)
        if h is None:
            full = self.adapter.attention_residual(self.block, self.x, self.kwargs)
            h = self._attention[key] = full[:, self.start :]
        return self.adapter.mlp_residual(self.block, h, self.x[:, self.start :])

    def errors(self, candidates: list[dict[str, float]]) -> list[float]:
        """TEAL's error of each candidate setting: ||y - y_dense|| over the error's positions,
        averaged over rows and channels."""
        out = []
        with hooked(self.model, self._fns), torch.inference_mode():
            for levels in candidates:
                diff = (self._output(levels) - self.reference).float()
                out.append(float(diff.norm(dim=1).mean()))
        return out

    def keep_only(self, settings: list[dict[str, float]]) -> None:
        """Forget cached attention halves other than those of ``settings``."""
        keep = {tuple(round(s.get(x, 0.0), 9) for x in self.attention_sites) for s in settings}
        self._attention = {k: v for k, v in self._attention.items() if k in keep}


def greedy_path(
    search: BlockSearch, sites: list[str], step: float, max_sparsity: float
) -> torch.Tensor:
    """Rows [weighted sparsity, level of each site] from dense up to ``max_sparsity``. Each
    site is weighted by the weights its entries gate in all; as in TEAL, a site gating a hidden x
    hidden projection's worth (TEAL's weight 1, q_proj) moves by ``step``, the others by the step
    that skips as many weights (k_proj of a 1/8-GQA model by 8 x step)."""
    model, adapter = search.model, search.adapter
    gated = {
        s: adapter.weights_per_entry(search.block, s, tuple(sites)) * adapter.dim(model, s)
        for s in sites
    }
    unit = model.config.hidden_size**2
    total = sum(gated.values())
    steps = {s: step * unit / gated[s] for s in sites}
    levels = dict.fromkeys(sites, 0.0)
    rows = [[0.0] * (len(sites) + 1)]
    while rows[-1][0] < max_sparsity:
        options = [s for s in sites if levels[s] < 1.0]
        if not options:
            break
        trials = [{**levels, s: min(levels[s] + steps[s], 0.99)} for s in options]
        errors = search.errors(trials)
        best = min(range(len(options)), key=errors.__getitem__)
        levels = trials[best]
        if levels[options[best]] >= 0.99:
            levels[options[best]] = 1.0  # as far as this site goes (TEAL stops at >= 1)
        search.keep_only([levels, *trials])
        rows.append([sum(min(levels[s], 0.99) * gated[s] for s in sites) / total, *levels.values()])
    return torch.tensor(rows).clamp(max=0.99)
