"""The vocabulary of sites: where activations live inside a decoder block, by name.

A site is a tensor of shape (batch, tokens, dim) flowing through every decoder layer; a strategy
rewrites it through a hook. Which module holds it in a given architecture, and how to hook it,
is the family adapters' business (:mod:`moyu_exp.families`); this module knows no module name.
"""

from __future__ import annotations

from collections.abc import Callable

from moyu_exp.errors import ConfigError

SiteFn = Callable[["torch.Tensor"], "torch.Tensor"]  # noqa: F821 (torch: annotations only)

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
# Per-projection sites: one linear's own input where several read one tensor.
PROJECTION_SITES = ("q_input", "k_input", "v_input", "gate_input", "up_input")
# The block part ("attn" or "mlp") each per-projection site belongs to.
PROJECTION_PART = {"q_input": "attn", "k_input": "attn", "v_input": "attn"} | {
    "gate_input": "mlp",
    "up_input": "mlp",
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
