"""WINA: per token, keep the top-k of |x_i| * ||W[:, i]||_2 at the inputs of the linears
(Chen et al., Microsoft, 2025; microsoft/wina).

As published, by default:

- ``transform=true``: WINA's tensor transform. Each block's RMSNorm gains are folded into the
  linears that read them, and the attention input (the MLP input) is rotated by the right
  singular vectors of that block's k_proj (gate_proj), so that W_k (W_gate) becomes
  column-orthogonal, the condition of WINA's optimality argument. Here the rotation R is folded
  into q, k, v (gate, up) as W R and the site expresses its unit-norm input as x R before the
  mask (the attachment patches the weights and restores them on exit), so the attached model
  computes the same function as the original up to rounding; at sparsity 0 nothing is patched
  and it is bit-exact. WINA also rotates the residual stream between blocks; that changes no
  product a mask acts on (the norms are rotation-invariant), so it is left out.
- per-projection masks: q, k, v, o, gate, up and down each get their own top-k (sites
  ``q_input``, ``k_input``, ``v_input``, ``o_proj_input``, ``gate_input``, ``up_input``,
  ``mlp_intermediate``); k_proj and gate_proj score an entry by |x_i| times the column norm of
  their (transformed) weight, the others by |x_i| alone, as in microsoft/wina;
- ``allocation=greedy``: levels per layer and projection from TEAL's greedy block search, which
  WINA reuses (:mod:`moyu_exp.strategies.greedy`, with WINA's top-k at each level, in the
  transformed block), on ``greedy_rows`` rows of ``greedy_seq_len`` calibration tokens (16 x
  256; WINA's ``grab_acts`` kept 20 short Alpaca samples for it);
- ``prefill=last_fraction`` with ``prefill_fraction=0.99``: WINA's code keeps the first 1% of
  every multi-token forward's positions dense.

``transform=false`` runs without the transform, and
``sites=[attn_input,o_proj_input,mlp_input,mlp_intermediate] transform=false
allocation=uniform prefill=sparse`` is this project's earlier variant (one mask per shared input,
scored with the column norms of the stacked weights that read it). Departures: k = round((1 - s)
d) where WINA's code truncates; a decode step of the rotated variant computes x R once per
rotated input (d x d weights, which the weight bytes, the model-level sparsity and the ideal
speedup count, as LaRoSA's rotation), then reads the kept rows of each projection's W^T, in
kernel mode as in the meter. On Gemma 3, whose norm gains reach 226, the transform with these
scores breaks the model (KL 15.5 at 0.5, 0.48 without it; docs/generality.md): after the gains
are folded into the weights, |x R| alone no longer says what an entry of q's, v's or up's
input contributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Any, ClassVar

from moyu_exp.activations import capture_block_inputs
from moyu_exp.config import FRACTION, Range, check_choice
from moyu_exp.costs import announce
from moyu_exp.errors import ConfigError
from moyu_exp.families import adapter_for
from moyu_exp.lazy import lazy_import
from moyu_exp.masking import KernelRule, apply_rule
from moyu_exp.strategies.attachment import patched
from moyu_exp.strategies.base import Strategy, register, topk_rule
from moyu_exp.strategies.greedy import SEARCH_VERSION, BlockSearch, ModelPaths, paths_reach

torch = lazy_import("torch")

PROJECTION_SITES = (
    "q_input",
    "k_input",
    "v_input",
    "o_proj_input",
    "gate_input",
    "up_input",
    "mlp_intermediate",
)
WEIGHTED = ("k_input", "gate_input", "attn_input", "mlp_input")  # scored with column norms
# A block's two rotated inputs (the adapter's pre_norm of each part): the sites that read it and
# the anchor weight.
ROTATED = {
    "attn": (("q_input", "k_input", "v_input"), "k_input"),
    "mlp": (("gate_input", "up_input"), "gate_input"),
}
ALLOCATIONS = ("uniform", "greedy")


@register("wina")
@dataclass(eq=False)
class Wina(Strategy):
    name: str = "wina"
    sites: list[str] = field(default_factory=lambda: list(PROJECTION_SITES))
    prefill: str = "last_fraction"
    prefill_fraction: float = 0.99  # WINA's code: the first 1% of the positions stay dense
    transform: bool = True
    allocation: str = "greedy"  # or uniform: the target on every projection
    greedy_step: float = 0.05
    greedy_max: float = 0.9
    greedy_rows: int = 16  # WINA's search ran on 20 short Alpaca samples (a few K tokens)
    greedy_seq_len: int = 256

    RANGES: ClassVar[dict[str, Range]] = {
        **Strategy.RANGES,
        "greedy_step": FRACTION,
        "greedy_max": FRACTION,
    }
    allowed_sites = (*PROJECTION_SITES, "attn_input", "mlp_input")
    calibration_version = 2
    calibration_passes = 0.0  # its search says what it costs
    cheaper_calibration = "strategy.allocation=uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("strategy.allocation", self.allocation, ALLOCATIONS)
        shared = sorted({"attn_input", "mlp_input"} & set(self.sites))
        if self.transform and shared:
            raise ConfigError(
                f"strategy.transform=true masks each projection: sites {shared} need "
                "strategy.transform=false"
            )
        if self.allocation == "greedy" and self.sparsity > self.greedy_max:
            raise ConfigError(
                f"sparsity={self.sparsity} is beyond the greedy path "
                f"(strategy.greedy_max={self.greedy_max}): raise greedy_max or use uniform"
            )

    @property
    def transformed(self) -> bool:
        """The transform is applied (never at sparsity 0, where it would change only rounding)."""
        return self.transform and self.sparsity > 0.0

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.allocation == "greedy" and self.sparsity > 0.0

    def greedy_params(self) -> dict[str, Any]:
        """What a layer's greedy path depends on besides the model, the tokens and the layer
        (not which other layers are sparse: the search reads the dense model's block inputs;
        nor how far it goes: a path is searched as far as a target needs, and continued)."""
        params = {
            "search": SEARCH_VERSION,
            "version": self.calibration_version,
            "sites": list(self.sites),
            "step": self.greedy_step,
            "transform": self.transform,
            "prefill_fraction": self.prefill_fraction,
            "rows": self.greedy_rows,
            "seq_len": self.greedy_seq_len,
        }
        partial = any(0 < len(set(s) & set(self.sites)) < len(s) for s, _ in ROTATED.values())
        if self.transform and partial:  # paths searched before the other readers got the gain
            params["gain_folded_for_every_reader"] = True  # are stale: a new key
        return params

    def shipped_part(self) -> tuple[str, dict[str, Any]]:
        """(owner, parameters) of the per-layer greedy path parts (:mod:`moyu_exp.shipped`)."""
        return self.name, self.greedy_params()

    def calibration_key(self) -> dict[str, Any]:
        return super().calibration_key() | {"greedy": self.greedy_params()}

    def serves(self, calibration: dict) -> bool:
        """A stored state serves this sparsity when its greedy paths reach it."""
        return paths_reach(calibration, self.sparsity)

    # ------------------------------------------------------------------ calibration
    def calibrate(self, model, batches, cached) -> dict[str, torch.Tensor]:
        """The greedy paths (one per layer, searched as far as this sparsity needs)."""
        uniform = Wina(
            **{f.name: getattr(self, f.name) for f in fields(self) if f.init}
            | {"allocation": "uniform", "sparsity": 0.5}
        )
        # the transformed model the search runs on (a family that cannot be transformed
        # says so here, before any cost)
        state = uniform.prepare(model, adapter_for(model), self.layer_ids(model), None)
        paths = ModelPaths(
            cached,
            self.name,
            self.greedy_params(),
            self.layer_ids(model),
            list(self.sites),
            self.greedy_step,
        ).plan(self.sparsity)
        ids = search_rows(batches, self.greedy_rows, self.greedy_seq_len)
        seconds = paths.estimate(model, ids.shape[0], ids.shape[1], self.prefill_fraction)
        announce(
            f"WINA's greedy search ({len(paths.todo)} layers)",
            seconds,
            "strategy.allocation=uniform",
        )
        return greedy_paths(model, ids, uniform, state, paths)

    def site_levels(self, calibration: dict | None, layer: int) -> dict[str, float]:
        if self.allocation == "uniform" or calibration is None:
            return dict.fromkeys(self.sites, self.sparsity)
        path = calibration[f"greedy.{layer}"]
        row = path[(path[:, 0] - self.sparsity).abs().argmin()]
        return {site: float(level) for site, level in zip(self.sites, row[1:], strict=True)}

    # -------------------------------------------------------------------- decisions
    def prepare(self, model, adapter, layers, calibration) -> SimpleNamespace:
        blocks = adapter.layers(model)
        state = SimpleNamespace(rules={}, rotations={}, weights={}, norms={})
        for layer in layers:
            block = blocks[layer]
            if self.transform:
                transform_block(state, adapter, block, layer, self.sites)
            for site, level in self.site_levels(calibration, layer).items():
                scale = None
                if site in WEIGHTED:
                    weight = state.weights.get((site, layer))
                    if weight is None:
                        scale = column_norms(adapter.readers(block, site))
                    else:
                        scale = weight.float().norm(dim=0)
                state.rules[(site, layer)] = topk_rule(level, adapter.dim(model, site), scale)
        return state

    def kernel_rule(self, state, site: str, layer: int) -> KernelRule:
        return state.rules[(site, layer)]

    def extra_weights(self, state) -> dict[tuple[str, int], int]:
        """The transform's x R: d x d weights per rotated input and token (kernel mode computes
        it once for the sites that share it), counted at the first of them."""
        if not self.transformed:
            return {}
        extra = {}
        for (part, layer), rotation in state.rotations.items():
            site = next(s for s in self.sites if rotated_part(s) == part)
            extra[(site, layer)] = rotation.numel()
        return extra

    def basis(self, state, site: str, layer: int) -> torch.Tensor | None:
        part = rotated_part(site)
        return state.rotations.get((part, layer)) if self.transformed and part else None

    def patches(self, state, model, adapter, layers) -> list[tuple[Any, str, Any]]:
        """The transform: unit norm gains, and q/k/v, gate/up with the gains and R folded in."""
        if not self.transformed:
            return []
        blocks = adapter.layers(model)
        out: list[tuple[Any, str, Any]] = [
            (norm, "weight", torch.nn.Parameter(adapter.unit_norm_weight(norm), False))
            for norm in state.norms.values()
        ]
        for (site, layer), weight in state.weights.items():
            linear = adapter.readers(blocks[layer], site)[0]
            out.append((linear, "weight", torch.nn.Parameter(weight, requires_grad=False)))
        return out


def rotated_part(site: str) -> str | None:
    """The block input ("attn", "mlp") a site reads in the rotated basis, if any."""
    return next((part for part, (sites, _) in ROTATED.items() if site in sites), None)


def transform_block(state, adapter, block, layer: int, sites) -> None:
    """WINA's rotation of one block's attention and MLP inputs: R from the SVD of the anchor
    weight (gain folded in, float64), the folded weights W diag(g) R of the sites' readers. A
    reader of a rotated input that is not a site (``sites`` a subset) reads the unrotated input:
    it gets the gain alone, W diag(g), since the norm's gain is folded away for every reader."""
    for part, (part_sites, anchor) in ROTATED.items():
        if not set(part_sites) & set(sites):
            continue  # nothing of this input is masked: its norm and readers stay as they are
        norm = adapter.pre_norm(block, part)
        gain = adapter.norm_gain(norm).double()
        anchor_linear = adapter.readers(block, anchor)[0]
        rotation = torch.linalg.svd(anchor_linear.weight.double() * gain, full_matrices=True).Vh.T
        dtype = anchor_linear.weight.dtype
        state.rotations[(part, layer)] = rotation.to(dtype)
        state.norms[(part, layer)] = norm
        for site in part_sites:
            weight = adapter.readers(block, site)[0].weight.double() * gain
            if site in sites:
                weight = weight @ rotation
            state.weights[(site, layer)] = weight.to(dtype)


def column_norms(linears) -> torch.Tensor:
    """||W[:, i]||_2 over the stacked weights of linears that share their input."""
    return torch.stack([lin.weight.float().square().sum(0) for lin in linears]).sum(0).sqrt()


# ------------------------------------------------------------------------ greedy allocation
def search_rows(batches, rows: int, seq_len: int) -> torch.Tensor:
    """The search's token rows: the first ``rows`` x ``seq_len`` calibration tokens."""
    ids = torch.cat([b.reshape(-1) for b in batches])
    rows = min(rows, max(1, len(ids) // seq_len))
    return ids[: rows * seq_len].reshape(rows, -1)


def greedy_paths(
    model, ids: torch.Tensor, uniform: Wina, state, paths: ModelPaths
) -> dict[str, torch.Tensor]:
    """Per layer, TEAL's greedy path with WINA's top-k (in the transformed block when
    ``transform``; ``uniform``, ``state``: WINA's configuration with uniform levels, prepared on
    ``model``): rows [weighted sparsity, level of each site]."""
    adapter = adapter_for(model)
    layers = uniform.layer_ids(model)
    sites = list(uniform.sites)
    with torch.inference_mode():
        # the dense model's block inputs, before the transform is patched in
        inputs = capture_block_inputs(model, list(paths.todo), ids) if paths.todo else {}
        with patched(uniform.patches(state, model, adapter, layers)):

            def make_search(layer: int, captured: tuple) -> BlockSearch:
                scales = {s: state.rules[(s, layer)].scale for s in sites}
                bases = {s: b for s in sites if (b := uniform.basis(state, s, layer)) is not None}

                def sparsify(site: str, level: float, x: torch.Tensor):
                    return apply_rule(x, topk_rule(level, x.shape[-1], scales[site]), None)[0]

                return BlockSearch(
                    model,
                    layer,
                    sites,
                    captured,
                    sparsify,
                    sparse_fraction=uniform.prefill_fraction,
                    bases=bases,
                )

            return paths.run(model, inputs, make_search, "WINA greedy search")
