"""Where activations live inside a decoder block, and how to hook them.

This is the only module that knows module names. A site is a tensor of shape (batch, tokens, dim)
flowing through every decoder layer; a strategy rewrites it through a hook. Supporting another
architecture family means adding one adapter here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from operator import attrgetter
from typing import Any

from moyu_exp.errors import ConfigError
from moyu_exp.lazy import lazy_import
from moyu_exp.meter import CostModel

torch = lazy_import("torch")

SiteFn = Callable[["torch.Tensor"], "torch.Tensor"]

SITES: dict[str, str] = {
    "mlp_input": "input of gate_proj and up_proj (after post_attention_layernorm)",
    "gate_act": "act(gate_proj(x)), before the product with up_proj(x)",
    "mlp_intermediate": "act(gate_proj(x)) * up_proj(x), the input of down_proj",
    "attn_input": "input of q_proj, k_proj and v_proj (after input_layernorm)",
    "o_proj_input": "input of o_proj (the attention heads' output)",
    # one linear's own input, for methods that mask a shared input per projection
    "q_input": "input of q_proj alone",
    "k_input": "input of k_proj alone",
    "v_input": "input of v_proj alone",
    "gate_input": "input of gate_proj alone",
    "up_input": "input of up_proj alone",
    # observed only (no strategy sparsifies it): what a look-ahead predictor reads
    "block_input": "the decoder block's input hidden state, before the attention",
}
# Sites a strategy may sparsify (block_input is observed only).
SPARSE_SITES = tuple(site for site in SITES if site != "block_input")
# Sites inside the attention half of a block (the rest are in the MLP half).
ATTENTION_SITES = ("attn_input", "o_proj_input", "q_input", "k_input", "v_input")
# Per-projection sites and the linear each one feeds.
PROJECTION_SITES = {
    "q_input": ("self_attn", "q_proj"),
    "k_input": ("self_attn", "k_proj"),
    "v_input": ("self_attn", "v_proj"),
    "gate_input": ("mlp", "gate_proj"),
    "up_input": ("mlp", "up_proj"),
}


def check_sites(sites: list[str], allowed: tuple[str, ...] | None = None, owner: str = "") -> None:
    """Raise a one-line ConfigError for a site name that is unknown or not allowed."""
    accepted = allowed or tuple(SITES)
    for site in sites:
        if site not in SITES:
            raise ConfigError(f"unknown site '{site}': accepted sites are {', '.join(accepted)}")
        if site not in accepted:
            raise ConfigError(
                f"site '{site}' does not apply to strategy {owner}: "
                f"accepted sites are {', '.join(accepted)}"
            )


@dataclass(frozen=True)
class BlockParts:
    """What a lean decode step reads of one block (kernel mode, :mod:`moyu_exp.kernels`)."""

    norms: tuple[Any, Any]  # before the attention, before the MLP
    post_norms: tuple[Any, Any]  # after each branch (Gemma 2/3's sandwich), else None
    qkv: list[Any]  # the linears reading the attention input (q, k, v, or one fused)
    o: Any
    gate: Any  # (d_ff, d) weights
    up: Any
    down: Any
    qk_norms: tuple[Any, Any] | None  # per-head norms of q and k before RoPE (Qwen3, Gemma 3)
    window: int | None  # sliding-window attention: the keys a query sees, itself included
    rope: str | None  # which RoPE table (Gemma 3: local and global layers differ)
    scale: float  # the attention's score scale


@dataclass(frozen=True)
class GatedMLPAdapter:
    """LLaMA-style blocks: ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj, act_fn``."""

    model_types: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma")

    def layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return model.model.layers

    def backbone(self, model: torch.nn.Module) -> torch.nn.Module:
        """The decoder stack without the LM head (for calibration passes)."""
        return model.model

    def dim(self, model: torch.nn.Module, site: str) -> int:
        cfg = model.config
        if site in ("gate_act", "mlp_intermediate"):
            return cfg.intermediate_size
        if site == "o_proj_input":
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            return cfg.num_attention_heads * head_dim
        return cfg.hidden_size

    def readers(self, layer: torch.nn.Module, site: str) -> list[torch.nn.Linear]:
        """The linear layers whose input (or, for gate_act, whose rows) this site gates."""
        attn = layer.self_attn
        if site in PROJECTION_SITES:
            return [self._projection(layer, site)]
        if site == "block_input":
            return []
        if site == "attn_input":
            return [attn.q_proj, attn.k_proj, attn.v_proj]
        if site == "o_proj_input":
            return [attn.o_proj]
        mlp = layer.mlp  # only the MLP sites read it (a routed-experts block has no gate_proj)
        return {
            "mlp_input": [mlp.gate_proj, mlp.up_proj],
            "gate_act": [mlp.up_proj, mlp.down_proj],
            "mlp_intermediate": [mlp.down_proj],
        }[site]

    def attention_residual(self, layer: torch.nn.Module, x: torch.Tensor, kwargs: dict):
        """The first half of a block: ``x`` plus its attention branch (``kwargs``: what the
        block itself was called with, e.g. captured by a pre-hook)."""
        out = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)
        return x + (out[0] if isinstance(out, tuple) else out)

    def mlp_residual(
        self, layer: torch.nn.Module, h: torch.Tensor, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The second half of a block: ``h`` plus its MLP branch (position-wise); ``x``, the
        block's input at the same positions, is what a parallel block's MLP reads."""
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def pre_norm(self, layer: torch.nn.Module, part: str) -> torch.nn.Module:
        """The norm whose output the attention ("attn") or the MLP ("mlp") reads."""
        return layer.input_layernorm if part == "attn" else layer.post_attention_layernorm

    # ------------------------------------------------- a block in parts (TEAL's search)
    def runs_attention_spans(self, layer: torch.nn.Module) -> bool:
        """Whether :meth:`attention_span` can run this block's attention over a span of
        positions (the attention takes transformers' ``cache`` and a mask it is handed)."""
        return layer.self_attn.config._attn_implementation in ("sdpa", "eager")

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
        span = {k: v for k, v in kwargs.items() if k not in ("use_cache", "past_key_values")}
        cos, sin = kwargs["position_embeddings"]
        span["position_embeddings"] = (cos[:, low:high], sin[:, low:high])
        mask = kwargs.get("attention_mask")
        if mask is None:  # a plain causal sequence (sdpa): position low + i sees keys <= it
            mask = torch.ones(high - low, high, dtype=torch.bool, device=normed.device)
            span["attention_mask"] = mask.tril(diagonal=low)[None, None]
        else:
            span["attention_mask"] = mask[..., low:high, :high]
        for name in ("position_ids", "cache_position"):
            if span.get(name) is not None:
                span[name] = span[name][..., low:high]
        span["cache"] = cache
        layer.self_attn(hidden_states=normed[:, low:high].contiguous(), **span)

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
        return True

    def gate_up_linears(self, layer: torch.nn.Module) -> tuple[Any, Any]:
        """The gate and up projections (the fused one and None where they are one linear)."""
        return layer.mlp.gate_proj, layer.mlp.up_proj

    def mlp_activation(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.mlp.act_fn

    @staticmethod
    def norm_gain(norm: torch.nn.Module) -> torch.Tensor:
        """The elementwise gain a norm applies: its weight, or 1 + weight for Gemma's norms."""
        return norm.weight + _gain_offset(norm)

    @staticmethod
    def unit_norm_weight(norm: torch.nn.Module) -> torch.Tensor:
        """The weight that makes the norm's gain 1 (what folding the gain away leaves)."""
        return torch.full_like(norm.weight, 1.0 - _gain_offset(norm))

    def mlp_up(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """up_proj(x) of a block's MLP, for a given MLP input ``x``."""
        return layer.mlp.up_proj(x)

    def gate_up_weights(self, layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up projections' weights (d_ff, d) of a block's MLP."""
        return layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight

    def weights_per_entry(
        self,
        layer: torch.nn.Module,
        site: str,
        sites: tuple[str, ...] = (),
        compact: bool = False,
    ) -> int:
        """Weight elements a kernel skips for one dropped entry of ``site``, given every site
        the strategy sparsifies (``sites``) and whether its MLP neuron set is known before a
        decode step (``compact``: a dropped neuron skips a gate row, an up row and a down
        column)."""
        if site in ("mlp_intermediate", "gate_act", "mlp_input"):
            d_ff, d = self.gate_up_weights(layer)[0].shape
            if site == "mlp_intermediate" and compact:  # a gate row, an up row, a down column
                return 3 * d
            if site == "gate_act":  # a zero in act(gate) skips a row of up and a column of down
                return 2 * d
            if site == "mlp_input" and "gate_act" in sites:  # up is then read by rows: gate only
                return d_ff
        return sum(linear.out_features for linear in self.readers(layer, site))

    # ------------------------------------------------------------ what kernel mode reads
    def post_norm(self, layer: torch.nn.Module, part: str) -> torch.nn.Module | None:
        """The norm applied to a branch's output before the residual (None: none)."""
        return None

    def decode_parts(self, model: torch.nn.Module, layer: torch.nn.Module) -> BlockParts:
        """The modules and weights a lean decode step of ``layer`` reads."""
        attn = layer.self_attn
        gate, up = self.gate_up_weights(layer)
        window = getattr(attn, "sliding_window", getattr(model.config, "sliding_window", None))
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return BlockParts(
            norms=(self.pre_norm(layer, "attn"), self.pre_norm(layer, "mlp")),
            post_norms=(self.post_norm(layer, "attn"), self.post_norm(layer, "mlp")),
            qkv=self.readers(layer, "attn_input"),
            o=attn.o_proj,
            gate=gate,
            up=up,
            down=self.readers(layer, "mlp_intermediate")[0],
            qk_norms=(q_norm, k_norm) if q_norm is not None else None,
            window=window,
            rope=getattr(attn, "layer_type", None) if self._rope_per_layer_type(model) else None,
            scale=float(attn.scaling),
        )

    @staticmethod
    def _rope_per_layer_type(model: torch.nn.Module) -> bool:
        return "layer_type" in inspect.signature(model.model.rotary_emb.forward).parameters

    def rope_tables(self, model: torch.nn.Module, positions: torch.Tensor) -> dict:
        """{table: (cos, sin)} of shape (positions, head_dim), one per RoPE variant."""
        rotary = model.model.rotary_emb
        probe = torch.zeros(1, 1, model.config.hidden_size, dtype=next(model.parameters()).dtype)
        probe = probe.to(positions.device)
        if not self._rope_per_layer_type(model):
            cos, sin = rotary(probe, positions[None])
            return {None: (cos[0], sin[0])}
        out = {}
        for kind in sorted(set(model.config.layer_types)):
            cos, sin = rotary(probe, positions[None], kind)
            out[kind] = (cos[0], sin[0])
        return out

    def activation(self, model: torch.nn.Module) -> str:
        """The gated MLP's activation as kernel mode names it: ``silu`` or ``gelu_tanh``."""
        config = model.config
        name = getattr(config, "hidden_activation", None) or config.hidden_act
        known = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
        if name not in known:
            raise ConfigError(
                f"bench.mode=kernel runs SiLU and GELU-tanh gated MLPs, not '{name}': "
                "use bench.mode=simulated"
            )
        return known[name]

    def embedding_scale(self, model: torch.nn.Module) -> torch.Tensor | None:
        """The factor the embedding module multiplies its rows by (Gemma: sqrt(d)), or None."""
        return getattr(model.get_input_embeddings(), "embed_scale", None)

    def final_norm(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.model.norm

    def linears(self, layer: torch.nn.Module) -> list[torch.nn.Linear]:
        """Every linear layer of a decoder block (what a decode step reads)."""
        attn = layer.self_attn
        return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, *self.mlp_linears(layer)]

    def mlp_linears(self, layer: torch.nn.Module) -> list[torch.nn.Linear]:
        mlp = layer.mlp
        return [mlp.gate_proj, mlp.up_proj, mlp.down_proj]

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

    @staticmethod
    def _projection(layer: torch.nn.Module, site: str) -> torch.nn.Linear:
        part, name = PROJECTION_SITES[site]
        return getattr(getattr(layer, part), name)

    def hook(self, layer: torch.nn.Module, site: str, fn: SiteFn) -> Any:
        """Route the site's tensor through ``fn``; remove the returned handle to restore."""
        attn, mlp = layer.self_attn, layer.mlp
        if site in PROJECTION_SITES:
            return self._projection(layer, site).register_forward_pre_hook(_first_arg(fn))
        if site == "block_input":
            return layer.register_forward_pre_hook(_hidden_states(fn), with_kwargs=True)
        if site == "mlp_input":
            return mlp.register_forward_pre_hook(_first_arg(fn))
        if site == "gate_act":
            return mlp.act_fn.register_forward_hook(lambda _m, _a, out: fn(out))
        if site == "mlp_intermediate":
            return mlp.down_proj.register_forward_pre_hook(_first_arg(fn))
        if site == "o_proj_input":
            return attn.o_proj.register_forward_pre_hook(_first_arg(fn))
        if site == "attn_input":
            return attn.register_forward_pre_hook(_hidden_states(fn), with_kwargs=True)
        raise ConfigError(f"unknown site '{site}': accepted sites are {', '.join(SITES)}")


@dataclass(frozen=True)
class FusedProjectionAdapter(GatedMLPAdapter):
    """Phi-3 blocks: one fused ``self_attn.qkv_proj`` and one fused ``mlp.gate_up_proj``
    (gate rows first), ``mlp.activation_fn``. The shared inputs are sites as in LLaMA; a single
    projection's own input (q, k, v, gate or up alone) does not exist, so those sites are
    refused in one line."""

    model_types: tuple[str, ...] = ("phi3",)

    def readers(self, layer: torch.nn.Module, site: str) -> list[torch.nn.Linear]:
        attn, mlp = layer.self_attn, layer.mlp
        if site in PROJECTION_SITES:
            raise self._fused(site)
        if site == "block_input":
            return []
        return {
            "mlp_input": [mlp.gate_up_proj],
            "gate_act": [mlp.gate_up_proj, mlp.down_proj],
            "mlp_intermediate": [mlp.down_proj],
            "attn_input": [attn.qkv_proj],
            "o_proj_input": [attn.o_proj],
        }[site]

    def mlp_up(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer.mlp.gate_up_proj(x).chunk(2, dim=-1)[1]

    def gate_up_weights(self, layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = layer.mlp.gate_up_proj.weight.chunk(2, dim=0)
        return gate, up

    def gate_up_linears(self, layer: torch.nn.Module) -> tuple[Any, Any]:
        return layer.mlp.gate_up_proj, None

    def mlp_activation(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.mlp.activation_fn

    def linears(self, layer: torch.nn.Module) -> list[torch.nn.Linear]:
        attn, mlp = layer.self_attn, layer.mlp
        return [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]

    def mlp_linears(self, layer: torch.nn.Module) -> list[torch.nn.Linear]:
        return [layer.mlp.gate_up_proj, layer.mlp.down_proj]

    def hook(self, layer: torch.nn.Module, site: str, fn: SiteFn) -> Any:
        if site == "gate_act":
            return layer.mlp.activation_fn.register_forward_hook(lambda _m, _a, out: fn(out))
        if site in PROJECTION_SITES:
            raise self._fused(site)
        return super().hook(layer, site, fn)

    def _fused(self, site: str) -> ConfigError:
        return ConfigError(
            f"site '{site}' does not exist in a {self.model_types[0]} block (its q/k/v and "
            "gate/up projections are fused): use attn_input or mlp_input"
        )


@dataclass(frozen=True)
class SandwichNormAdapter(GatedMLPAdapter):
    """Gemma 2 / Gemma 3 blocks: LLaMA's module names (so the same sites and readers) and a
    GELU-tanh gated MLP, with a norm after each branch as well as before it
    (``post_attention_layernorm`` on the attention output, ``pre_feedforward_layernorm`` /
    ``post_feedforward_layernorm`` around the MLP)."""

    model_types: tuple[str, ...] = ("gemma2", "gemma3_text")

    def pre_norm(self, layer: torch.nn.Module, part: str) -> torch.nn.Module:
        return layer.input_layernorm if part == "attn" else layer.pre_feedforward_layernorm

    def post_norm(self, layer: torch.nn.Module, part: str) -> torch.nn.Module | None:
        return (
            layer.post_attention_layernorm if part == "attn" else layer.post_feedforward_layernorm
        )

    def attention_residual(self, layer: torch.nn.Module, x: torch.Tensor, kwargs: dict):
        out = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)
        return x + layer.post_attention_layernorm(out[0] if isinstance(out, tuple) else out)

    def mlp_residual(
        self, layer: torch.nn.Module, h: torch.Tensor, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        mlp_out = layer.mlp(layer.pre_feedforward_layernorm(h))
        return h + layer.post_feedforward_layernorm(mlp_out)


# The sites inside each routed expert of a mixture-of-experts block.
ROUTED_SITES = ("gate_act", "mlp_intermediate")


@dataclass(frozen=True)
class RoutedExpertsAdapter(GatedMLPAdapter):
    """Mixtral blocks: LLaMA's attention, and an MLP of routed experts (``mlp.gate`` picks
    ``top_k`` of them per token; ``mlp.experts`` holds each expert's SiLU-gated MLP as fused
    tensors ``gate_up_proj`` (E, 2 d_ff, d) and ``down_proj`` (E, d, d_ff), with no linear
    module per expert). Sites: the attention's, as LLaMA's; ``mlp_input`` is the experts' shared
    input after the router has read it (the router stays dense); ``gate_act`` and
    ``mlp_intermediate`` live inside each routed expert: the rows an expert receives are handed
    to the strategy as one (1, rows, d_ff) batch, so a per-token rule (top-k, a threshold)
    selects within that expert. Departures this forces: thresholds are calibrated over a
    layer's experts together; every routed row runs sparse (a prompt protocol cannot follow a
    token into its experts; it still applies at the attention sites and ``mlp_input``). The
    experts run transformers' eager loop (the model is switched to it on load), which the
    ``mlp_intermediate`` site re-implements while hooked. A sequence-level neuron set (one per
    layer) has no meaning across experts and is refused, as is everything that needs an
    expert's weights as one linear (CETT, R-Sparse, LaRoSA, WINA's transform, static, CHESS)."""

    model_types: tuple[str, ...] = ("mixtral",)
    routed_sites: tuple[str, ...] = ROUTED_SITES

    def dim(self, model: torch.nn.Module, site: str) -> int:
        if site in ROUTED_SITES:
            return model.config.intermediate_size
        return super().dim(model, site)

    def readers(self, layer: torch.nn.Module, site: str) -> list[torch.nn.Linear]:
        if site in ("mlp_input", "gate_input", "up_input", *ROUTED_SITES):
            raise self._no_linear(site)
        return super().readers(layer, site)

    def _no_linear(self, site: str) -> ConfigError:
        return ConfigError(
            f"site '{site}' of a {self.model_types[0]} block is read by routed experts' fused "
            "weights, not by one linear layer: use a per-token rule (topk, cats, teal, random)"
        )

    def mlp_up(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise self._no_linear("gate_act")

    def runs_mlp_parts(self, layer: torch.nn.Module) -> bool:
        return False  # routed experts: the block's own MLP runs

    def gate_up_weights(self, layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        raise self._no_linear("mlp_intermediate")

    def weights_per_entry(
        self,
        layer: torch.nn.Module,
        site: str,
        sites: tuple[str, ...] = (),
        compact: bool = False,
    ) -> int:
        """Per routed row for the expert sites (a token has ``top_k`` of them, so a token's
        saving is ``top_k`` times a row's); ``mlp_input`` skips a column of each routed
        expert's gate and up projections."""
        experts, top_k = layer.mlp.experts, layer.mlp.top_k
        d_ff, d = experts.gate_up_proj.shape[1] // 2, experts.gate_up_proj.shape[2]
        if site == "mlp_intermediate":  # a column of the expert's down projection
            return top_k * d
        if site == "gate_act":  # a row of its up projection and a column of its down
            return top_k * 2 * d
        if site == "mlp_input":
            return top_k * (d_ff if "gate_act" in sites else 2 * d_ff)
        return super().weights_per_entry(layer, site, sites, compact)

    def cost_model(
        self,
        model: torch.nn.Module,
        sites: list[str] = (),  # type: ignore[assignment]
        layers: list[int] = (),  # type: ignore[assignment]
        compact: bool = False,
    ) -> CostModel:
        """As a dense block's, with the MLP read per token being the router and ``top_k`` of
        the experts (the active weights)."""
        cost = super().cost_model(model, sites, layers, compact)
        active = 0
        for block in self.layers(model):
            experts = block.mlp.experts
            expert = experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()
            attention = sum(linear.weight.numel() for linear in self.linears(block))
            active += attention + block.mlp.gate.weight.numel() + block.mlp.top_k * expert
        return replace(cost, block_weights=active)

    def linears(self, layer: torch.nn.Module) -> list[torch.nn.Linear]:
        attn = layer.self_attn
        return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]

    def mlp_linears(self, layer: torch.nn.Module) -> list[torch.nn.Linear]:
        raise self._no_linear("mlp_intermediate")

    def hook(self, layer: torch.nn.Module, site: str, fn: SiteFn) -> Any:
        experts = layer.mlp.experts
        if site in ("gate_input", "up_input"):
            raise self._no_linear(site)
        if site == "mlp_input":  # the experts' (tokens, d) input, after the router read it
            wrapped, record = _unflattened(fn)
            return _Handles(
                [
                    layer.register_forward_pre_hook(record, with_kwargs=True),
                    experts.register_forward_pre_hook(_first_arg(wrapped)),
                ]
            )
        if site == "gate_act":
            return experts.act_fn.register_forward_hook(lambda _m, _a, out: _per_expert(fn, out))
        if site == "mlp_intermediate":
            return _ExpertSite(experts, fn)
        return super().hook(layer, site, fn)


def _per_expert(fn: SiteFn, rows: torch.Tensor) -> torch.Tensor:
    """One expert's (rows, dim) tensor through a site function as a (1, rows, dim) batch."""
    return fn(rows[None])[0]


class _ExpertSite:
    """The ``mlp_intermediate`` site of a block's routed experts: while any is registered, the
    experts run this eager loop (transformers' own, with the site between act(gate) * up and
    the down projection); removing the last one restores their forward."""

    def __init__(self, experts: torch.nn.Module, fn: SiteFn) -> None:
        self.experts, self.fn = experts, fn
        fns = experts.__dict__.setdefault("_moyu_site_fns", [])
        if not fns:
            experts.forward = lambda *a, **k: _routed_forward(experts, *a, **k)
        fns.append(fn)

    def remove(self) -> None:
        fns = self.experts.__dict__.get("_moyu_site_fns", [])
        if self.fn in fns:
            fns.remove(self.fn)
        if not fns:
            self.experts.__dict__.pop("_moyu_site_fns", None)
            self.experts.__dict__.pop("forward", None)


def _routed_forward(experts, hidden_states, top_k_index, top_k_weights):
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        routed = torch.nn.functional.one_hot(top_k_index, num_classes=experts.num_experts + 1)
        routed = routed.permute(2, 1, 0)
        hit = torch.greater(routed.sum(dim=(-1, -2)), 0).nonzero()
    for (expert,) in hit.tolist():
        if expert == experts.num_experts:
            continue
        slot, token = torch.where(routed[expert])
        x = hidden_states[token]
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        z = experts.act_fn(gate) * up
        for fn in experts._moyu_site_fns:
            z = _per_expert(fn, z)
        y = torch.nn.functional.linear(z, experts.down_proj[expert])
        y = y * top_k_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


@dataclass(frozen=True)
class NonGatedMLPAdapter(GatedMLPAdapter):
    """Blocks whose MLP is ``out(act(in(x)))`` with no gate (OPT's ``fc1``/``fc2``, GPT-NeoX's
    ``dense_h_to_4h``/``dense_4h_to_h``) and LayerNorms with a bias. Module names come from the
    dotted paths below. Sites: ``mlp_input`` is ``in``'s input, ``mlp_intermediate`` ``out``'s
    input, which is the activation's output; ``gate_act`` names that same tensor as the
    activation emits it (the natural analogue of a gated MLP's act(gate): a zero there skips one
    column of ``out``). ``gate_input``/``up_input`` do not exist, nor q/k/v alone where the
    attention projection is fused; both are refused in one line, as is anything that needs an up
    projection (CHESS's scores, static's gate x up norms) or a norm gain to fold (WINA's
    transform: a LayerNorm's bias would need folding too)."""

    model_types: tuple[str, ...] = ()
    layers_path: str = ""
    backbone_path: str = ""
    attention: str = ""  # the attention module, relative to a block
    projections: tuple[str, ...] = ()  # q, k, v (or the fused one), relative to the attention
    output: str = ""  # the attention's output projection, relative to it
    mlp_in: str = ""  # relative to a block, as are the next four
    mlp_out: str = ""
    activation: str = ""
    attn_norm: str = ""
    mlp_norm: str = ""
    flattens_mlp: bool = False  # the block reshapes to (tokens, d) before its MLP (OPT)

    def layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return attrgetter(self.layers_path)(model)

    def backbone(self, model: torch.nn.Module) -> torch.nn.Module:
        return attrgetter(self.backbone_path)(model)

    def dim(self, model: torch.nn.Module, site: str) -> int:
        if site == "block_input":
            return model.config.hidden_size
        block = self.layers(model)[0]
        reader = self.readers(block, site)[-1]  # gate_act: the out projection
        return reader.in_features

    def _attn(self, layer: torch.nn.Module) -> torch.nn.Module:
        return attrgetter(self.attention)(layer)

    def _part(self, layer: torch.nn.Module, path: str) -> torch.nn.Module:
        return attrgetter(path)(layer)

    def readers(self, layer: torch.nn.Module, site: str) -> list[torch.nn.Linear]:
        attn = self._attn(layer)
        if site in PROJECTION_SITES:
            return [self._projection_of(layer, site)]
        if site == "block_input":
            return []
        out = self._part(layer, self.mlp_out)
        return {
            "mlp_input": [self._part(layer, self.mlp_in)],
            "gate_act": [out],
            "mlp_intermediate": [out],
            "attn_input": [getattr(attn, name) for name in self.projections],
            "o_proj_input": [getattr(attn, self.output)],
        }[site]

    def _projection_of(self, layer: torch.nn.Module, site: str) -> torch.nn.Linear:
        part, _ = PROJECTION_SITES[site]
        if part == "mlp":
            raise ConfigError(
                f"site '{site}' does not exist in {self.model_types[0]} blocks (their MLP is not "
                "gated): use mlp_input"
            )
        if len(self.projections) == 1:
            raise ConfigError(
                f"site '{site}' does not exist in {self.model_types[0]} blocks (their q/k/v "
                "projections are fused): use attn_input"
            )
        index = ("q_input", "k_input", "v_input").index(site)
        return getattr(self._attn(layer), self.projections[index])

    def attention_residual(self, layer: torch.nn.Module, x: torch.Tensor, kwargs: dict):
        kwargs = {k: v for k, v in kwargs.items() if k != "use_cache"}
        pre = getattr(layer, "do_layer_norm_before", True)
        norm = self._part(layer, self.attn_norm)
        out = self._attn(layer)(hidden_states=norm(x) if pre else x, **kwargs)
        h = x + (out[0] if isinstance(out, tuple) else out)
        return h if pre else norm(h)

    def mlp_residual(
        self, layer: torch.nn.Module, h: torch.Tensor, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        norm = self._part(layer, self.mlp_norm)
        if getattr(layer, "use_parallel_residual", False):  # GPT-NeoX: x + attn + mlp(ln2(x))
            return h + self._mlp(layer, norm(x))
        if not getattr(layer, "do_layer_norm_before", True):  # OPT-350m: the norm comes last
            return norm(h + self._mlp(layer, h))
        return h + self._mlp(layer, norm(h))

    def runs_attention_spans(self, layer: torch.nn.Module) -> bool:
        return False  # their attention modules take other arguments: the whole block runs

    def runs_mlp_parts(self, layer: torch.nn.Module) -> bool:
        return False

    def _mlp(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        hidden = self._part(layer, self.activation)(self._part(layer, self.mlp_in)(x))
        return self._part(layer, self.mlp_out)(hidden)

    def pre_norm(self, layer: torch.nn.Module, part: str) -> torch.nn.Module:
        return self._part(layer, self.attn_norm if part == "attn" else self.mlp_norm)

    def norm_gain(self, norm: torch.nn.Module) -> torch.Tensor:
        raise self._layer_norm()

    def unit_norm_weight(self, norm: torch.nn.Module) -> torch.Tensor:
        raise self._layer_norm()

    def _layer_norm(self) -> ConfigError:
        return ConfigError(
            f"{self.model_types[0]} blocks' LayerNorms carry a bias, so their gain cannot be "
            "folded into the next weights alone (WINA's transform): use strategy.transform=false"
        )

    def mlp_up(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise self._not_gated("an up projection")

    def gate_up_weights(self, layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        raise self._not_gated("gate and up projections")

    def _not_gated(self, what: str) -> ConfigError:
        return ConfigError(
            f"{self.model_types[0]} blocks' MLP is not gated ({self.mlp_in} -> act -> "
            f"{self.mlp_out}), so it has no {what}: use a strategy on mlp_intermediate or "
            "gate_act (e.g. topk, cats, teal)"
        )

    def weights_per_entry(
        self,
        layer: torch.nn.Module,
        site: str,
        sites: tuple[str, ...] = (),
        compact: bool = False,
    ) -> int:
        d = self._part(layer, self.mlp_out).out_features
        if site == "mlp_intermediate" and compact:  # a row of the in projection, a column of out
            return 2 * d
        if site == "gate_act":  # a column of the out projection
            return d
        return sum(linear.out_features for linear in self.readers(layer, site))

    def linears(self, layer: torch.nn.Module) -> list[torch.nn.Linear]:
        attn = self._attn(layer)
        projections = [getattr(attn, name) for name in (*self.projections, self.output)]
        return [*projections, *self.mlp_linears(layer)]

    def mlp_linears(self, layer: torch.nn.Module) -> list[torch.nn.Linear]:
        return [self._part(layer, self.mlp_in), self._part(layer, self.mlp_out)]

    def hook(self, layer: torch.nn.Module, site: str, fn: SiteFn) -> Any:
        if site in PROJECTION_SITES:
            return self._projection_of(layer, site).register_forward_pre_hook(_first_arg(fn))
        if site == "block_input":
            return layer.register_forward_pre_hook(_hidden_states(fn), with_kwargs=True)
        if site == "attn_input":
            return self._attn(layer).register_forward_pre_hook(_hidden_states(fn), with_kwargs=True)
        if site == "o_proj_input":
            output = getattr(self._attn(layer), self.output)
            return output.register_forward_pre_hook(_first_arg(fn))
        if site not in ("mlp_input", "gate_act", "mlp_intermediate"):
            raise ConfigError(f"unknown site '{site}': accepted sites are {', '.join(SITES)}")
        handles = []
        if self.flattens_mlp:  # give the site its (batch, tokens, dim) shape back
            fn, record = _unflattened(fn)
            handles.append(layer.register_forward_pre_hook(record, with_kwargs=True))
        if site == "gate_act":
            module = self._part(layer, self.activation)
            handles.append(module.register_forward_hook(lambda _m, _a, out: fn(out)))
        else:
            reader = self._part(layer, self.mlp_in if site == "mlp_input" else self.mlp_out)
            handles.append(reader.register_forward_pre_hook(_first_arg(fn)))
        return _Handles(handles)


OPT_ADAPTER = NonGatedMLPAdapter(
    model_types=("opt",),
    layers_path="model.decoder.layers",
    backbone_path="model",
    attention="self_attn",
    projections=("q_proj", "k_proj", "v_proj"),
    output="out_proj",
    mlp_in="fc1",
    mlp_out="fc2",
    activation="activation_fn",
    attn_norm="self_attn_layer_norm",
    mlp_norm="final_layer_norm",
    flattens_mlp=True,
)
GPT_NEOX_ADAPTER = NonGatedMLPAdapter(
    model_types=("gpt_neox",),
    layers_path="gpt_neox.layers",
    backbone_path="gpt_neox",
    attention="attention",
    projections=("query_key_value",),
    output="dense",
    mlp_in="mlp.dense_h_to_4h",
    mlp_out="mlp.dense_4h_to_h",
    activation="mlp.act",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
)


class _Handles:
    """Several hook handles removed as one."""

    def __init__(self, handles: list) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _unflattened(fn: SiteFn):
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


@contextmanager
def hooked(
    model: torch.nn.Module,
    fns: Iterable[tuple[tuple[str, int], SiteFn]],
    before_forward: Callable | None = None,
    after_forward: Callable | None = None,
) -> Iterator[None]:
    """Route each (site, layer)'s tensor through its function while the block runs (a function
    may observe the tensor or return a changed one; several may share a site, in order), and
    call ``before_forward(module, args, kwargs)`` before and ``after_forward(module, args,
    kwargs, output)`` after every forward of the model. The one
    hook mechanism of the project: strategies' attachments, calibration, TEAL's search and the
    probes all go through it. Every hook is removed on exit, also after an exception."""
    adapter = adapter_for(model)
    blocks = adapter.layers(model)
    handles = []
    try:
        if before_forward is not None:
            handles.append(model.register_forward_pre_hook(before_forward, with_kwargs=True))
        if after_forward is not None:
            handles.append(model.register_forward_hook(after_forward, with_kwargs=True))
        for (site, layer), fn in fns:
            handles.append(adapter.hook(blocks[layer], site, fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _gain_offset(norm: torch.nn.Module) -> float:
    """Gemma's RMSNorms scale by (1 + weight); the others by weight."""
    return 1.0 if type(norm).__name__.startswith("Gemma") else 0.0


def _hidden_states(fn: SiteFn):
    """A pre-hook (with kwargs) routing ``hidden_states`` (a keyword or the first argument)."""

    def hook(_module, args, kwargs):
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = fn(kwargs["hidden_states"])
            return args, kwargs
        return (fn(args[0]), *args[1:]), kwargs

    return hook


def _first_arg(fn: SiteFn):
    return lambda _m, args: (fn(args[0]), *args[1:])


_ADAPTERS = (
    GatedMLPAdapter(),
    SandwichNormAdapter(),
    FusedProjectionAdapter(),
    OPT_ADAPTER,
    GPT_NEOX_ADAPTER,
    RoutedExpertsAdapter(),
)


def adapter_for(model: torch.nn.Module) -> GatedMLPAdapter:
    """The site adapter for ``model``'s architecture, or a one-line ConfigError."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    for adapter in _ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = sorted(t for a in _ADAPTERS for t in a.model_types)
    raise ConfigError(
        f"model type '{model_type}' has no activation-site adapter: "
        f"supported types are {', '.join(supported)}"
    )


def parse_layers(spec: object) -> slice | list[int]:
    """A layer selection as written (``"all"``, a list of indices, or a slice string such as
    ``"1:-1"``) as a slice or a list; a one-line ConfigError when it is neither. Checked when a
    strategy is built, before any model loads; :func:`resolve_layers` applies it to a model."""
    if spec is None or spec == "all":
        return slice(None)
    if isinstance(spec, str) and ":" in spec:
        try:
            bounds = [int(p) if p.strip() else None for p in spec.split(":")]
        except ValueError:
            bounds = []
        if not 2 <= len(bounds) <= 3 or (len(bounds) == 3 and bounds[2] == 0):
            raise ConfigError(
                f"layers='{spec}' is not a slice: use 'all', a list such as [0,1], or 'start:stop'"
            )
        return slice(*bounds)
    if isinstance(spec, int | str):
        spec = [spec]
    try:
        return [int(i) for i in spec]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(
            f"layers={spec!r} is not valid: use 'all', a list such as [0,1], or 'start:stop'"
        ) from None


def resolve_layers(spec: object, num_layers: int) -> list[int]:
    """The indices of the layers ``spec`` (see :func:`parse_layers`) selects in a model of
    ``num_layers`` layers."""
    selection = parse_layers(spec)
    if isinstance(selection, slice):
        selected = list(range(num_layers))[selection]
        if not selected and num_layers:
            raise ConfigError(f"layers='{spec}' selects no layer of a {num_layers}-layer model")
        return selected
    bad = [i for i in selection if not -num_layers <= i < num_layers]
    if bad:
        raise ConfigError(
            f"layers {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})"
        )
    return sorted({i % num_layers for i in selection})
