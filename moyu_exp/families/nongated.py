"""Non-gated MLP families: ``out(act(in(x)))`` and LayerNorms with a bias (OPT, GPT-NeoX)."""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from moyu_exp.errors import ConfigError
from moyu_exp.families.base import (
    Adapter,
    Handles,
    first_arg_hook,
    hidden_states_hook,
    unflattened,
)
from moyu_exp.lazy import lazy_import
from moyu_exp.sites import PROJECTION_PART, PROJECTION_SITES, SITES, SiteFn

torch = lazy_import("torch")


@dataclass(frozen=True)
class NonGatedMLPAdapter(Adapter):
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
    attention_path: str = ""  # the attention module, relative to a block
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
        return attrgetter(self.attention_path)(layer)

    def attention(self, layer: torch.nn.Module) -> torch.nn.Module:
        return self._attn(layer)

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
        if PROJECTION_PART[site] == "mlp":
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
            return self._projection_of(layer, site).register_forward_pre_hook(first_arg_hook(fn))
        if site == "block_input":
            return layer.register_forward_pre_hook(hidden_states_hook(fn), with_kwargs=True)
        if site == "attn_input":
            return self._attn(layer).register_forward_pre_hook(
                hidden_states_hook(fn), with_kwargs=True
            )
        if site == "o_proj_input":
            output = getattr(self._attn(layer), self.output)
            return output.register_forward_pre_hook(first_arg_hook(fn))
        if site not in ("mlp_input", "gate_act", "mlp_intermediate"):
            raise ConfigError(f"unknown site '{site}': accepted sites are {', '.join(SITES)}")
        handles = []
        if self.flattens_mlp:  # give the site its (batch, tokens, dim) shape back
            fn, record = unflattened(fn)
            handles.append(layer.register_forward_pre_hook(record, with_kwargs=True))
        if site == "gate_act":
            module = self._part(layer, self.activation)
            handles.append(module.register_forward_hook(lambda _m, _a, out: fn(out)))
        else:
            reader = self._part(layer, self.mlp_in if site == "mlp_input" else self.mlp_out)
            handles.append(reader.register_forward_pre_hook(first_arg_hook(fn)))
        return Handles(handles)


OPT_ADAPTER = NonGatedMLPAdapter(
    model_types=("opt",),
    layers_path="model.decoder.layers",
    backbone_path="model",
    attention_path="self_attn",
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
    attention_path="attention",
    projections=("query_key_value",),
    output="dense",
    mlp_in="mlp.dense_h_to_4h",
    mlp_out="mlp.dense_4h_to_h",
    activation="mlp.act",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
)
