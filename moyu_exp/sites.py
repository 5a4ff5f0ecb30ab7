"""Where activations live inside a decoder block, and how to hook them.

This is the only module that knows module names. A site is a tensor of shape (batch, tokens, dim)
flowing through every decoder layer; a strategy rewrites it through a hook. Supporting another
architecture family means adding one adapter here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
        attn, mlp = layer.self_attn, layer.mlp
        if site in PROJECTION_SITES:
            return [self._projection(layer, site)]
        if site == "block_input":
            return []
        return {
            "mlp_input": [mlp.gate_proj, mlp.up_proj],
            "gate_act": [mlp.up_proj, mlp.down_proj],
            "mlp_intermediate": [mlp.down_proj],
            "attn_input": [attn.q_proj, attn.k_proj, attn.v_proj],
            "o_proj_input": [attn.o_proj],
        }[site]

    def attention_residual(self, layer: torch.nn.Module, x: torch.Tensor, kwargs: dict):
        """The first half of a block: ``x`` plus its attention branch (``kwargs``: what the
        block itself was called with, e.g. captured by a pre-hook)."""
        out = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)
        return x + (out[0] if isinstance(out, tuple) else out)

    def mlp_residual(self, layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        """The second half of a block: ``h`` plus its MLP branch (position-wise)."""
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def pre_norm(self, layer: torch.nn.Module, part: str) -> torch.nn.Module:
        """The norm whose output the attention ("attn") or the MLP ("mlp") reads."""
        return layer.input_layernorm if part == "attn" else layer.post_attention_layernorm

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
        gate, _ = self.gate_up_weights(layer)
        d_ff, d = gate.shape
        if site == "mlp_intermediate" and compact:  # a gate row, an up row, a down column
            return 3 * d
        if site == "gate_act":  # a zero in act(gate) skips one row of up and one column of down
            return 2 * d
        if site == "mlp_input" and "gate_act" in sites:  # up is then read by rows: gate only
            return d_ff
        return sum(linear.out_features for linear in self.readers(layer, site))

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

    def attention_residual(self, layer: torch.nn.Module, x: torch.Tensor, kwargs: dict):
        out = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)
        return x + layer.post_attention_layernorm(out[0] if isinstance(out, tuple) else out)

    def mlp_residual(self, layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        mlp_out = layer.mlp(layer.pre_feedforward_layernorm(h))
        return h + layer.post_feedforward_layernorm(mlp_out)


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


_ADAPTERS = (GatedMLPAdapter(), SandwichNormAdapter(), FusedProjectionAdapter())


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


def resolve_layers(spec: object, num_layers: int) -> list[int]:
    """Layer selection: ``"all"``, a list of indices, or a slice string such as ``"1:-1"``."""
    if spec is None or spec == "all":
        return list(range(num_layers))
    if isinstance(spec, str) and ":" in spec:
        parts = spec.split(":")
        try:
            bounds = [int(p) if p.strip() else None for p in parts]
        except ValueError:
            bounds = None
        if bounds is None or len(bounds) > 3:
            raise ConfigError(
                f"layers='{spec}' is not a slice: use 'all', a list such as [0,1], or 'start:stop'"
            )
        selected = list(range(num_layers))[slice(*bounds)]
        if not selected:
            raise ConfigError(f"layers='{spec}' selects no layer of a {num_layers}-layer model")
        return selected
    if isinstance(spec, int | str):
        spec = [spec]
    try:
        indices = [int(i) for i in spec]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(
            f"layers={spec!r} is not valid: use 'all', a list such as [0,1], or 'start:stop'"
        ) from None
    bad = [i for i in indices if not -num_layers <= i < num_layers]
    if bad:
        raise ConfigError(
            f"layers {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})"
        )
    return sorted({i % num_layers for i in indices})
