"""A lean batch-1 greedy decoder for LLaMA-style models that runs the sparse kernels.

Why not the model's own forward: at batch 1 a generic forward spends most of its time in Python
and dispatch (about 75 ms per token for SmolLM2 on this CPU, for ~540 MB of fp32 weights), so
reading fewer weights would hardly show. A decode step here is a handful of kernel calls per
layer (:mod:`moyu_exp.kernels.ops`): fused q/k/v and gate/up weights, a preallocated (static)
KV cache, RMSNorm, one attention call. The prompt is prefilled by the model itself (with the
strategy's hooks, exactly as in simulated mode) and its KV cache copied over.

The strategy decides what is active, never this module: at every sparsified site of a decode
step the decoder asks the strategy for the mask of kept entries (:meth:`Strategy.kept`) and
the kernels read only the weights those entries need (input-sparse: rows of W^T; output-sparse:
rows of W). For methods whose decode-time neuron set is known in advance (sequence-level
methods after the prompt, the static set) a compact MLP is gathered once per prompt. Weight
layouts (fused and transposed copies) are prepared once, on construction. The weight bytes
each step reads are counted (LM head and the embedding row included).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moyu_exp.errors import ConfigError
from moyu_exp.kernels.ops import kernels_for
from moyu_exp.lazy import lazy_import

torch = lazy_import("torch")

SUPPORTED = ("llama", "mistral", "qwen2")
INPUT_SITES = {"attn_input": "qkv", "o_proj_input": "o", "mlp_input": "gate_up"}


@dataclass
class Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: torch.Tensor  # (d_q + 2 d_kv, d)
    o: torch.Tensor  # (d, d_q)
    gate_up: torch.Tensor  # (2 d_ff, d)
    down: torch.Tensor  # (d, d_ff)
    sites: set[str] = field(default_factory=set)
    t: dict[str, torch.Tensor] = field(default_factory=dict)  # transposed copies
    compact: tuple[torch.Tensor, torch.Tensor] | None = None  # (gate_up rows, down columns)


class LeanDecoder:
    def __init__(self, model, live=None, max_tokens: int = 4096, fuse: bool = True):
        config = model.config
        if config.model_type not in SUPPORTED:
            raise ConfigError(
                f"bench.mode=kernel supports model types {', '.join(SUPPORTED)}, "
                f"not '{config.model_type}'"
            )
        if live is not None and not live.kernel_support:
            raise ConfigError(
                f"strategy '{live.name}' has no kernel path: use bench.mode=simulated"
            )
        self.model, self.live = model, live
        self.d, self.d_ff = config.hidden_size, config.intermediate_size
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or self.d // self.heads
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        self.max_tokens = max_tokens
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        widest = max(2 * self.d_ff, self.d, config.vocab_size)
        self.k = kernels_for(self.device, self.dtype, max_tokens, widest)
        act = self.k.dtype  # activations (fp32 for the native kernels)
        with torch.no_grad():
            self.layers = [
                self._layer(block, live.sites if live and i in live.layer_ids else [])
                for i, block in enumerate(model.model.layers)
            ]
            self.embed = model.model.embed_tokens.weight
            self.norm = model.model.norm.weight.to(act).contiguous()
            self.head = model.lm_head.weight.clone()
            positions = torch.arange(max_tokens, device=self.device)[None]
            probe = torch.zeros(1, 1, self.d, dtype=self.dtype, device=self.device)
            cos, sin = model.model.rotary_emb(probe, positions)
            self.cos = cos[0].to(act).contiguous()  # (max_tokens, head_dim)
            self.sin = sin[0].to(act).contiguous()
        shape = (config.num_hidden_layers, self.kv_heads, max_tokens, self.head_dim)
        self.keys = torch.zeros(shape, dtype=act, device=self.device)
        self.values = torch.zeros(shape, dtype=act, device=self.device)
        self.pos = 0
        self.esize = self.head.element_size()
        self.bytes_read = 0
        self.steps = 0
        self._python_steps = 0
        self.fused = None
        self._fused_kept = None
        self.fuse = fuse
        self._fuse()

    @property
    def backend(self) -> str:
        return self.k.name + (" (fused step)" if self.fused is not None else "")

    def _fuse(self) -> None:
        """Run whole steps natively when every sparsified site is a rule or a compact MLP."""
        from moyu_exp.kernels.fused import SITES, FusedStep

        if self.k.name != "native" or not self.fuse:
            return
        rules = {}
        for i, layer in enumerate(self.layers):
            for site in layer.sites:
                rule = self.live.kernel_rule(site, i)
                compact_site = site in ("mlp_intermediate", "gate_act") and layer.compact
                if rule is None and not compact_site:
                    self.fused = None
                    return
                if rule is not None:
                    rules[(site, i)] = rule
        self.fused = FusedStep(self, rules)
        with torch.inference_mode(False):  # counters updated both in and out of inference mode
            self._fused_kept = torch.zeros(len(self.layers), len(SITES), dtype=torch.int64)
            self._bytes_kept = torch.zeros_like(self._fused_kept)
        self._fused_steps = 0
        self._costs = self._fused_costs()

    def flush_stats(self) -> None:
        """Hand the fused steps' kept counts to the strategy's stats (and start over)."""
        from moyu_exp.kernels.fused import SITES

        if self._fused_kept is None or self.live is None:
            return
        counts = self._fused_kept.tolist()
        for i, layer in enumerate(self.layers):
            for j, site in enumerate(SITES):
                sparse = site in layer.sites or (layer.compact and site == "mlp_intermediate")
                if sparse and self._fused_steps:
                    dim = self._site_dim(site)
                    total = dim * self._fused_steps
                    self.live.count_decode(site, i, total - counts[i][j], total)
        self._fused_kept.zero_()
        self._fused_steps = 0

    def _site_dim(self, site: str) -> int:
        return {
            "attn_input": self.d,
            "o_proj_input": self.heads * self.head_dim,
            "mlp_input": self.d,
        }.get(site, self.d_ff)

    # ---------------------------------------------------------------------------- layout
    def _layer(self, block, sites) -> Layer:
        attn, mlp, act = block.self_attn, block.mlp, self.k.dtype
        layer = Layer(
            ln1=block.input_layernorm.weight.to(act).contiguous(),
            ln2=block.post_attention_layernorm.weight.to(act).contiguous(),
            qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
            o=attn.o_proj.weight.clone(),
            gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            down=mlp.down_proj.weight.clone(),
            sites=set(sites),
        )
        for site, name in INPUT_SITES.items():
            if site in layer.sites:
                weight = getattr(layer, name)
                if site == "mlp_input" and "gate_act" in layer.sites:
                    weight = weight[: self.d_ff]  # up is then read by rows, for kept neurons
                layer.t[site] = weight.t().contiguous()
        if layer.sites & {"gate_act", "mlp_intermediate"}:
            layer.t["down"] = layer.down.t().contiguous()
        return layer

    def dense_bytes(self) -> int:
        """Weight bytes a dense decode step reads (all linears, LM head, one embedding row)."""
        linears = sum(
            w.numel()
            for layer in self.layers
            for w in (layer.qkv, layer.o, layer.gate_up, layer.down)
        )
        return self.esize * (linears + self.head.numel() + self.d)

    def bytes_per_token(self) -> float:
        """Mean weight bytes read per decode step so far."""
        total = self.bytes_read
        if self.fused is not None:
            fixed, per_kept = self._costs
            steps = self.steps - self._python_steps
            total += self.esize * (steps * fixed + float((self._bytes_kept * per_kept).sum()))
        return total / max(1, self.steps)

    def reset_counters(self) -> None:
        """Start bytes and step counting afresh (e.g. after a warm-up)."""
        self.bytes_read = self.steps = self._python_steps = 0
        if self.fused is not None:
            self._bytes_kept.zero_()
            self.flush_stats()

    # ---------------------------------------------------------------------------- running
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt through the model (hooks and all) and take over its KV cache."""
        from moyu_exp.bench import cache_kwarg

        out = self.model(ids.to(self.device), use_cache=True)
        cache = getattr(out, cache_kwarg(self.model))
        tokens = ids.shape[1]
        for i, layer_cache in enumerate(cache.layers):
            self.keys[i, :, :tokens] = layer_cache.keys[0].to(self.keys.dtype)
            self.values[i, :, :tokens] = layer_cache.values[0].to(self.values.dtype)
        self.pos = tokens
        self._compact_mlps()
        if self.live is not None and self.k.name == "native":
            self._fuse()  # compact MLPs may make the step fusable, or change its pointers
        return out.logits[0, -1]

    def _compact_mlps(self) -> None:
        """Gather the MLP of a decode-time neuron set known in advance, once per prompt."""
        for i, layer in enumerate(self.layers):
            keep = self.live.decode_neurons(i) if layer.sites else None
            if keep is None:
                layer.compact = None
                continue
            idx = keep.nonzero().view(-1).to(self.device)
            gate_up = torch.cat([layer.gate_up[idx], layer.gate_up[self.d_ff + idx]])
            layer.compact = (gate_up, layer.down.index_select(1, idx).contiguous())

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """One greedy decode step for ``token`` at the next position: the next-token logits."""
        if self.pos >= self.max_tokens:
            raise RuntimeError(f"the decoder's KV cache holds {self.max_tokens} tokens")
        if self.fused is not None:
            return self._fused_step(token)
        k, pos = self.k, self.pos
        if self.live is not None:
            self.live.begin_decode_step()
        cos, sin = self.cos[pos], self.sin[pos]
        h = self.embed[token].to(k.dtype)
        read = self.d
        for i, layer in enumerate(self.layers):
            n = k.norm(h, layer.ln1, self.eps)
            qkv, used = self._linear(i, layer, "attn_input", n)
            attn = k.attend(
                qkv,
                self.keys[i],
                self.values[i],
                pos,
                cos,
                sin,
                self.heads,
                self.kv_heads,
                self.head_dim,
                self.scale,
            )
            out, used_o = self._linear(i, layer, "o_proj_input", attn)
            h = h + out
            n = k.norm(h, layer.ln2, self.eps)
            out, used_mlp = self._mlp(i, layer, n)
            h = h + out
            read += used + used_o + used_mlp
        logits = k.linear(self.head, k.norm(h, self.norm, self.eps))
        self.bytes_read += (read + self.head.numel()) * self.esize
        self.steps += 1
        self._python_steps += 1
        self.pos += 1
        return logits

    def _fused_step(self, token: int) -> torch.Tensor:
        if self.live is not None:
            self.live.begin_decode_step()
        logits, kept = self.fused(token, self.pos)
        self._fused_kept += kept
        self._bytes_kept += kept
        self._fused_steps += 1
        self.steps += 1
        self.pos += 1
        return logits.clone()

    def _fused_costs(self):
        """Weight elements of a fused step: a fixed part, and per kept entry of each
        (layer, site) the elements it brings in."""
        from moyu_exp.kernels.fused import SITES

        fixed = self.d + self.head.numel()
        per_kept = torch.zeros(len(self.layers), len(SITES), dtype=torch.float64)
        for i, layer in enumerate(self.layers):
            sites, col = layer.sites, {site: j for j, site in enumerate(SITES)}
            for site, name in INPUT_SITES.items():
                weight = getattr(layer, name)
                gate_only = site == "mlp_input" and "gate_act" in sites  # up is read by rows
                rows = self.d_ff if gate_only else weight.shape[0]
                if site in sites:
                    per_kept[i, col[site]] = rows
                else:
                    fixed += rows * weight.shape[1]
            if layer.compact is not None:
                fixed += layer.compact[0].numel() + layer.compact[1].numel()
                fixed -= 2 * self.d_ff * self.d  # gate/up were counted above
            elif "gate_act" in sites:
                per_kept[i, col["gate_act"]] = 2 * self.d  # an up row and a down column
            elif "mlp_intermediate" in sites:
                per_kept[i, col["mlp_intermediate"]] = self.d
            else:
                fixed += layer.down.numel()
        return fixed, per_kept

    def _linear(self, i: int, layer: Layer, site: str, x: torch.Tensor):
        """The projection reading ``x``; input-sparse when the strategy sparsifies this site.
        Returns (output, weight elements read)."""
        weight = getattr(layer, INPUT_SITES[site])
        if site not in layer.sites:
            return self.k.linear(weight, x), weight.numel()
        rule = self.live.kernel_rule(site, i)
        if rule is not None:
            out, kept = self.k.sparse_in_rule(layer.t[site], rule, x)
        else:
            out, kept = self.k.sparse_in(layer.t[site], self._kept(site, i, x), x)
        self.live.count_decode(site, i, x.numel() - kept, x.numel())
        return out, kept * weight.shape[0]

    def _mlp(self, i: int, layer: Layer, n: torch.Tensor):
        """The MLP output and the number of weight elements it read."""
        k, d_ff, d = self.k, self.d_ff, self.d
        if layer.compact is not None:
            gate_up, down = layer.compact
            z = k.silu_mul(k.linear(gate_up, n))
            self.live.count_decode("mlp_intermediate", i, d_ff - z.numel(), d_ff)
            return k.linear(down, z), gate_up.numel() + down.numel()
        if "gate_act" in layer.sites:
            if "mlp_input" in layer.sites:
                gate, kept = k.sparse_in(layer.t["mlp_input"], self._kept("mlp_input", i, n), n)
                self.live.count_decode("mlp_input", i, d - kept, d)
                read = kept * d_ff
            else:
                gate, read = k.linear(layer.gate_up[:d_ff], n), d_ff * d
            rule = self.live.kernel_rule("gate_act", i)
            if rule is not None:
                out, kept = k.gated_rule(layer.gate_up[d_ff:], layer.t["down"], gate, n, rule)
            else:
                act = torch.nn.functional.silu(gate)
                mask = self._kept("gate_act", i, act)
                up = k.rows_masked(layer.gate_up[d_ff:], mask, n)
                out, kept = k.sparse_in(layer.t["down"], mask, act * up)
            self.live.count_decode("gate_act", i, d_ff - kept, d_ff)
            return out, read + kept * d * 2  # the kept up rows and down columns
        gate_up, read = self._linear(i, layer, "mlp_input", n)
        z = k.silu_mul(gate_up)
        if "mlp_intermediate" not in layer.sites:
            return k.linear(layer.down, z), read + layer.down.numel()
        rule = self.live.kernel_rule("mlp_intermediate", i)
        if rule is not None:
            out, kept = k.sparse_in_rule(layer.t["down"], rule, z)
        else:
            out, kept = k.sparse_in(layer.t["down"], self._kept("mlp_intermediate", i, z), z)
        self.live.count_decode("mlp_intermediate", i, d_ff - kept, d_ff)
        return out, read + kept * d

    def _kept(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.live.kept(site, layer, x)
