"""A strategy attached to a model: hooks, token roles, pausing and the sparsity meter.

``with strategy.attach(model, calibration) as live:`` builds the strategy's state for this model
(:meth:`Strategy.prepare`), asks it once for the rule of every (site, layer) and installs one
hook per (site, layer) through :func:`moyu_exp.families.hooked`. Each hook applies the rule (or the
strategy's mask) to the positions that run sparse and counts into ``live.meter``; callers that
measure a phase (evaluation, bench, the lean decoder) swap in their own meter with
:meth:`Attachment.measuring` and get back what they measured. Leaving the block removes every
hook, so the model is restored bit-exactly, also after an exception.

Every forward pass has *token roles*: which positions are real tokens (not padding) and which
belong to the prompt. Roles come from the lm-eval bridge (:meth:`Attachment.segments`), else
from the attention mask and the KV cache: a forward on an empty cache is a prefill, all prompt;
a forward on a filled cache is a decode step. The strategy's protocol (``prefill``, see
:mod:`moyu_exp.strategies.protocol`) turns the roles into the positions that run sparse.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from moyu_exp.errors import ConfigError
from moyu_exp.families import adapter_for, hooked
from moyu_exp.lazy import lazy_import
from moyu_exp.masking import apply_mask, apply_rule
from moyu_exp.meter import SparsityMeter
from moyu_exp.strategies.protocol import Positions, TokenRoles

if TYPE_CHECKING:
    from moyu_exp.strategies.base import Strategy

torch = lazy_import("torch")


class RotationCache:
    """x R for the sites that read one tensor in one basis (q, k and v), computed once."""

    def __init__(self):
        self._last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        last = self._last.get(id(basis))
        if last is None or last[0] is not x:
            last = self._last[id(basis)] = (x, x @ basis.to(x.dtype))
        return last[1]


class Attachment:
    """The hooks of one strategy on one model (see the module docstring)."""

    def __init__(self, strategy: Strategy, model: torch.nn.Module, calibration: dict | None):
        self.strategy = strategy
        self.model = model
        self.adapter = adapter_for(model)
        routed = [s for s in strategy.sites if s in getattr(self.adapter, "routed_sites", ())]
        if routed and (strategy.compact_mlp or strategy.masks_from_elsewhere):
            raise ConfigError(
                f"strategy {strategy.name} selects neurons per layer, not from the rows an expert "
                f"receives, but {routed[0]} in "
                f"a {model.config.model_type} block belongs to routed experts, each with its "
                "own neurons: use a per-token rule (topk, cats, teal, random)"
            )
        self.layer_ids = strategy.layer_ids(model)
        self.cost = self.adapter.cost_model(
            model, list(strategy.sites), self.layer_ids, strategy.compact_mlp
        )
        self.meter = SparsityMeter(self.cost)
        self.roles = TokenRoles()
        self.state: Any = None
        self.rules: dict[tuple[str, int], Any] = {}
        self.taps: dict[tuple[str, int], Any] = {}  # the strategy's taps, for kernel mode
        self.calibration = calibration
        self._segments: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._forward: Positions | None = None
        self._enabled = True
        self._stack: ExitStack | None = None
        self._patches: list[tuple[Any, str, Any, Any]] = []  # object, name, new, original
        self.bases: dict[tuple[str, int], torch.Tensor] = {}
        self._rotated = RotationCache()

    # -------------------------------------------------------------------- the strategy
    @property
    def name(self) -> str:
        return self.strategy.name

    @property
    def sites(self) -> list[str]:
        return list(self.strategy.sites)

    @property
    def kernel_support(self) -> bool:
        return self.strategy.kernel_support

    def kernel_rule(self, site: str, layer: int):
        """The strategy's rule for (site, layer), asked once per attachment (None: a mask)."""
        return self.rules.get((site, layer))

    def kept(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Kernel mode's question for a single-token vector ``x`` (dim,): the bool mask of the
        entries the strategy keeps."""
        rule = self.kernel_rule(site, layer)
        if rule is not None:
            return rule.mask(x)
        row = x.view(1, 1, -1)
        keep = self.strategy.keep(self.state, site, layer, row, self._positions(TokenRoles(), row))
        if keep is None:
            return torch.ones_like(x, dtype=torch.bool)
        return keep.expand(row.shape).reshape(-1)

    def observe(self, site: str, layer: int, x: torch.Tensor) -> None:
        """Kernel mode's step hands the strategy's tap on ``site`` (a predictor's input) its
        single-token vector ``x`` (dim,), as the model's hook would in a forward."""
        tap = self.taps.get((site, layer))
        if tap is not None:
            tap(x.view(1, 1, -1))

    def decode_neurons(self, layer: int) -> torch.Tensor | None:
        return self.strategy.decode_neurons(self.state, layer)

    def lowrank(self, site: str, layer: int):
        return self.strategy.lowrank(self.state, site, layer)

    def scorer(self, layer: int):
        return self.strategy.scorer(self.state, layer)

    def basis(self, site: str, layer: int) -> torch.Tensor | None:
        """The rotation R the site's input is expressed in (x R) before the rule, or None."""
        return self.bases.get((site, layer))

    @property
    def patches_weights(self) -> bool:
        """The strategy replaced weights (a basis folded in): a dense reference must be built
        with the originals, under :meth:`paused`."""
        return any(isinstance(new, torch.Tensor) for _, _, new, _ in self._patches)

    def begin_decode_step(self) -> None:
        """A decode step run outside the model's forward (kernel mode): no prompt, no padding."""
        self.roles = TokenRoles()
        self.strategy.begin_forward(self.state, False)

    def end_decode_step(self, token: int, logits: torch.Tensor) -> None:
        """The kernel-mode step for ``token`` gave ``logits`` (vocab,)."""
        if self.strategy.watches_output and self._enabled:
            ids = torch.tensor([[token]], device=logits.device)
            self.strategy.end_forward(self.state, ids, logits.view(1, 1, -1), False)

    def decode_version(self) -> int:
        return self.strategy.decode_version(self.state)

    # ------------------------------------------------------------------------ contract
    def __enter__(self) -> Attachment:
        if self._stack is not None:
            raise RuntimeError(f"strategy '{self.name}' is already attached to a model")
        strategy, layers = self.strategy, self.layer_ids
        self.state = strategy.prepare(self.model, self.adapter, layers, self.calibration)
        extra = strategy.extra_weights(self.state)
        entries = strategy.entry_weights(self.state)
        if extra or entries:
            per_entry = self.cost.weights_per_entry | entries
            self.cost = replace(self.cost, extra_weights=extra, weights_per_entry=per_entry)
            self.meter = SparsityMeter(self.cost)
        self.rules = {
            (site, layer): rule
            for site in strategy.sites
            for layer in layers
            if (rule := strategy.kernel_rule(self.state, site, layer)) is not None
        }
        self.bases = {
            (site, layer): basis
            for site in strategy.sites
            for layer in layers
            if (basis := strategy.basis(self.state, site, layer)) is not None
        }
        # taps first: they observe a site's tensor before the strategy changes it
        fns = strategy.taps(self.state, self.model, self.adapter, layers)
        self.taps = dict(fns)
        fns += [((s, i), self._site_fn(s, i)) for s in strategy.sites for i in layers]
        stack = ExitStack()
        begin = self._begin if strategy.sites else None
        end = self._end if strategy.watches_output else None
        stack.enter_context(hooked(self.model, fns, begin, end))
        self._patches = [
            (obj, name, value, getattr(obj, name))
            for obj, name, value in strategy.patches(self.state, self.model, self.adapter, layers)
        ]
        stack.callback(self._patch, False)
        self._patch(True)
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        self.roles, self._forward = TokenRoles(), None
        if stack is not None:
            stack.close()

    @contextmanager
    def measuring(self, meter: SparsityMeter | None = None) -> Iterator[SparsityMeter]:
        """Count into ``meter`` (a fresh one by default) inside this block, then return to the
        previous meter: one meter per phase."""
        meter = meter if meter is not None else SparsityMeter(self.cost)
        previous, self.meter = self.meter, meter
        try:
            yield meter
        finally:
            self.meter = previous

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run the model dense inside this block (for a dense reference, with the original
        weights); nothing is counted."""
        previous, self._enabled = self._enabled, False
        self._patch(False)
        try:
            yield
        finally:
            self._enabled = previous
            self._patch(previous and self._stack is not None)

    def _patch(self, on: bool) -> None:
        """Put the strategy's patched attributes in (``on``) or the originals back."""
        for obj, name, value, original in self._patches:
            if on:
                setattr(obj, name, value)
            else:
                restore(obj, name, original)
        self._rotated = RotationCache()

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

    # ------------------------------------------------------------------------ internals
    def _begin(self, _module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = args[0] if args else kwargs.get("inputs_embeds")
        batch, tokens = ids.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        fresh = cache is None or cache.get_seq_length() == 0
        self.roles = self._roles(batch, tokens, ids.device, kwargs.get("attention_mask"), fresh)
        self._forward = None
        self._rotated = RotationCache()
        self.strategy.begin_forward(self.state, fresh)
        return None

    def _end(self, _module, args, kwargs, output):
        if not self._enabled:
            return None
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        logits = getattr(output, "logits", None)
        if ids is not None and logits is not None:
            self.strategy.end_forward(self.state, ids, logits, self.roles.fresh)
        return None

    def _roles(self, batch, tokens, device, mask, fresh: bool) -> TokenRoles:
        positions = torch.arange(tokens, device=device)[None, :]
        if self._segments is not None and self._segments[0].numel() == batch:
            valid_lengths, prompt_lengths = self._segments
            valid = positions < valid_lengths.to(device)[:, None]
            prompt = None
            if prompt_lengths is not None:
                prompt = valid & (positions < prompt_lengths.to(device)[:, None])
            return TokenRoles(valid, prompt, declared=True, fresh=fresh)
        valid = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= tokens:
            valid = mask[:, -tokens:].to(device=device, dtype=torch.bool)
        if not fresh:
            return TokenRoles(valid, None)
        prompt = valid if valid is not None else torch.ones(batch, tokens, device=device).bool()
        return TokenRoles(valid, prompt, fresh=True)

    def _positions(self, roles: TokenRoles, x: torch.Tensor) -> Positions:
        strategy = self.strategy
        return Positions(roles, strategy.prefill, strategy.prefill_fraction, x)

    @property
    def last_positions(self) -> Positions | None:
        """The positions of the last forward (which ran sparse), for the lm-eval bridge."""
        return self._forward

    def _current(self, x: torch.Tensor) -> Positions:
        """The positions of the forward ``x`` belongs to (computed once per forward)."""
        forward = self._forward
        if forward is None or forward.roles is not self.roles:
            forward = self._forward = self._positions(self.roles, x)
        if self.roles.matches(x):
            return forward
        return self._positions(TokenRoles(), x)

    def _site_fn(self, site: str, layer: int):
        key = (site, layer)

        def fn(x: torch.Tensor) -> torch.Tensor:
            if not self._enabled:
                return x
            forward = self._current(x)
            basis = self.bases.get(key)
            if basis is not None:
                x = self._rotated.get(x, basis)
            rule = self.rules.get(key)
            if rule is not None:
                y, dropped = apply_rule(x, rule, forward.active)
            else:
                keep = self.strategy.keep(self.state, site, layer, x, forward)
                y, dropped = (x, 0) if keep is None else apply_mask(x, keep, forward.active)
            self.meter.add(site, layer, dropped, forward.sparse, forward.dense)
            return y

        return fn


@contextmanager
def patched(patches: list[tuple[Any, str, Any]]) -> Iterator[None]:
    """Replace attributes (object, name, value) inside the block; the originals come back."""
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, original in originals:
            restore(obj, name, original)


def restore(obj: Any, name: str, original: Any) -> None:
    """Put ``original`` back as ``obj.name``; a method that an instance attribute shadowed
    (a patched ``forward``) is uncovered rather than stored on the instance."""
    method = getattr(original, "__func__", None)
    if method is not None and name in vars(obj) and getattr(type(obj), name, None) is method:
        delattr(obj, name)
    else:
        setattr(obj, name, original)
