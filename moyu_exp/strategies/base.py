"""The strategy contract, shared by every dynamic-activation method.

A strategy is a dataclass of its parameters (the config schema is derived from its fields) plus
pure decisions; it holds no per-run state:

- ``calibrate(model, batches, cached) -> dict`` returns its statistics (cached by the caller);
- ``prepare(model, adapter, layers, calibration) -> state`` derives what its decisions need on
  one model (thresholds, weight norms, fixed sets) into a fresh ``state`` namespace;
- ``kernel_rule(state, site, layer)`` states the kept set as data (:class:`KernelRule`) when it
  can, so simulated and kernel mode apply the same rule natively; otherwise
  ``keep(state, site, layer, x, where)`` returns the bool mask of kept entries;
- ``decode_neurons(state, layer)``: a decode-time MLP neuron set known in advance (sequence-level
  methods after their prompt, a static set), which kernel mode gathers into a compact MLP
  (again whenever ``decode_version(state)`` changes: a method that re-selects it);
- ``scorer(state, layer)``: a learned predictor's low-rank scorer of the MLP's neurons from the
  block input, which kernel mode runs natively before each MLP;
- ``end_forward(state, ids, logits, fresh)``: what a method that ``watches_output`` learns
  from each forward's next-token distribution (CLADA's surprisal and entropy).

``strategy.attach(model, calibration)`` returns an :class:`~moyu_exp.strategies.attachment.
Attachment`, the context manager that installs the hooks and owns token roles, pausing and the
sparsity meter; leaving it restores the model bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

from moyu_exp.config import SPARSITY, Range, check_choice, check_fields
from moyu_exp.errors import ConfigError
from moyu_exp.families import adapter_for
from moyu_exp.lazy import lazy_import
from moyu_exp.masking import KernelRule, topk_mask
from moyu_exp.registry import registrar
from moyu_exp.sites import SPARSE_SITES, check_sites, parse_layers, resolve_layers
from moyu_exp.strategies.protocol import PROTOCOLS, SELECTING

if TYPE_CHECKING:
    from moyu_exp.strategies.attachment import Attachment
    from moyu_exp.strategies.protocol import Positions

torch = lazy_import("torch")

STRATEGIES: dict[str, type[Strategy]] = {}
register = registrar(STRATEGIES, "strategy")  # class decorator: ``strategy=<name>``

__all__ = ["STRATEGIES", "KernelRule", "Strategy", "keep_count", "register", "topk_mask"]


def keep_count(sparsity: float, dim: int) -> int:
    """Entries kept per token at a target sparsity: k = round((1 - s) * d)."""
    return round((1.0 - sparsity) * dim)


@dataclass(eq=False)
class Strategy:
    """Base class. Subclasses set ``name``/``sites`` defaults and their decisions."""

    name: str = "base"
    sparsity: float = 0.0
    layers: Any = "all"  # "all", a list of layer indices, or a slice string such as "1:-1"
    sites: list[str] = field(default_factory=list)
    prefill: str = "sparse"  # the evaluation protocol: which positions run sparse (protocol.py)
    prefill_fraction: float = 0.5  # the sparse share of a forward under prefill=last_fraction

    allowed_sites: ClassVar[tuple[str, ...]] = SPARSE_SITES
    needs_calibration: ClassVar[bool] = False
    calibration_version: ClassVar[int] = 1  # bump when a method's statistic changes
    # what its calibration costs, in forward passes over the calibration tokens (measured on
    # SmolLM2; slower steps that estimate themselves, such as TEAL's search, are not in it)
    calibration_passes: ClassVar[float] = 1.0
    cheaper_calibration: ClassVar[str] = "fewer calibration.tokens"  # the option that avoids it
    sequence_level: ClassVar[bool] = False
    compact_mlp: ClassVar[bool] = False  # decode-time neuron set known before each step
    # its masks come from tensors other than the site's own rows (a predictor reading the block
    # input): they cannot follow a token into the routed experts of a mixture-of-experts block
    masks_from_elsewhere: ClassVar[bool] = False
    kernel_support: ClassVar[bool] = True  # bench.mode=kernel can run it (see moyu_exp.kernels)
    watches_output: ClassVar[bool] = False  # end_forward sees every forward's logits
    # numeric fields' accepted values (other integer fields: >= 1, a seed >= 0)
    RANGES: ClassVar[dict[str, Range]] = {
        "sparsity": SPARSITY,
        "prefill_fraction": Range(0, 1, low_open=True),
    }

    def __post_init__(self) -> None:
        check_sites(list(self.sites), self.allowed_sites, self.name)
        parse_layers(self.layers)  # its syntax now; its range once the model is known
        check_fields(self, "strategy.", self.RANGES)
        check_choice("strategy.prefill", self.prefill, PROTOCOLS)
        if self.sequence_level and self.prefill not in SELECTING:
            raise ConfigError(
                f"strategy '{self.name}' selects from positions that run dense: strategy.prefill "
                f"must be one of {', '.join(SELECTING)}"
            )

    @classmethod
    def key_sparsity(cls, sparsity: float) -> float | str:
        """The sparsity as far as results go, for sweep-point keys (dense ignores it)."""
        return sparsity

    def layer_ids(self, model: torch.nn.Module) -> list[int]:
        """The decoder layers this strategy touches in ``model``."""
        return resolve_layers(self.layers, len(adapter_for(model).layers(model)))

    # --------------------------------------------------------------------- calibration
    def calibration_key(self) -> dict[str, Any]:
        """What, besides model and calibration text, determines :meth:`calibrate`'s output."""
        return {
            "name": self.name,
            "version": self.calibration_version,
            "sites": list(self.sites),
            "layers": self.layers,
        }

    def calibration_estimate(self, model: torch.nn.Module, batches: list, cached) -> float:
        """Seconds :meth:`calibrate` should take on this machine (forward passes over the
        calibration tokens, timed on a slice of them), for the line said before it starts."""
        from moyu_exp.activations import forward_seconds

        if not self.calibration_passes:
            return 0.0
        return self.calibration_passes * forward_seconds(model, batches)

    def serves(self, calibration: dict) -> bool:
        """Whether a stored calibration state serves this configuration (a greedy path that
        an earlier run searched only as far as its own sparsity needed may not)."""
        return True

    def calibration_tokens(self, requested: int) -> int:
        """How many calibration tokens to gather (``calibration.tokens``, or more if the method
        needs them, e.g. to train a predictor)."""
        return requested

    def calibrate(self, model: torch.nn.Module, batches: list[torch.Tensor], cached) -> dict:
        """Statistics from calibration token batches, as plain tensors (cached by the caller).

        ``cached(label, params, compute, owner=None)`` memoises a costly part that the rest of
        the key (e.g. the sparsity) does not change, under the same model and calibration text;
        ``owner`` (another strategy's name) shares that strategy's part (TEAL's greedy path).
        """
        raise NotImplementedError(f"strategy '{self.name}' has no calibration")

    # ----------------------------------------------------------------------- decisions
    def prepare(
        self, model: torch.nn.Module, adapter: Any, layers: list[int], calibration: dict | None
    ) -> SimpleNamespace:
        """What the decisions need on ``model`` (thresholds, norms, fixed sets): a fresh state
        per attachment. Sequence-level methods also keep their current selection in it."""
        return SimpleNamespace()

    def kernel_rule(self, state: SimpleNamespace, site: str, layer: int) -> KernelRule | None:
        """The kept set of a site as a :class:`KernelRule`, or None when the method cannot
        state it so (then :meth:`keep` decides, on every call)."""
        return None

    def keep(
        self, state: SimpleNamespace, site: str, layer: int, x: torch.Tensor, where: Positions
    ) -> torch.Tensor | None:
        """Bool mask (broadcastable to ``x``, (batch, tokens, dim)) of the entries kept; None
        keeps every entry. Only asked when :meth:`kernel_rule` gives no rule; ``where`` says
        which positions run sparse and which a sequence-level method selects from."""
        raise NotImplementedError(f"strategy '{self.name}' states no rule and no mask")

    def select(
        self,
        x: torch.Tensor,
        prompt: torch.Tensor | None = None,
        state: SimpleNamespace | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """The method's own selection on a tensor, for probes: bool, the shape of ``x``
        (batch, tokens, dim) for per-token rules, (batch, dim) for sequence-level methods,
        which select from the ``prompt`` positions (bool (batch, tokens)); ``state`` is what
        :meth:`prepare` gave where the rule needs it."""
        raise NotImplementedError(f"strategy '{self.name}' has no selection a probe can call")

    def shipped_part(self) -> tuple[str, dict[str, Any]] | None:
        """(owner, parameters) of the calibration parts shipped with the package for the
        built-in models (:mod:`moyu_exp.shipped`), or None: nothing of it is shipped."""
        return None

    def decode_neurons(self, state: SimpleNamespace, layer: int) -> torch.Tensor | None:
        """For methods whose decode-time MLP neuron set is known in advance (sequence-level
        methods after the prompt, a static set): bool (d_ff,) of kept neurons; else None."""
        return None

    def taps(
        self, state: SimpleNamespace, model: torch.nn.Module, adapter: Any, layers: list[int]
    ) -> list[tuple[tuple[str, int], Any]]:
        """Functions on sites that the decisions read from (a predictor's input, a site's
        input before it is sparsified), hooked before the sites' own; they observe and return
        their tensor unchanged."""
        return []

    def patches(
        self, state: SimpleNamespace, model: torch.nn.Module, adapter: Any, layers: list[int]
    ) -> list[tuple[Any, str, Any]]:
        """Attributes to replace while attached, as (object, name, value): e.g. weights with a
        rotation folded in (WINA's transform). The originals come back on exit and while the
        attachment is paused, so the model is restored bit-exactly."""
        return []

    def basis(self, state: SimpleNamespace, site: str, layer: int) -> torch.Tensor | None:
        """A rotation R (dim, dim) the site's input is expressed in before the rule applies
        (x -> x R, then masked): its readers' weights are patched to match. None: as is."""
        return None

    def lowrank(self, state: SimpleNamespace, site: str, layer: int):
        """Low-rank factors (V (dim, r), U (out, r)) through which the entries a site drops
        still reach its readers (the stacked outputs gain ((x - kept) V) U^T), or None."""
        return None

    def extra_weights(self, state: SimpleNamespace) -> dict[tuple[str, int], int]:
        """Weights read per sparse position besides the kept entries' (low-rank factors)."""
        return {}

    def scorer(self, state: SimpleNamespace, layer: int) -> tuple[Any, Any, int] | None:
        """A low-rank scorer of the MLP's neurons from the block input h (a learned predictor):
        (W1 (r, d), W2 (d_ff, r), k), each token keeping the k largest of W2 (W1 h), which
        kernel mode's native step computes itself; None when the strategy has none."""
        return None

    def entry_weights(self, state: SimpleNamespace) -> dict[tuple[str, int], int]:
        """Weights one dropped entry skips where the site adapter's count does not hold (an
        input entry of a compact MLP skips only its kept rows' column)."""
        return {}

    def begin_forward(self, state: SimpleNamespace, fresh: bool) -> None:
        """Called before every model forward (``fresh``: the KV cache was empty)."""

    def end_forward(
        self, state: SimpleNamespace, ids: torch.Tensor, logits: torch.Tensor, fresh: bool
    ) -> None:
        """Called after every forward when ``watches_output``: the forward's token ids (batch,
        tokens) and next-token logits (batch, tokens, vocab), e.g. for a surprise signal."""

    def decode_version(self, state: SimpleNamespace) -> int:
        """Changes whenever :meth:`decode_neurons` would answer differently during decoding
        (a method that re-selects its set), so kernel mode gathers its compact MLP again."""
        return 0

    # ------------------------------------------------------------------------ contract
    def attach(self, model: torch.nn.Module, calibration: dict | None = None) -> Attachment:
        """The hooks of this strategy on ``model``, as a context manager (see Attachment)."""
        from moyu_exp.strategies.attachment import Attachment

        if self.needs_calibration and calibration is None:
            raise RuntimeError(f"strategy '{self.name}' must be calibrated before attaching")
        return Attachment(self, model, calibration)


def topk_rule(sparsity: float, dim: int, scale: torch.Tensor | None = None) -> KernelRule:
    """Keep the k = round((1 - s) * dim) best scores |x| (times ``scale``)."""
    return KernelRule(k=keep_count(sparsity, dim), scale=scale)
