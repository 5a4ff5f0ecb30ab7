"""TEAL's block-wise greedy allocation of sparsity between a block's sites, for any sparsifier.

Following TEAL (Liu et al., ICLR 2025; ``teal/greedyopt.py``): per decoder block, on the dense
block inputs of the calibration rows, start dense and repeatedly raise the level of the one site
whose step adds the least error, steps sized so that every step skips the same number of
weights; the path [weighted sparsity, level of each site] is recorded up to a reach and a target
sparsity picks the row closest to it. As in TEAL's code, the candidate block runs under the
last-half protocol (the last floor(T/2) positions of each row sparse, the rest dense), and the
error is the L2 norm over positions of the block-output difference on the last quarter of the
positions, averaged over rows and channels.

A path is a prefix-closed object: the search is deterministic, so a path searched up to one
sparsity is the beginning of the path searched further, and :func:`greedy_path` continues a
stored path from its last row (see :func:`moyu_exp.calibration.Parts.path`).

:class:`BlockSearch` evaluates a candidate setting in stages and keeps what a trial does not
change (``staged``, where the family's adapter can run its attention over a span of positions):

- the keys and values of the dense prefix are computed once; a setting of the attention-input
  sites runs the attention over the sparse positions only, and the error window's queries come
  from a second call that reads the first one's keys (so queries outside the window are never
  scored against the window's keys); the o_proj input it leaves is kept per setting, so an
  o_proj trial costs one o_proj product;
- the MLP half keeps the MLP input, the gate and up outputs and the activation per setting of
  the sites before them, so an intermediate trial costs one down product.

Every product is the one the plain evaluation (``staged=False``: the block's own modules on the
whole sequence, kept as the reference and for families without the span call) computes on the
same rows, so both give the same errors bit for bit on the CPU (tested, and
``benchmarks/greedy_search.py`` prints both paths and their times).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tqdm.auto import tqdm

from moyu_exp.families import adapter_for, hooked
from moyu_exp.lazy import lazy_import
from moyu_exp.sites import ATTENTION_SITES
from moyu_exp.strategies.attachment import RotationCache

torch = lazy_import("torch")

# Bump when the rows a search produces change (the greedy rule, its error, its protocol): every
# cached and shipped path of an older version is then searched again.
SEARCH_VERSION = 1
DONE = 0.99  # a site's level stops here (TEAL stops at >= 1); rows show it as 0.99
# the evaluation BlockSearch uses by default: staged where the adapter can (None), or plain
# (False: the reference, what benchmarks/greedy_search.py times against)
STAGED: bool | None = None

# (site, level, x) -> x with the entries that level drops set to zero
Sparsify = Callable[[str, float, "torch.Tensor"], "torch.Tensor"]
MLP_SITES = ("mlp_input", "gate_input", "up_input", "gate_act", "mlp_intermediate")


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
        staged: bool | None = None,
    ):
        self.model, self.layer, self.sparsify = model, layer, sparsify
        self.adapter = adapter_for(model)
        self.block = self.adapter.layers(model)[layer]
        args, kwargs = captured
        kwargs = dict(kwargs)
        self.x = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
        self.kwargs = kwargs
        tokens = self.x.shape[1]
        self.dense_until = tokens - int(sparse_fraction * tokens)
        self.start = int(tokens * (1 - error_fraction))
        positions = torch.arange(tokens, device=self.x.device)
        self.active = (positions >= self.dense_until)[None, :, None]
        window = self.active[:, self.start :]
        self.window_active = None if bool(window.all()) else window  # None: all of it sparse
        self.sites = list(sites)
        self.attention_sites = [s for s in sites if s in ATTENTION_SITES]
        self.bases = bases or {}
        self._rotated = RotationCache()
        wanted = STAGED if staged is None else staged
        self.staged = wanted is not False and self.adapter.runs_attention_spans(self.block)
        self._stages: dict[str, dict] = {}
        with torch.inference_mode():
            if self.staged:
                self._prepare_spans()
            self.reference = self._output({})

    # ---------------------------------------------------------------- site functions
    def _apply(self, site: str, level: float, x: torch.Tensor, active=None) -> torch.Tensor:
        """The site's tensor as a trial sees it: in the site's basis, entries dropped at
        ``level`` where ``active`` (None: everywhere)."""
        basis = self.bases.get(site)
        if basis is not None:  # the site's readers were patched to read x R
            x = self._rotated.get(x, basis)
        if level <= 0.0:
            return x
        y = self.sparsify(site, level, x)
        return y if active is None else torch.where(active, y, x)

    def _hook(self, site: str, level: float, active=None):
        return (site, self.layer), lambda x: self._apply(site, level, x, active)

    def _memo(self, stage: str, key: tuple, compute):
        table = self._stages.setdefault(stage, {})
        if key not in table:
            table[key] = compute()
        return table[key]

    # ------------------------------------------------------------------------ keys
    def _keys(self, levels: dict[str, float]) -> dict[str, tuple]:
        """The key of every stage's result under ``levels``: the levels of the sites before it."""

        def of(names) -> tuple:
            return tuple(round(levels.get(s, 0.0), 9) for s in names if s in self.sites)

        keys = {"context": of(s for s in self.attention_sites if s != "o_proj_input")}
        keys["h"] = keys["context"] + of(["o_proj_input"])
        keys["m"] = keys["h"] + of(["mlp_input"])
        keys["gate"] = keys["m"] + ("gate",) + of(["gate_input"])
        keys["up"] = keys["m"] + ("up",) + of(["up_input"])
        keys["act"] = keys["gate"] + of(["gate_act"])
        return keys

    def keep_only(self, settings: list[dict[str, float]]) -> None:
        """Forget kept stage results that none of ``settings`` reads."""
        wanted: dict[str, set] = {}
        for levels in settings:
            for stage, key in self._keys(levels).items():
                wanted.setdefault(stage, set()).add(key)
        for stage, keep in wanted.items():  # (the window's input, keyed by nothing, stays)
            table = self._stages.get(stage, {})
            self._stages[stage] = {k: v for k, v in table.items() if k in keep}

    # ---------------------------------------------------------------- the block's halves
    def _prepare_spans(self) -> None:
        """The dense prefix's keys and values (and its o_proj inputs), computed once."""
        self._normed = self.adapter.pre_norm(self.block, "attn")(self.x)
        inputs = [s for s in self.attention_sites if s != "o_proj_input"]
        captured: list[torch.Tensor] = []
        capture = (("o_proj_input", self.layer), lambda c: captured.append(c) or c)
        self._prefix = _KeysValues()
        if self.dense_until > 0:
            with hooked(self.model, [*(self._hook(s, 0.0) for s in inputs), capture]):
                self.adapter.attention_span(
                    self.block, self._normed, self.kwargs, 0, self.dense_until, self._prefix
                )
        self._prefix_context = captured[0][:, self.start :] if captured else None

    def _context(self, levels: dict[str, float], key: tuple) -> torch.Tensor:
        """The o_proj input on the error window, the attention inputs at ``levels``."""

        def compute() -> torch.Tensor:
            inputs = [s for s in self.attention_sites if s != "o_proj_input"]
            captured: list[torch.Tensor] = []
            capture = (("o_proj_input", self.layer), lambda c: captured.append(c) or c)
            fns = [*(self._hook(s, levels.get(s, 0.0)) for s in inputs), capture]
            cache = self._prefix.copy()
            first = max(self.start, self.dense_until)
            spans = [(self.dense_until, first), (first, self.x.shape[1])]
            with hooked(self.model, fns):
                for low, high in spans:
                    if high > low:
                        self.adapter.attention_span(
                            self.block, self._normed, self.kwargs, low, high, cache
                        )
            window = captured[-1]
            if self._prefix_context is not None and self.start < self.dense_until:
                window = torch.cat([self._prefix_context, window], dim=1)
            return window

        return self._memo("context", key, compute)

    def _attention_half(self, levels: dict[str, float], keys: dict[str, tuple]) -> torch.Tensor:
        """The block's input plus its attention branch, on the error window."""
        if not self.staged:  # the block's own attention on the whole sequence

            def whole() -> torch.Tensor:
                fns = [self._hook(s, levels.get(s, 0.0), self.active) for s in self.attention_sites]
                with hooked(self.model, fns):
                    full = self.adapter.attention_residual(self.block, self.x, self.kwargs)
                return full[:, self.start :]

            return self._memo("h", keys["h"], whole)

        def residual() -> torch.Tensor:
            context = self._context(levels, keys["context"])
            if "o_proj_input" in self.sites:
                level = levels.get("o_proj_input", 0.0)
                context = self._apply("o_proj_input", level, context, self.window_active)
            output = self.adapter.readers(self.block, "o_proj_input")[0](context)
            return self.adapter.branch_residual(self.block, "attn", self._window_x(), output)

        return self._memo("h", keys["h"], residual)

    def _window_x(self) -> torch.Tensor:
        return self._memo("x", (), lambda: self.x[:, self.start :].contiguous())

    def _mlp_half(
        self, levels: dict[str, float], keys: dict[str, tuple], h: torch.Tensor
    ) -> torch.Tensor:
        """``h`` plus the MLP branch at ``levels`` (position-wise, on the error window)."""
        mlp_sites = [s for s in self.sites if s in MLP_SITES]
        active = self.window_active
        if not (self.staged and self.adapter.runs_mlp_parts(self.block)):
            fns = [self._hook(s, levels.get(s, 0.0), active) for s in mlp_sites]
            with hooked(self.model, fns):
                return self.adapter.mlp_residual(self.block, h, self._window_x())

        def site(name: str, x: torch.Tensor) -> torch.Tensor:
            return self._apply(name, levels.get(name, 0.0), x, active) if name in mlp_sites else x

        def mlp_input() -> torch.Tensor:
            return site("mlp_input", self.adapter.pre_norm(self.block, "mlp")(h))

        m = self._memo("m", keys["m"], mlp_input)
        gate, up = self.adapter.gate_up_linears(self.block)
        if up is None:  # one fused projection: gate and up read one input
            both = self._memo("gate", keys["gate"], lambda: gate(m).chunk(2, dim=-1))
            g, u = both
        else:
            g = self._memo("gate", keys["gate"], lambda: gate(site("gate_input", m)))
            u = self._memo("up", keys["up"], lambda: up(site("up_input", m)))
        act = self.adapter.mlp_activation(self.block)
        a = self._memo("act", keys["act"], lambda: site("gate_act", act(g)))
        z = site("mlp_intermediate", a * u)
        down = self.adapter.readers(self.block, "mlp_intermediate")[0]
        return self.adapter.branch_residual(self.block, "mlp", h, down(z))

    def _output(self, levels: dict[str, float]) -> torch.Tensor:
        keys = self._keys(levels)
        h = self._attention_half(levels, keys)
        return self._mlp_half(levels, keys, h)

    def errors(self, candidates: list[dict[str, float]]) -> list[float]:
        """TEAL's error of each candidate setting: ||y - y_dense|| over the error's positions,
        averaged over rows and channels."""
        out = []
        with torch.inference_mode():
            for levels in candidates:
                diff = (self._output(levels) - self.reference).float()
                out.append(float(diff.norm(dim=1).mean()))
        return out


class _KeysValues:
    """The key/value cache an attention span reads and extends (transformers' ``cache.update``
    interface): the dense prefix's, copied per trial."""

    def __init__(self, keys=None, values=None):
        self.keys, self.values = keys, values

    def copy(self) -> _KeysValues:
        return _KeysValues(self.keys, self.values)

    def update(self, keys, values, layer_idx, *args, **kwargs):
        if self.keys is not None:
            keys = torch.cat([self.keys, keys], dim=-2)
            values = torch.cat([self.values, values], dim=-2)
        self.keys, self.values = keys, values
        return keys, values


# ------------------------------------------------------------------------------ the path
def site_steps(model, layer: int, sites: list[str], step: float) -> tuple[dict, dict]:
    """Each site's level step and the weights its entries gate. As in TEAL, a site gating a
    hidden x hidden projection's worth (TEAL's weight 1, q_proj) moves by ``step``, the others by
    the step that skips as many weights (k_proj of a 1/8-GQA model by 8 x step)."""
    adapter = adapter_for(model)
    block = adapter.layers(model)[layer]
    gated = {
        s: adapter.weights_per_entry(block, s, tuple(sites)) * adapter.dim(model, s) for s in sites
    }
    unit = adapter.dim(model, "attn_input") ** 2
    return {s: step * unit / gated[s] for s in sites}, gated


def steps_to(reach: float, model, layer: int, sites: list[str], step: float) -> int:
    """About how many greedy steps a path needs to reach ``reach`` (each step skips the same
    number of weights): what a progress bar counts."""
    steps, gated = site_steps(model, layer, sites, step)
    unit = steps[sites[0]] * gated[sites[0]] / step
    return int(reach * sum(gated.values()) / (step * unit)) + 1


def resumed_levels(row, sites: list[str], steps: dict[str, float]) -> dict[str, float]:
    """The search's exact levels at a stored row (rows hold them in float32, the search in
    float64: a level is a number of steps added one by one; 0.99 is a finished site)."""
    levels = {}
    for site, value in zip(sites, row[1:].tolist(), strict=True):
        if value >= DONE - 1e-6:
            levels[site] = 1.0
            continue
        level = 0.0
        for _ in range(round(value / steps[site])):
            level = level + steps[site]
        levels[site] = level
    return levels


def path_complete(path: torch.Tensor, reach: float) -> bool:
    """Whether a stored path serves every target up to ``reach``: it got there, or every site
    reached its end (nothing further to search)."""
    return bool(path[-1, 0] >= reach or torch.all(path[-1, 1:] >= DONE - 1e-6))


def paths_reach(calibration: dict, reach: float) -> bool:
    """Whether every greedy path of a calibration state ("greedy.<layer>") serves ``reach``."""
    return all(path_complete(v, reach) for k, v in calibration.items() if k.startswith("greedy."))


def greedy_path(
    search: BlockSearch,
    sites: list[str],
    step: float,
    reach: float,
    start: torch.Tensor | None = None,
    progress: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Rows [weighted sparsity, level of each site] from dense (or from the last row of
    ``start``, a path of the same search) until the weighted sparsity reaches ``reach``;
    ``progress`` is called after every step."""
    steps, gated = site_steps(search.model, search.layer, sites, step)
    total = sum(gated.values())
    if start is None:
        rows = [[0.0] * (len(sites) + 1)]
        levels = dict.fromkeys(sites, 0.0)
    else:
        rows = start.tolist()
        levels = resumed_levels(start[-1], sites, steps)
    while rows[-1][0] < reach:
        options = [s for s in sites if levels[s] < 1.0]
        if not options:
            break
        trials = [{**levels, s: min(levels[s] + steps[s], DONE)} for s in options]
        errors = search.errors(trials)
        best = min(range(len(options)), key=errors.__getitem__)
        levels = trials[best]
        if levels[options[best]] >= DONE:
            levels[options[best]] = 1.0  # as far as this site goes (TEAL stops at >= 1)
        search.keep_only([levels, *trials])
        rows.append([sum(min(levels[s], DONE) * gated[s] for s in sites) / total, *levels.values()])
        if progress is not None:
            progress()
    return torch.tensor(rows).clamp(max=DONE)


# ----------------------------------------------------------------------- paths of a model
# Measured per greedy step of TEAL's four-site search on SmolLM2 (staged): about 0.65 MLP
# evaluations of the error window and 0.09 attention evaluations per site (the rest is kept).
MLP_EVALS_PER_SITE = 0.65
ATTENTION_EVALS_PER_SITE = 0.09
EAGER_ATTENTION_COST = 4.0  # transformers' eager attention against SDPA, per FLOP


class ModelPaths:
    """The greedy paths of a model's layers up to ``reach``, one calibration part per layer:
    stored (shipped or cached) where they reach that far, else searched, or continued from
    the stored rows, and cached as soon as each layer is done (an interrupted search resumes
    at the first layer it had not finished). ``announce`` states the cost before it is paid;
    the search shows a progress bar over its steps, with an ETA."""

    def __init__(
        self, parts, owner: str, params: dict, layers: list[int], sites: list[str], step: float
    ):
        self.parts, self.owner, self.params = parts, owner, params
        self.layers, self.sites, self.step = layers, list(sites), step
        self.todo: dict[int, torch.Tensor | None] = {}
        self.reach = 0.0

    def plan(self, reach: float) -> ModelPaths:
        """Find which layers' stored paths fall short of ``reach``."""
        self.reach = reach
        self.todo = {}
        for layer in self.layers:
            rows, _ = self.parts.stored_path(self._label(layer), self._params(layer), self.owner)
            if rows is None or not path_complete(rows, reach):
                self.todo[layer] = rows
        return self

    def _label(self, layer: int) -> str:
        return f"greedy-{layer}"

    def _params(self, layer: int) -> dict:
        return self.params | {"layer": layer}

    def steps_left(self, model) -> int:
        total = 0
        for layer, rows in self.todo.items():
            done = 0 if rows is None else len(rows) - 1
            total += max(1, steps_to(self.reach, model, layer, self.sites, self.step) - done)
        return total

    def estimate(self, model, rows: int, tokens: int, sparse_fraction: float) -> float:
        """Seconds the outstanding search should take on this machine: a timed MLP half of
        the error window's shape, scaled by the measured evaluations per step."""
        if not self.todo:
            return 0.0
        layer = next(iter(self.todo))
        adapter = adapter_for(model)
        block = adapter.layers(model)[layer]
        param = next(model.parameters())
        window = tokens - int(tokens * 0.75)
        d = adapter.dim(model, "attn_input")
        h = torch.randn(rows, window, d, generator=torch.Generator().manual_seed(0)) * 0.1
        h = h.to(param.device, param.dtype)
        times = []
        with torch.inference_mode():
            for _ in range(2):
                start = time.perf_counter()
                adapter.mlp_residual(block, h, h)
                times.append(time.perf_counter() - start)
        t_mlp = min(times)
        mlp_weights = sum(lin.weight.numel() for lin in adapter.mlp_linears(block))
        rate = 2 * rows * window * mlp_weights / max(t_mlp, 1e-9)  # FLOP/s of this machine
        dense_until = tokens - int(sparse_fraction * tokens)
        projections = sum(lin.weight.numel() for lin in adapter.readers(block, "attn_input"))
        scores = 2 * 2 * adapter.dim(model, "o_proj_input") * (tokens**2 - dense_until**2) / 2
        attention = 2 * rows * (tokens - dense_until) * projections + rows * scores
        if adapter.eager_attention(block):
            attention *= EAGER_ATTENTION_COST
        per_site = MLP_EVALS_PER_SITE * t_mlp + ATTENTION_EVALS_PER_SITE * attention / rate
        return self.steps_left(model) * per_site * len(self.sites)

    def run(
        self,
        model,
        inputs: dict[int, tuple],
        make_search: Callable[[int, tuple], BlockSearch],
        desc: str,
    ) -> dict[str, torch.Tensor]:
        """Every layer's path ({"greedy.<layer>": rows}); ``inputs``: the dense block inputs
        of the layers to search (:attr:`todo`), as ``capture_block_inputs`` gives them."""
        paths = {}
        bar = tqdm(
            total=self.steps_left(model),
            desc=desc,
            unit="step",
            leave=False,
            disable=not self.todo,  # every path stored: nothing to show
        )
        with bar:
            for layer in self.layers:

                def search(start: torch.Tensor | None, layer: int = layer) -> torch.Tensor:
                    block_search = make_search(layer, inputs.pop(layer))
                    return greedy_path(
                        block_search, self.sites, self.step, self.reach, start, bar.update
                    )

                def enough(rows: torch.Tensor) -> bool:
                    return path_complete(rows, self.reach)

                paths[f"greedy.{layer}"] = self.parts.path(
                    self._label(layer), self._params(layer), enough, search, self.owner
                )
        return paths
