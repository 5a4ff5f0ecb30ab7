"""Gated-MLP families: act(gate(x)) * up(x) -> down, in three block layouts.

- :class:`GatedMLPAdapter`: LLaMA, Mistral, Qwen2, Qwen3, Gemma (``self_attn.{q,k,v,o}_proj``,
  ``mlp.{gate,up,down}_proj``, ``act_fn``);
- :class:`SandwichNormAdapter`: Gemma 2 and Gemma 3 (a norm after each branch as well);
- :class:`FusedProjectionAdapter`: Phi-3 (one ``qkv_proj``, one ``gate_up_proj``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from moyu_exp.errors import ConfigError
from moyu_exp.families.base import (
    Adapter,
    BlockParts,
    DecoderSpec,
    first_arg_hook,
    hidden_states_hook,
)
from moyu_exp.lazy import lazy_import
from moyu_exp.sites import PROJECTION_SITES, SITES, SiteFn

torch = lazy_import("torch")

# Per-projection sites and the linear each one feeds, in LLaMA's module names.
PROJECTIONS = {
    "q_input": ("self_attn", "q_proj"),
    "k_input": ("self_attn", "k_proj"),
    "v_input": ("self_attn", "v_proj"),
    "gate_input": ("mlp", "gate_proj"),
    "up_input": ("mlp", "up_proj"),
}


def _gain_offset(norm: torch.nn.Module) -> float:
    """Gemma's RMSNorms scale by (1 + weight); the others by weight."""
    return 1.0 if type(norm).__name__.startswith("Gemma") else 0.0


@dataclass(frozen=True)
class GatedMLPAdapter(Adapter):
    """LLaMA-style blocks: ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj, act_fn``."""

    model_types: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma")
    decodes: bool = True

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
        return layer.input_layernorm if part == "attn" else layer.post_attention_layernorm

    # ------------------------------------------------- a block in parts (TEAL's search)
    def attention(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.self_attn

    def runs_attention_spans(self, layer: torch.nn.Module) -> bool:
        """The attention takes transformers' ``cache`` and a mask it is handed (SDPA, eager)."""
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

    def runs_mlp_parts(self, layer: torch.nn.Module) -> bool:
        """Whether the MLP is act(gate(x)) * up(x) -> down, as :meth:`gate_up_linears` and
        :meth:`mlp_activation` describe it."""
        return True

    def gate_up_linears(self, layer: torch.nn.Module) -> tuple[Any, Any]:
        """The gate and up projections (the fused one and None where they are one linear)."""
        return layer.mlp.gate_proj, layer.mlp.up_proj

    def mlp_activation(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.mlp.act_fn

    def norm_gain(self, norm: torch.nn.Module) -> torch.Tensor:
        """Its weight, or 1 + weight for Gemma's norms."""
        return norm.weight + _gain_offset(norm)

    def unit_norm_weight(self, norm: torch.nn.Module) -> torch.Tensor:
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
    def decoder_spec(self, model: torch.nn.Module) -> DecoderSpec:
        config = model.config
        if getattr(config, "final_logit_softcapping", None) or getattr(
            config, "attn_logit_softcapping", None
        ):
            raise ConfigError(
                "bench.mode=kernel has no logit soft-capping: use bench.mode=simulated"
            )
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        spec = DecoderSpec(
            d=config.hidden_size,
            d_ff=config.intermediate_size,
            heads=heads,
            kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            eps=config.rms_norm_eps,
            vocab=config.vocab_size,
            activation=self._activation(config),
            blocks=[self._block_parts(model, block) for block in self.layers(model)],
            embedding=model.get_input_embeddings().weight,
            embedding_scale=getattr(model.get_input_embeddings(), "embed_scale", None),
            final_norm=self.norm_gain(model.model.norm),
            head=model.get_output_embeddings().weight,
            rope=lambda positions: self._rope_tables(model, positions),
        )
        probe = spec.rope(torch.arange(1, device=spec.head.device))
        if any(cos.shape[-1] != head_dim for cos, _ in probe.values()):
            raise ConfigError("bench.mode=kernel has no partial RoPE: use bench.mode=simulated")
        return spec

    def _block_parts(self, model: torch.nn.Module, layer: torch.nn.Module) -> BlockParts:
        """The weights and gains a lean decode step of ``layer`` reads."""
        attn = layer.self_attn
        gate, up = self.gate_up_weights(layer)
        window = getattr(attn, "sliding_window", getattr(model.config, "sliding_window", None))
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)

        def gain(norm):
            return None if norm is None else self.norm_gain(norm)

        return BlockParts(
            norms=(gain(self.pre_norm(layer, "attn")), gain(self.pre_norm(layer, "mlp"))),
            post_norms=(gain(self.post_norm(layer, "attn")), gain(self.post_norm(layer, "mlp"))),
            qkv=self.readers(layer, "attn_input"),
            o=attn.o_proj,
            gate=gate,
            up=up,
            down=self.readers(layer, "mlp_intermediate")[0],
            qk_norms=(gain(q_norm), gain(k_norm)) if q_norm is not None else None,
            window=window,
            rope=getattr(attn, "layer_type", None) if self._rope_per_layer_type(model) else None,
            scale=float(attn.scaling),
        )

    @staticmethod
    def _rope_per_layer_type(model: torch.nn.Module) -> bool:
        return "layer_type" in inspect.signature(model.model.rotary_emb.forward).parameters

    def _rope_tables(self, model: torch.nn.Module, positions: torch.Tensor) -> dict:
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

    @staticmethod
    def _activation(config) -> str:
        """The gated MLP's activation as kernel mode names it: ``silu`` or ``gelu_tanh``."""
        name = getattr(config, "hidden_activation", None) or config.hidden_act
        known = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
        if name not in known:
            raise ConfigError(
                f"bench.mode=kernel runs SiLU and GELU-tanh gated MLPs, not '{name}': "
                "use bench.mode=simulated"
            )
        return known[name]

    def linears(self, layer: torch.nn.Module) -> list[torch.nn.Linear]:
        """Every linear layer of a decoder block (what a decode step reads)."""
        attn = layer.self_attn
        return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, *self.mlp_linears(layer)]

    def mlp_linears(self, layer: torch.nn.Module) -> list[torch.nn.Linear]:
        mlp = layer.mlp
        return [mlp.gate_proj, mlp.up_proj, mlp.down_proj]

    @staticmethod
    def _projection(layer: torch.nn.Module, site: str) -> torch.nn.Linear:
        part, name = PROJECTIONS[site]
        return getattr(getattr(layer, part), name)

    def hook(self, layer: torch.nn.Module, site: str, fn: SiteFn) -> Any:
        """Route the site's tensor through ``fn``; remove the returned handle to restore."""
        attn, mlp = layer.self_attn, layer.mlp
        if site in PROJECTION_SITES:
            return self._projection(layer, site).register_forward_pre_hook(first_arg_hook(fn))
        if site == "block_input":
            return layer.register_forward_pre_hook(hidden_states_hook(fn), with_kwargs=True)
        if site == "mlp_input":
            return mlp.register_forward_pre_hook(first_arg_hook(fn))
        if site == "gate_act":
            return mlp.act_fn.register_forward_hook(lambda _m, _a, out: fn(out))
        if site == "mlp_intermediate":
            return mlp.down_proj.register_forward_pre_hook(first_arg_hook(fn))
        if site == "o_proj_input":
            return attn.o_proj.register_forward_pre_hook(first_arg_hook(fn))
        if site == "attn_input":
            return attn.register_forward_pre_hook(hidden_states_hook(fn), with_kwargs=True)
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
