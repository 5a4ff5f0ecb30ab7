"""A lean batch-1 greedy decoder that runs the sparse kernels, for every family whose adapter
describes its blocks (:class:`moyu_exp.families.DecoderSpec`).

Why not the model's own forward: at batch 1 a generic forward spends most of its time in Python
and dispatch (about 75 ms per token for SmolLM2 on this CPU, for ~540 MB of fp32 weights), so
reading fewer weights would hardly show. A decode step here is a handful of kernel calls per
layer (:mod:`moyu_exp.kernels.ops`): fused q/k/v and gate/up weights, a preallocated (static)
KV cache, RMSNorm, one attention call. The prompt is prefilled by the model itself (with the
strategy's hooks, exactly as in simulated mode) and its KV cache copied over.

The strategy decides what is active, never this module: at every sparsified site of a decode
step the decoder applies the attachment's :class:`~moyu_exp.masking.KernelRule` (natively, fused
into the mat-vec) or asks it for the mask of kept entries, and the kernels read only the weights
those entries need (input-sparse: rows of W^T; output-sparse: rows of W). For methods whose
decode-time neuron set is known in advance (sequence-level methods after the prompt, the static
set) a compact MLP is gathered once per prompt. The fused layouts (:class:`DecoderWeights`) are
built once and can be shared by a dense and a sparse decoder; the transposed copies a sparse
decoder needs are its own. What each step kept is counted into the attachment's meter (the
phase's: ``live.measuring()``); the weight bytes follow from it and the adapter's cost model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moyu_exp.errors import ConfigError
from moyu_exp.kernels.fused import SITES
from moyu_exp.kernels.ops import kernels_for
from moyu_exp.lazy import lazy_import

torch = lazy_import("torch")

INPUT_SITES = {"attn_input": "qkv", "o_proj_input": "o", "mlp_input": "gate_up"}
QKV_SITES = ("q_input", "k_input", "v_input")  # one projection's own input (CHESS+, WINA)
GATE_UP_SITES = ("gate_input", "up_input")  # gate's and up's own inputs (WINA)
BLOCK_INPUT = "block_input"  # what a predictor's tap reads


@dataclass
class LayerWeights:
    ln1: torch.Tensor  # the norms' gains (as the adapter gives them)
    ln2: torch.Tensor
    qkv: torch.Tensor  # (d_q + 2 d_kv, d)
    o: torch.Tensor  # (d, d_q)
    gate_up: torch.Tensor  # (2 d_ff, d)
    down: torch.Tensor  # (d, d_ff)
    qkv_bias: torch.Tensor | None = None  # q/k/v biases, where the projections have them
    post1: torch.Tensor | None = None  # norms after the attention and the MLP (sandwich)
    post2: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # per-head norms of q and k before RoPE
    k_norm: torch.Tensor | None = None
    window: int | None = None  # sliding-window attention
    rope: str | None = None  # which RoPE table


class DecoderWeights:
    """The model's weights in the decoder's layouts (fused q/k/v and gate/up), RoPE tables for
    ``max_tokens`` positions, and the kernels that run them; built once per model and bench.
    The family adapter's :class:`DecoderSpec` says where everything is (norms' gains, q/k
    norms, sliding windows, the activation, the embedding scale), so one decode step serves
    every family that has one."""

    def __init__(self, model, max_tokens: int):
        from moyu_exp.families import adapter_for, decoder_spec

        self.adapter = adapter_for(model)
        spec = decoder_spec(model)  # or a one-line error: kernel mode cannot run this model
        self.d, self.d_ff = spec.d, spec.d_ff
        self.heads, self.kv_heads, self.head_dim = spec.heads, spec.kv_heads, spec.head_dim
        self.eps = spec.eps
        self.max_tokens = max_tokens
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        widest = max(2 * self.d_ff, self.d, spec.vocab)
        self.kernels = kernels_for(self.device, self.dtype, max_tokens, widest)
        self.act = spec.activation
        act = self.kernels.dtype  # activations (fp32 for the native kernels)
        with torch.no_grad():
            self.scale = spec.blocks[0].scale
            self.layers = [self._layer(p, act) for p in spec.blocks]
            self.embed = spec.embedding
            scale = spec.embedding_scale
            self.embed_scale = None if scale is None else scale.to(self.embed.dtype)
            self.norm = spec.final_norm.to(act).contiguous()
            self.head = spec.head.contiguous()
            positions = torch.arange(max_tokens, device=self.device)
            self.rope = {
                kind: (cos.to(act).contiguous(), sin.to(act).contiguous())
                for kind, (cos, sin) in spec.rope(positions).items()
            }
        # the plain block (no extras): what the natively fused whole step runs
        self.plain = (
            self.act == "silu"
            and self.embed_scale is None
            and all(
                lw.qkv_bias is None and lw.post1 is None and lw.q_norm is None and lw.window is None
                for lw in self.layers
            )
        )

    @property
    def cos(self) -> torch.Tensor:
        return self.rope[self.layers[0].rope][0]

    @property
    def sin(self) -> torch.Tensor:
        return self.rope[self.layers[0].rope][1]

    def _layer(self, parts, act) -> LayerWeights:
        def gain(value):
            return None if value is None else value.to(act).contiguous()

        biases = [linear.bias for linear in parts.qkv]
        window = (
            parts.window if parts.window is not None and parts.window < self.max_tokens else None
        )
        q_norm, k_norm = parts.qk_norms or (None, None)
        return LayerWeights(
            ln1=gain(parts.norms[0]),
            ln2=gain(parts.norms[1]),
            qkv=torch.cat([linear.weight for linear in parts.qkv]),
            o=parts.o.weight.contiguous(),
            gate_up=torch.cat([parts.gate, parts.up]),
            down=parts.down.weight.contiguous(),
            qkv_bias=None if biases[0] is None else torch.cat(biases).to(act),
            post1=gain(parts.post_norms[0]),
            post2=gain(parts.post_norms[1]),
            q_norm=gain(q_norm),
            k_norm=gain(k_norm),
            window=window,
            rope=parts.rope,
        )


@dataclass
class Layer:
    """One layer as a decoder runs it: the shared weights, its sparse sites, their transposed
    copies and a compact MLP when the neuron set is known in advance."""

    w: LayerWeights
    sites: set[str] = field(default_factory=set)
    t: dict[str, torch.Tensor] = field(default_factory=dict)  # transposed copies
    compact: tuple[torch.Tensor, torch.Tensor] | None = None  # (gate_up rows, down columns)
    compact_t: torch.Tensor | None = None  # the compact gate_up transposed, for mlp_input rules
    slots: torch.Tensor | None = None  # the neuron in each compact slot (any order)
    parked: tuple | None = None  # (compact, compact_t, slots) while steps run the full MLP


class LeanDecoder:
    def __init__(
        self,
        model,
        live=None,
        max_tokens: int = 4096,
        fuse: bool = True,
        weights: DecoderWeights | None = None,
    ):
        if live is not None and not live.kernel_support:
            raise ConfigError(
                f"strategy '{live.name}' has no kernel path: use bench.mode=simulated"
            )
        self.model, self.live = model, live
        self.w = weights if weights is not None else DecoderWeights(model, max_tokens)
        w = self.w
        self.d, self.d_ff, self.max_tokens = w.d, w.d_ff, w.max_tokens
        self.k = w.kernels
        self.scale = w.scale
        act = self.k.dtype
        with torch.no_grad():
            self.layers = [
                self._layer(lw, live.sites if live and i in live.layer_ids else [])
                for i, lw in enumerate(w.layers)
            ]
        shape = (len(self.layers), w.kv_heads, w.max_tokens, w.head_dim)
        self.keys = torch.zeros(shape, dtype=act, device=w.device)
        self.values = torch.zeros(shape, dtype=act, device=w.device)
        self.pos = 0
        self._version = 0
        self._rotation: tuple | None = None  # (R^T, x, x R) of the last rotation
        # a strategy that reads the block input (a predictor's look-ahead) gets it every step
        self._observed = live is not None and any(s == BLOCK_INPUT for s, _ in live.taps)
        self._neurons = torch.empty(self.d_ff)  # the MLP's shape, to ask for such a set
        if live is not None:
            self._bases()
        self.fused = None
        self.fuse = fuse
        self._fused_kept = None
        self._fused_steps = 0
        self._fuse()

    @property
    def backend(self) -> str:
        return self.k.name + (" (fused step)" if self.fused is not None else "")

    def _fuse(self) -> None:
        """Run whole steps natively when every sparsified site is a rule or a compact MLP (a
        rotated input shared by its sites, a low-rank path on an input-sparse site)."""
        from moyu_exp.kernels.fused import ROTATED, FusedStep

        if self.k.name != "native" or not self.fuse:
            return
        self.flush()
        self.fused = None
        if not self.w.plain:  # blocks with extras run through the Python step
            return
        rules, lowrank, scorers = {}, {}, {}
        for i, layer in enumerate(self.layers):
            if not self._fusable(i, layer, ROTATED):
                return
            scorer = self.live.scorer(i) if layer.sites else None
            if scorer is not None:
                scorers[i] = scorer
            for site in layer.sites:
                rule = self.live.kernel_rule(site, i)
                compact_site = site in ("mlp_intermediate", "gate_act") and layer.compact
                predicted = site == "mlp_intermediate" and scorer is not None
                if rule is None and not compact_site and not predicted:
                    return
                if rule is not None:
                    rules[(site, i)] = rule
                factors = self.live.lowrank(site, i)
                if factors is not None:
                    lowrank[(site, i)] = factors
        self.fused = FusedStep(self, rules, lowrank, scorers)
        with torch.inference_mode(False):  # counters updated both in and out of inference mode
            self._fused_kept = torch.zeros(len(self.layers), len(SITES), dtype=torch.int64)
        self._fused_steps = 0

    def _fusable(self, i: int, layer: Layer, rotated: dict[str, tuple[str, ...]]) -> bool:
        """Whether the native step has a path for this layer's sites: the sites it knows, one
        basis per rotated input, low-rank paths only on input-sparse sites of the full MLP,
        per-projection gate/up sites without a sparse activation."""
        sites = layer.sites
        if not sites <= set(SITES) or ("gate_act" in sites and sites & set(GATE_UP_SITES)):
            return False
        for group in rotated.values():
            bases = {id(layer.t[f"basis:{s}"]) for s in group if f"basis:{s}" in layer.t}
            if len(bases) > 1:
                return False
        grouped = {s for group in rotated.values() for s in group}
        if any(key.startswith("basis:") and key[6:] not in grouped for key in layer.t):
            return False
        low = [s for s in sites if self.live.lowrank(s, i) is not None]
        return not (
            "gate_act" in low or (layer.compact and {"mlp_input", "mlp_intermediate"} & set(low))
        )

    def flush(self) -> None:
        """Write the fused steps' kept counts into the meter (and start over)."""
        if self._fused_kept is None or not self._fused_steps:
            return
        if self.live is not None:
            counts = self._fused_kept.tolist()
            for i, layer in enumerate(self.layers):
                for j, site in enumerate(SITES):
                    if site in layer.sites or (layer.compact and site == "mlp_intermediate"):
                        dim = self._site_dim(site)
                        dropped = dim * self._fused_steps - counts[i][j]
                        self.live.meter.add(site, i, dropped, self._fused_steps, 0)
        self._fused_kept.zero_()
        self._fused_steps = 0

    def _qkv_rows(self) -> tuple[slice, slice, slice]:
        w = self.w
        d_q, d_kv = w.heads * w.head_dim, w.kv_heads * w.head_dim
        return slice(0, d_q), slice(d_q, d_q + d_kv), slice(d_q + d_kv, d_q + 2 * d_kv)

    def _gate_up_rows(self) -> tuple[slice, slice]:
        return slice(0, self.d_ff), slice(self.d_ff, 2 * self.d_ff)

    def _site_dim(self, site: str) -> int:
        if site in ("attn_input", "mlp_input", *QKV_SITES, *GATE_UP_SITES):
            return self.d
        return self.w.heads * self.w.head_dim if site == "o_proj_input" else self.d_ff

    def _count(self, site: str, layer: int, dropped: int) -> None:
        if self.live is not None:
            self.live.meter.add(site, layer, dropped, 1, 0)

    # ---------------------------------------------------------------------------- layout
    def _layer(self, w: LayerWeights, sites) -> Layer:
        layer = Layer(w=w, sites=set(sites))
        for site, rows in zip(QKV_SITES, self._qkv_rows(), strict=True):
            if site in layer.sites:
                layer.t[site] = w.qkv[rows].t().contiguous()
        for site in ("attn_input", "o_proj_input"):
            if site in layer.sites:
                layer.t[site] = getattr(w, INPUT_SITES[site]).t().contiguous()
        # the MLP's copies wait for the prefill: a layer whose MLP is then compacted reads the
        # compact MLP instead (see _compact_mlps)
        return layer

    def _full_mlp_t(self, layer: Layer) -> None:
        """The transposed copies a layer's MLP reads when it runs without a compact MLP, built
        when first needed: gate_up^T for an input-sparse MLP (gate only under gate_act: up is
        then read by rows, for the kept neurons), down^T for a sparse intermediate."""
        if "mlp_input" in layer.sites and "mlp_input" not in layer.t:
            gate_up = layer.w.gate_up
            weight = gate_up[: self.d_ff] if "gate_act" in layer.sites else gate_up
            layer.t["mlp_input"] = weight.t().contiguous()
        for site, rows in zip(GATE_UP_SITES, self._gate_up_rows(), strict=True):
            if site in layer.sites and site not in layer.t:
                layer.t[site] = layer.w.gate_up[rows].t().contiguous()
        if layer.sites & {"gate_act", "mlp_intermediate"} and "down" not in layer.t:
            layer.t["down"] = layer.w.down.t().contiguous()

    def _bases(self) -> None:
        """R^T of every rotated site (its readers' weights already read x R), one copy per
        distinct R: sites that share a basis (q, k and v under WINA) share it, and a step
        rotates their input once (:meth:`_rotate`)."""
        copies: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            for site in layer.sites:
                basis = self.live.basis(site, i)
                if basis is not None:
                    if id(basis) not in copies:
                        copies[id(basis)] = basis.t().to(self.w.dtype).contiguous()
                    layer.t[f"basis:{site}"] = copies[id(basis)]

    # ---------------------------------------------------------------------------- running
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt through the model (hooks and all) and take over its KV cache."""
        from moyu_exp.decode import cache_kwarg

        out = self.model(ids.to(self.w.device), use_cache=True)
        cache = getattr(out, cache_kwarg(self.model))
        tokens = ids.shape[1]
        for i, (keys, values) in enumerate(self.w.adapter.prefill_cache(cache)):
            held = keys.shape[2]  # a sliding-window layer holds only its last keys
            self.keys[i, :, tokens - held : tokens] = keys[0].to(self.keys.dtype)
            self.values[i, :, tokens - held : tokens] = values[0].to(self.values.dtype)
        self.pos = tokens
        if self.live is not None:
            self._compact_mlps()
            if self.k.name == "native":
                self._fuse()  # compact MLPs may make the step fusable, or change its pointers
        return out.logits[0, -1]

    def rewind(self, position: int) -> None:
        """Decode again from ``position`` (the KV cache before it is kept)."""
        self.flush()
        self.pos = position

    @torch.inference_mode()
    def _compact_mlps(self) -> None:
        """Gather the MLP of a decode-time neuron set known in advance, once per prompt (and
        again when a strategy re-selects it: then only the neurons that changed are swapped)."""
        self._version = self.live.decode_version()
        for i, layer in enumerate(self.layers):
            keep = self.live.decode_neurons(i) if layer.sites else None
            if keep is None:
                if layer.compact is not None:  # kept for the next set (a refresh step)
                    layer.parked = (layer.compact, layer.compact_t, layer.slots)
                layer.compact = layer.compact_t = layer.slots = None
                self._full_mlp_t(layer)  # kept once built (CLADA's refresh steps come back)
                continue
            if layer.compact is None and layer.parked is not None:
                layer.compact, layer.compact_t, layer.slots = layer.parked
            layer.parked = None
            idx = keep.nonzero().view(-1).to(self.w.device)
            if layer.slots is not None and layer.slots.numel() == idx.numel():
                self._swap(layer, idx)
            else:
                self._gather(layer, idx)

    def _gather(self, layer: Layer, idx: torch.Tensor) -> None:
        gate_up = torch.cat([layer.w.gate_up[idx], layer.w.gate_up[self.d_ff + idx]])
        layer.compact = (gate_up, layer.w.down.index_select(1, idx).contiguous())
        # a per-token rule on the MLP input reads the kept rows' columns of its kept entries
        layer.compact_t = gate_up.t().contiguous() if "mlp_input" in layer.sites else None
        layer.slots = idx.clone()

    def _swap(self, layer: Layer, idx: torch.Tensor) -> None:
        """A set of the same size, in place: each neuron it drops gives its slot (gate and up
        rows, down column) to one it adds; the rest is not copied again."""
        slots, k = layer.slots, layer.slots.numel()
        free = (~torch.isin(slots, idx)).nonzero().view(-1)
        if free.numel() == 0:
            return
        entering = idx[~torch.isin(idx, slots)]
        (gate_up, down), w = layer.compact, layer.w
        rows = torch.cat([free, k + free])
        gate_up[rows] = w.gate_up[torch.cat([entering, self.d_ff + entering])]
        down[:, free] = w.down[:, entering]
        if layer.compact_t is not None:
            layer.compact_t[:, rows] = gate_up[rows].t()
        slots[free] = entering

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """One greedy decode step for ``token`` at the next position: the next-token logits."""
        if self.pos >= self.max_tokens:
            raise RuntimeError(f"the decoder's KV cache holds {self.max_tokens} tokens")
        if self.live is not None:
            self.live.begin_decode_step()
            if self.live.decode_version() != self._version:
                self._regather()
        logits = self._step(token)
        if self.live is not None:
            self.live.end_decode_step(token, logits)
        return logits

    def _regather(self) -> None:
        """The strategy changed its decode-time sets: gather the compact MLPs again."""
        self._compact_mlps()
        if self.k.name == "native":
            self._fuse()

    def _step(self, token: int) -> torch.Tensor:
        if self.fused is not None:
            logits, kept = self.fused(token, self.pos)
            self._fused_kept += kept
            self._fused_steps += 1
            self.pos += 1
            return logits.clone()
        k, pos, w = self.k, self.pos, self.w
        h = w.embed[token].to(k.dtype)
        if w.embed_scale is not None:  # scaled embeddings (in the weights' dtype)
            h = (w.embed[token] * w.embed_scale).to(k.dtype)
        for i, layer in enumerate(self.layers):
            lw = layer.w
            cos, sin = w.rope[lw.rope]
            if self._observed:
                self.live.observe(BLOCK_INPUT, i, h)
            n = k.norm(h, lw.ln1, w.eps)
            qkv = self._qkv(i, layer, n)
            if lw.qkv_bias is not None:
                qkv = qkv + lw.qkv_bias
            if lw.q_norm is not None:
                qkv = self._qk_norms(lw, qkv)
            attn = k.attend(
                qkv,
                self.keys[i],
                self.values[i],
                pos,
                cos[pos],
                sin[pos],
                w.heads,
                w.kv_heads,
                w.head_dim,
                self.scale,
                lw.window,
            )
            out = self._linear(i, layer, "o_proj_input", attn)
            h = h + (out if lw.post1 is None else k.norm(out, lw.post1, w.eps))
            n = k.norm(h, lw.ln2, w.eps)
            out = self._mlp(i, layer, n)
            h = h + (out if lw.post2 is None else k.norm(out, lw.post2, w.eps))
        logits = k.linear(w.head, k.norm(h, w.norm, w.eps))
        self.pos += 1
        return logits

    def _qk_norms(self, lw: LayerWeights, qkv: torch.Tensor) -> torch.Tensor:
        """The per-head RMSNorm of q and k (before RoPE), where the block has one."""
        w = self.w
        d_q, d_kv = w.heads * w.head_dim, w.kv_heads * w.head_dim
        norm = torch.nn.functional.rms_norm  # per head (the native norm is over the whole row)
        q = norm(qkv[:d_q].view(w.heads, w.head_dim), (w.head_dim,), lw.q_norm, w.eps)
        key = norm(
            qkv[d_q : d_q + d_kv].view(w.kv_heads, w.head_dim), (w.head_dim,), lw.k_norm, w.eps
        )
        return torch.cat([q.reshape(-1), key.reshape(-1), qkv[d_q + d_kv :]])

    def _act_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """act(gate) * up of a fused gate/up product."""
        if self.w.act == "silu":
            return self.k.silu_mul(gate_up)
        gate, up = gate_up.chunk(2)
        return self._act(gate) * up

    def _act(self, gate: torch.Tensor) -> torch.Tensor:
        if self.w.act == "silu":
            return torch.nn.functional.silu(gate)
        return torch.nn.functional.gelu(gate, approximate="tanh")

    def _qkv(self, i: int, layer: Layer, n: torch.Tensor) -> torch.Tensor:
        """q, k and v of the step: one input-sparse product when the shared input is a site,
        one per projection when some projection has its own site."""
        if not layer.sites & set(QKV_SITES):
            return self._linear(i, layer, "attn_input", n)
        parts = []
        for site, rows in zip(QKV_SITES, self._qkv_rows(), strict=True):
            if site in layer.sites:
                parts.append(self._sparse_input(i, layer, site, n))
            else:
                parts.append(self.k.linear(layer.w.qkv[rows], n))
        return torch.cat(parts)

    def _sparse_input(
        self, i: int, layer: Layer, site: str, x: torch.Tensor, weight_t=None
    ) -> torch.Tensor:
        """The product reading ``x`` through the rows of W^T (``weight_t``: the site's own, or a
        compact MLP's) its kept entries select (plus the dropped entries' low-rank path, for a
        strategy that has one)."""
        if weight_t is None:
            weight_t = layer.t["down" if site == "mlp_intermediate" else site]
        basis_t = layer.t.get(f"basis:{site}")
        if basis_t is not None:  # the site's input in the strategy's basis (x R)
            x = self._rotate(basis_t, x)
        rule = self.live.kernel_rule(site, i)
        factors = self.live.lowrank(site, i)
        if rule is not None and factors is None:
            out, kept = self.k.sparse_in_rule(weight_t, rule, x)
        else:  # the mask itself is needed (a keep-mask, or the dropped entries' low-rank path)
            mask = self.live.kept(site, i, x)
            out, kept = self.k.sparse_in(weight_t, mask, x)
        self._count(site, i, x.numel() - kept)
        if factors is not None:
            v, us = factors
            dropped = x.masked_fill(mask, 0.0)
            out = out + us.to(x.dtype) @ (dropped @ v.to(x.dtype))
        return out

    def _rotate(self, basis_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x R, computed once for the sites that read the same ``x`` in the same basis."""
        last = self._rotation
        if last is None or last[0] is not basis_t or last[1] is not x:
            last = self._rotation = (basis_t, x, self.k.linear(basis_t, x))
        return last[2]

    def _linear(self, i: int, layer: Layer, site: str, x: torch.Tensor) -> torch.Tensor:
        """The projection reading ``x``; input-sparse when the strategy sparsifies this site."""
        if site not in layer.sites:
            return self.k.linear(getattr(layer.w, INPUT_SITES[site]), x)
        return self._sparse_input(i, layer, site, x)

    def _mlp(self, i: int, layer: Layer, n: torch.Tensor) -> torch.Tensor:
        """The MLP output."""
        k, d_ff, w = self.k, self.d_ff, layer.w
        if layer.compact is not None:
            gate_up, down = layer.compact
            if layer.compact_t is not None:
                gu = self._sparse_input(i, layer, "mlp_input", n, layer.compact_t)
            else:
                gu = k.linear(gate_up, n)
            z = self._act_mul(gu)
            self._count("mlp_intermediate", i, d_ff - z.numel())
            return k.linear(down, z)
        if "mlp_intermediate" in layer.sites and self.live.strategy.masks_from_elsewhere:
            # a neuron set known before the MLP (a predictor's): the kept gate and up rows, then
            # the kept rows of down^T
            mask = self.live.kept("mlp_intermediate", i, self._neurons)
            gate = k.rows_masked(w.gate_up[:d_ff], mask, n)
            up = k.rows_masked(w.gate_up[d_ff:], mask, n)
            out, kept = k.sparse_in(layer.t["down"], mask, self._act(gate) * up)
            self._count("mlp_intermediate", i, d_ff - kept)
            return out
        if "gate_act" in layer.sites:
            if "mlp_input" in layer.sites:
                mask = self.live.kept("mlp_input", i, n)
                gate, kept = k.sparse_in(layer.t["mlp_input"], mask, n)
                self._count("mlp_input", i, n.numel() - kept)
            else:
                gate = k.linear(w.gate_up[:d_ff], n)
            rule = self.live.kernel_rule("gate_act", i)
            if rule is not None and self.w.act == "silu":  # the native rule fuses SiLU
                out, kept = k.gated_rule(w.gate_up[d_ff:], layer.t["down"], gate, n, rule)
            else:
                act = self._act(gate)
                mask = self.live.kept("gate_act", i, act)
                up = k.rows_masked(w.gate_up[d_ff:], mask, n)
                out, kept = k.sparse_in(layer.t["down"], mask, act * up)
            self._count("gate_act", i, d_ff - kept)
            return out
        if layer.sites & set(GATE_UP_SITES):  # gate and up each read their own kept inputs
            gate, up = (
                self._sparse_input(i, layer, site, n)
                if site in layer.sites
                else k.linear(w.gate_up[rows], n)
                for site, rows in zip(GATE_UP_SITES, self._gate_up_rows(), strict=True)
            )
            z = self._act(gate) * up
        else:
            z = self._act_mul(self._linear(i, layer, "mlp_input", n))
        if "mlp_intermediate" not in layer.sites:
            return k.linear(w.down, z)
        return self._sparse_input(i, layer, "mlp_intermediate", z)
