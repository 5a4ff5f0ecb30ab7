"""Routed-experts families (Mixtral): LLaMA's attention and an MLP of routed experts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from moyu_exp.errors import ConfigError
from moyu_exp.families.base import Handles, first_arg_hook, unflattened
from moyu_exp.families.gated import GatedMLPAdapter
from moyu_exp.lazy import lazy_import
from moyu_exp.meter import CostModel
from moyu_exp.sites import SiteFn

torch = lazy_import("torch")

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
    decodes: bool = False

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
            wrapped, record = unflattened(fn)
            return Handles(
                [
                    layer.register_forward_pre_hook(record, with_kwargs=True),
                    experts.register_forward_pre_hook(first_arg_hook(wrapped)),
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
