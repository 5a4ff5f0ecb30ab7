"""The strategy contract, shared by every dynamic-activation method.

A strategy is a dataclass of its own parameters (the config schema is derived from its fields).
``with strategy.attach(model) as live:`` installs one hook per (site, layer); each hook passes the
site's tensor through :meth:`Strategy.sparsify` and counts the entries it really zeroed. Leaving
the block removes every hook, so the model is restored bit-exactly, also after an exception.

Every forward pass has *token roles*: which positions are real tokens (not padding) and which
belong to the prompt. Roles come from the lm-eval bridge (:meth:`Strategy.segments`), else from
the attention mask and the KV cache: a forward on an empty cache is a prefill, all prompt; a
forward on a filled cache is a decode step. With ``prefill=dense`` prompt positions stay dense.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from moyu_exp.config import check_sparsity
from moyu_exp.errors import ConfigError
from moyu_exp.lazy import lazy_import
from moyu_exp.registry import registrar
from moyu_exp.sites import SITES, adapter_for, check_sites, resolve_layers

torch = lazy_import("torch")

STRATEGIES: dict[str, type[Strategy]] = {}
register = registrar(STRATEGIES, "strategy")  # class decorator: ``strategy=<name>``
PREFILL_POLICIES = ("sparse", "dense")


def keep_count(sparsity: float, dim: int) -> int:
    """Entries kept per token at a target sparsity: k = round((1 - s) * d)."""
    return round((1.0 - sparsity) * dim)


@dataclass
class TokenRoles:
    """Per position of the current forward: real token or padding, prompt or not."""

    valid: torch.Tensor | None = None  # (batch, tokens) bool; None: every position is real
    prompt: torch.Tensor | None = None  # (batch, tokens) bool; None: no prompt position

    def matches(self, x: torch.Tensor) -> bool:
        ref = self.valid if self.valid is not None else self.prompt
        return ref is None or tuple(ref.shape) == tuple(x.shape[:2])

    def active(self, dense_prompt: bool) -> torch.Tensor | None:
        """Positions the strategy sparsifies; None means all of them."""
        if dense_prompt and self.prompt is not None:
            valid = self.valid if self.valid is not None else torch.ones_like(self.prompt)
            return valid & ~self.prompt
        return self.valid


@dataclass
class KernelRule:
    """A kept set stated as data, so the native kernels can select it without calling back into
    Python: entries whose score |x_i| * scale_i is at least ``threshold`` (a number, or a tensor
    with one per entry), or, with ``k`` set, the k best scores. The strategy's ``sparsify`` and
    this rule must keep the same entries (tested for every strategy that gives one)."""

    threshold: float | torch.Tensor = 0.0
    k: int | None = None
    scale: torch.Tensor | None = None


@dataclass
class SparsityStats:
    """Entries zeroed / seen per (site, layer), and the weights each entry gates.

    ``overall`` weights every entry by the number of weight elements it lets a kernel skip (so a
    zero in the attention input, read by q, k and v, counts for all three): TEAL's model-wide
    sparsity. For a single site it equals the plain fraction of zeroed entries.
    """

    counts: dict[tuple[str, int], tuple[int, int, int]] = field(default_factory=dict)
    weights: dict[tuple[str, int], int] = field(default_factory=dict)

    def __add__(self, other: SparsityStats) -> SparsityStats:
        merged = dict(self.counts)
        for key, values in other.counts.items():
            old = merged.get(key, (0, 0, 0))
            merged[key] = tuple(a + b for a, b in zip(old, values, strict=True))  # type: ignore[assignment]
        return SparsityStats(merged, {**self.weights, **other.weights})

    def _ratio(self, keys: list[tuple[str, int]], weighted: bool = True) -> float:
        w = {k: (self.weights.get(k, 1) if weighted else 1) for k in keys}
        total = sum(self.counts[k][1] * w[k] for k in keys)
        return sum(self.counts[k][0] * w[k] for k in keys) / total if total else 0.0

    @property
    def overall(self) -> float:
        return self._ratio(list(self.counts))

    @property
    def entries(self) -> int:
        return sum(c[1] for c in self.counts.values())

    def by(self, index: int) -> dict[Any, float]:
        groups: dict[Any, list[tuple[str, int]]] = {}
        for key in self.counts:
            groups.setdefault(key[index], []).append(key)
        return {g: self._ratio(keys) for g, keys in sorted(groups.items())}

    def to_dict(self) -> dict[str, Any]:
        dense = sum(c[2] for c in self.counts.values())
        return {
            "overall": self.overall,
            "entry_fraction": self._ratio(list(self.counts), weighted=False),
            "entries": self.entries,
            "dense_prompt_entries": dense,
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
    prefill: str = "sparse"  # "dense": prompt positions (prefill, lm-eval contexts) stay dense

    allowed_sites: ClassVar[tuple[str, ...]] = tuple(SITES)
    needs_calibration: ClassVar[bool] = False
    calibration_version: ClassVar[int] = 1  # bump when a method's statistic changes
    sequence_level: ClassVar[bool] = False
    kernel_support: ClassVar[bool] = True  # bench.mode=kernel can run it (see moyu_exp.kernels)

    def __post_init__(self) -> None:
        check_sites(list(self.sites), self.allowed_sites, self.name)
        check_sparsity(self.sparsity)
        if self.prefill not in PREFILL_POLICIES:
            raise ConfigError(
                f"strategy.prefill='{self.prefill}' is unknown: accepted values are sparse, dense"
            )
        if self.sequence_level and self.prefill != "dense":
            raise ConfigError(
                f"strategy '{self.name}' selects from the prompt, which it runs dense: "
                "strategy.prefill must be dense"
            )
        self.layer_ids: list[int] = []
        self._handles: list[Any] = []
        self._enabled = True
        self._acc: dict[tuple[str, int], torch.Tensor] = {}
        self._decode_acc: dict[tuple[str, int], tuple[int, int]] = {}
        self._weights: dict[tuple[str, int], int] = {}
        self._segments: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.roles = TokenRoles()
        self.calibration: dict[str, torch.Tensor] | None = None

    @classmethod
    def key_sparsity(cls, sparsity: float) -> float | str:
        """The sparsity as far as results go, for sweep-point keys (dense ignores it)."""
        return sparsity

    # ------------------------------------------------------------------ method API
    def sparsify(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` (batch, tokens, dim) with the entries this method drops set to zero."""
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module, adapter: Any) -> None:
        """Called once on attach, before any hook runs: build masks, thresholds, norms."""

    def kernel_rule(self, site: str, layer: int) -> KernelRule | None:
        """The kept set of a decode-step site as a :class:`KernelRule`, or None when the method
        cannot state it so (kernel mode then asks :meth:`kept`)."""
        return None

    def kept(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Kernel mode's question: which entries of the single-token vector ``x`` (dim,) does
        this method keep? A bool mask. Defaults to the nonzeros of :meth:`sparsify`; methods
        override it with a cheaper route to the same set."""
        return self.sparsify(site, layer, x.view(1, 1, -1)).view(-1) != 0

    def extra_hooks(self, model: torch.nn.Module, adapter: Any) -> list[Any]:
        """Hooks beyond the sites' (e.g. reading another tensor); removed on exit like them."""
        return []

    def begin_forward(self, fresh: bool) -> None:
        """Called before every model forward (``fresh``: the KV cache was empty)."""

    def decode_neurons(self, layer: int) -> torch.Tensor | None:
        """For methods whose decode-time MLP neuron set is known in advance (sequence-level
        methods after the prompt, a static set): bool (d_ff,) of kept neurons; else None.
        Kernel mode gathers a compact MLP from it once per prompt."""
        return None

    def layer_ids_for(self, model: torch.nn.Module) -> list[int]:
        """The decoder layers this strategy touches in ``model``."""
        adapter = adapter_for(model)
        return resolve_layers(self.layers, len(adapter.layers(model)))

    def calibration_key(self) -> dict[str, Any]:
        """What, besides model and calibration text, determines :meth:`calibrate`'s output."""
        return {
            "name": self.name,
            "version": self.calibration_version,
            "sites": list(self.sites),
            "layers": self.layers,
        }

    def calibrate(self, model: torch.nn.Module, batches: list[torch.Tensor], cached) -> dict:
        """Statistics from calibration token batches, as plain tensors (cached by the caller).

        ``cached(label, params, compute)`` memoises a costly part that the rest of the key (e.g.
        the sparsity) does not change, under the same model and calibration text.
        """
        raise NotImplementedError(f"strategy '{self.name}' has no calibration")

    def load_calibration(self, state: dict[str, torch.Tensor]) -> None:
        self.calibration = state

    # -------------------------------------------------------------------- contract
    @contextmanager
    def attach(self, model: torch.nn.Module) -> Iterator[Strategy]:
        """Install the hooks; restore the model exactly on exit."""
        if self._handles:
            raise RuntimeError(f"strategy '{self.name}' is already attached to a model")
        if self.needs_calibration and self.calibration is None:
            raise RuntimeError(f"strategy '{self.name}' must be calibrated before attaching")
        adapter = adapter_for(model)
        blocks = adapter.layers(model)
        self.layer_ids = self.layer_ids_for(model)
        self.reset_stats()
        try:
            self.prepare(model, adapter)
            self._handles.extend(self.extra_hooks(model, adapter))
            if self.sites:
                self._handles.append(model.register_forward_pre_hook(self._begin, with_kwargs=True))
            for site in self.sites:
                for layer in self.layer_ids:
                    self._weights[(site, layer)] = adapter.weights_per_entry(blocks[layer], site)
                    fn = self._site_fn(site, layer)
                    self._handles.append(adapter.hook(blocks[layer], site, fn))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self.roles = TokenRoles()

    def stats(self) -> SparsityStats:
        """Entries zeroed / entries sparsified since the last reset (padding excluded)."""
        counts = {k: tuple(int(v) for v in acc) for k, acc in self._acc.items()}
        for key, (zeroed, total) in self._decode_acc.items():
            z0, n0, d0 = counts.get(key, (0, 0, 0))
            counts[key] = (z0 + zeroed, n0 + total, d0)
        return SparsityStats(counts, dict(self._weights))  # type: ignore[arg-type]

    def reset_stats(self) -> None:
        self._acc = {}
        self._decode_acc: dict[tuple[str, int], tuple[int, int]] = {}

    def begin_decode_step(self) -> None:
        """A decode step run outside the model's forward (kernel mode): no prompt, no padding."""
        self.roles = TokenRoles()
        self.begin_forward(False)

    def count_decode(self, site: str, layer: int, zeroed: int, total: int) -> None:
        """Count a kernel-mode decode step's zeroed entries (plain ints: no tensor ops)."""
        z0, n0 = self._decode_acc.get((site, layer), (0, 0))
        self._decode_acc[(site, layer)] = (z0 + zeroed, n0 + total)

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
    def segments(
        self, valid_lengths: torch.Tensor, prompt_lengths: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Declare the next forwards' rows: ``valid_lengths[b]`` real tokens (right padding), of
        which the first ``prompt_lengths[b]`` are the prompt (lm-eval's context)."""
        previous, self._segments = self._segments, (valid_lengths, prompt_lengths)
        try:
            yield
        finally:
            self._segments = previous

    # ------------------------------------------------------------------ internals
    def _begin(self, _module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = args[0] if args else kwargs.get("inputs_embeds")
        batch, tokens = ids.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        fresh = cache is None or cache.get_seq_length() == 0
        self.roles = self._roles(batch, tokens, ids.device, kwargs.get("attention_mask"), fresh)
        self.begin_forward(fresh)
        return None

    def _roles(self, batch, tokens, device, mask, fresh: bool) -> TokenRoles:
        positions = torch.arange(tokens, device=device)[None, :]
        if self._segments is not None and self._segments[0].numel() == batch:
            valid_lengths, prompt_lengths = self._segments
            valid = positions < valid_lengths.to(device)[:, None]
            prompt = None
            if prompt_lengths is not None:
                prompt = valid & (positions < prompt_lengths.to(device)[:, None])
            return TokenRoles(valid, prompt)
        valid = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= tokens:
            valid = mask[:, -tokens:].to(device=device, dtype=torch.bool)
        if not fresh:
            return TokenRoles(valid, None)
        prompt = valid if valid is not None else torch.ones(batch, tokens, device=device).bool()
        return TokenRoles(valid, prompt)

    def _site_fn(self, site: str, layer: int):
        dense_prompt = self.prefill == "dense"

        def fn(x: torch.Tensor) -> torch.Tensor:
            if not self._enabled:
                return x
            roles = self.roles if self.roles.matches(x) else TokenRoles()
            y = self.sparsify(site, layer, x)
            active = roles.active(dense_prompt)
            if active is not None:
                y = torch.where(active[..., None], y, x)
            self._count(site, layer, x, y, roles, active)
            return y

        return fn

    def _count(self, site, layer, x, y, roles: TokenRoles, active) -> None:
        zeroed = (y == 0) & (x != 0)
        dense = 0
        if active is not None:
            zeroed = zeroed[active]
            valid = roles.valid if roles.valid is not None else torch.ones_like(active)
            dense = (valid & ~active).sum() * x.shape[-1]
        key = (site, layer)
        acc = self._acc.get(key)
        if acc is None:
            acc = self._acc[key] = torch.zeros(3, dtype=torch.int64, device=x.device)
        acc[0] += zeroed.sum()
        acc[1] += zeroed.numel()
        acc[2] += dense
