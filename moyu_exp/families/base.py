"""The Adapter: everything the rest of moyu_exp may know about a model family's blocks.

An adapter is the only code that knows module names, configuration fields and cache layouts. It
says where each site lives and how to hook it (:data:`moyu_exp.sites.SITES`), which linears read
it and how many weights a dropped entry skips (the cost model), how to run a block in halves and
in parts (calibration searches), and what the lean decoder of kernel mode reads
(:class:`DecoderSpec`), or why it cannot run the family. Methods raise a one-line ConfigError
where the family lacks what is asked (a fused projection has no per-projection site).

A new family is one module that subclasses an adapter (or :class:`Adapter` itself) and
registers an instance with :func:`moyu_exp.families.register`; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moyu_exp.errors import ConfigError
from moyu_exp.lazy import lazy_import
from moyu_exp.meter import CostModel
from moyu_exp.sites import SiteFn

torch = lazy_import("torch")


@dataclass(frozen=True)
class BlockParts:
    """What a lean decode step reads of one block (kernel mode, :mod:`moyu_exp.kernels`):
    weights, and the gains the block's norms apply (Gemma's 1 + w already added)."""

    norms: tuple[Any, Any]  # gains before the attention and before the MLP
    post_norms: tuple[Any, Any]  # gains after each branch (Gemma 2/3's sandwich), else None
    qkv: list[Any]  # the linears reading the attention input (q, k, v, or one fused)
    o: Any
    gate: Any  # (d_ff, d) weights
    up: Any
    down: Any
    qk_norms: tuple[Any, Any] | None  # per-head gains of q and k before RoPE (Qwen3, Gemma 3)
    window: int | None  # sliding-window attention: the keys a query sees, itself included
    rope: str | None  # which RoPE table (Gemma 3: local and global layers differ)
    scale: float  # the attention's score scale


@dataclass(frozen=True)
class DecoderSpec:
    """A model as the lean decoder runs it: its sizes, each block's parts, the embedding, the
    final norm's gain, the LM head, the activation and the RoPE tables."""

    d: int
    d_ff: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    vocab: int
    activation: str  # "silu" or "gelu_tanh"
    blocks: list[BlockParts]
    embedding: Any  # (vocab, d)
    embedding_scale: Any  # multiplies an embedding row (Gemma: sqrt(d)), or None
    final_norm: Any  # the final norm's gain
    head: Any  # (vocab, d)
    rope: Callable[[Any], dict]  # positions -> {table: (cos, sin)} of (positions, head_dim)


class Adapter:
    """The declared interface of a family adapter, with what every family shares."""

    model_types: tuple[str, ...] = ()
    routed_sites: tuple[str, ...] = ()  # sites inside routed experts (a per-token rule only)
    decodes: bool = False  # kernel mode runs it (then :meth:`decoder_spec` describes it)

    # ------------------------------------------------------------------ where things are
    def layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The decoder blocks."""
        raise NotImplementedError

    def backbone(self, model: torch.nn.Module) -> torch.nn.Module:
        """The decoder stack without the LM head (for calibration passes)."""
        raise NotImplementedError

    def dim(self, model: torch.nn.Module, site: str) -> int:
        """The width of a site's tensor."""
        raise NotImplementedError

    def readers(self, layer: torch.nn.Module, site: str) -> list[torch.nn.Linear]:
        """The linear layers whose input (or, for gate_act, whose rows) this site gates."""
        raise NotImplementedError

    def attention(self, layer: torch.nn.Module) -> torch.nn.Module:
        """The block's attention module."""
        raise NotImplementedError

    def eager_attention(self, layer: torch.nn.Module) -> bool:
        """Whether the attention runs transformers' eager implementation (it materialises
        every score; logit soft-capping needs it), not a fused kernel."""
        return self.attention(layer).config._attn_implementation == "eager"

    def hook(self, layer: torch.nn.Module, site: str, fn: SiteFn) -> Any:
        """Route the site's tensor through ``fn``; remove the returned handle to restore."""
        raise NotImplementedError

    def linears(self, layer: torch.nn.Module) -> list[torch.nn.Linear]:
        """Every linear layer of a decoder block (what a decode step reads)."""
        raise NotImplementedError

    def mlp_linears(self, layer: torch.nn.Module) -> list[torch.nn.Linear]:
        raise NotImplementedError

    # ----------------------------------------------------------------------- norms, MLP
    def pre_norm(self, layer: torch.nn.Module, part: str) -> torch.nn.Module:
        """The norm whose output the attention ("attn") or the MLP ("mlp") reads."""
        raise NotImplementedError

    def post_norm(self, layer: torch.nn.Module, part: str) -> torch.nn.Module | None:
        """The norm applied to a branch's output before the residual (None: none)."""
        return None

    def norm_gain(self, norm: torch.nn.Module) -> torch.Tensor:
        """The elementwise gain a norm applies."""
        raise NotImplementedError

    def unit_norm_weight(self, norm: torch.nn.Module) -> torch.Tensor:
        """The weight that makes the norm's gain 1 (what folding the gain away leaves)."""
        raise NotImplementedError

    def mlp_up(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """up_proj(x) of a block's MLP, for a given MLP input ``x``."""
        raise NotImplementedError

    def gate_up_weights(self, layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up projections' weights (d_ff, d) of a block's MLP."""
        raise NotImplementedError

    # ---------------------------------------------------------------------- the cost
    def weights_per_entry(
        self,
        layer: torch.nn.Module,
        site: str,
        sites: tuple[str, ...] = (),
        compact: bool = False,
    ) -> int:
        """Weight elements a kernel skips for one dropped entry of ``site``, given every site
        the strategy sparsifies (``sites``) and whether its MLP neuron set is known before a
        decode step (``compact``)."""
        raise NotImplementedError

    def cost_model(
        self,
        model: torch.nn.Module,
        sites: list[str] = (),  # type: ignore[assignment]
        layers: list[int] = (),  # type: ignore[assignment]
        compact: bool = False,
    ) -> CostModel:
        """The weights one decode step reads and what a dropped entry of each (site, layer)
        saves (see :mod:`moyu_exp.meter`)."""
        blocks = self.layers(model)
        head = model.get_output_embeddings().weight
        return CostModel(
            element_bytes=head.element_size(),
            block_weights=sum(lin.weight.numel() for b in blocks for lin in self.linears(b)),
            head_weights=head.numel(),
            embedding_row=model.get_input_embeddings().weight.shape[1],
            dims={(s, i): self.dim(model, s) for s in sites for i in layers},
            weights_per_entry={
                (s, i): self.weights_per_entry(blocks[i], s, tuple(sites), compact)
                for s in sites
                for i in layers
            },
        )

    # ------------------------------------------------ a block in halves and in parts
    def attention_residual(self, layer: torch.nn.Module, x: torch.Tensor, kwargs: dict):
        """The first half of a block: ``x`` plus its attention branch (``kwargs``: what the
        block itself was called with, e.g. captured by a pre-hook)."""
        raise NotImplementedError

    def mlp_residual(
        self, layer: torch.nn.Module, h: torch.Tensor, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The second half of a block: ``h`` plus its MLP branch (position-wise); ``x``, the
        block's input at the same positions, is what a parallel block's MLP reads."""
        raise NotImplementedError

    def runs_attention_spans(self, layer: torch.nn.Module) -> bool:
        """Whether :meth:`attention_span` can run this block's attention over a span of
        positions (then a search evaluates the block in parts)."""
        return False

    def attention_span(
        self,
        layer: torch.nn.Module,
        normed: torch.Tensor,
        kwargs: dict,
        low: int,
        high: int,
        cache: Any,
    ) -> None:
        """Run the attention of ``layer`` on positions [low, high) of its normalised input
        ``normed`` (kwargs: what the block was called with for the whole sequence), reading the
        keys and values of earlier positions from ``cache`` and appending its own."""
        raise NotImplementedError

    def branch_residual(
        self, layer: torch.nn.Module, part: str, x: torch.Tensor, output: torch.Tensor
    ) -> torch.Tensor:
        """``x`` plus a branch's ``output`` ("attn" or "mlp"), through the norm the block puts
        after that branch, if any."""
        post = self.post_norm(layer, part)
        return x + (output if post is None else post(output))

    def runs_mlp_parts(self, layer: torch.nn.Module) -> bool:
        """Whether the MLP is act(gate(x)) * up(x) -> down, as :meth:`gate_up_linears` and
        :meth:`mlp_activation` describe it."""
        return False

    def gate_up_linears(self, layer: torch.nn.Module) -> tuple[Any, Any]:
        """The gate and up projections (the fused one and None where they are one linear)."""
        raise NotImplementedError

    def mlp_activation(self, layer: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    # ------------------------------------------------------------------- kernel mode
    def decoder_spec(self, model: torch.nn.Module) -> DecoderSpec:
        """What the lean decoder reads of ``model`` (only where :attr:`decodes`); a one-line
        ConfigError where a model of the family lacks what it runs (soft-capping, say)."""
        raise ConfigError(f"bench.mode=kernel does not run '{model.config.model_type}' blocks")

    def prefill_cache(self, cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (keys, values) of a prefill's KV cache, (batch, kv_heads, held
        positions, head_dim): a sliding-window layer may hold only its last positions."""
        return [(layer.keys, layer.values) for layer in cache.layers]


# ------------------------------------------------------------------------ hook helpers
class Handles:
    """Several hook handles removed as one."""

    def __init__(self, handles: list) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def unflattened(fn: SiteFn):
    """``fn`` seeing a (tokens, dim) tensor as (batch, tokens, dim), with the pre-hook that
    records the block input's shape."""
    shape: list = [None]

    def record(_module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        shape[0] = x.shape[:-1]

    def wrapped(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or shape[0] is None:
            return fn(x)
        return fn(x.view(*shape[0], x.shape[-1])).reshape(x.shape)

    return wrapped, record


def hidden_states_hook(fn: SiteFn):
    """A pre-hook (with kwargs) routing ``hidden_states`` (a keyword or the first argument)."""

    def hook(_module, args, kwargs):
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = fn(kwargs["hidden_states"])
            return args, kwargs
        return (fn(args[0]), *args[1:]), kwargs

    return hook


def first_arg_hook(fn: SiteFn):
    return lambda _m, args: (fn(args[0]), *args[1:])
