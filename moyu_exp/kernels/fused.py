"""A whole decode step as one native call, for strategies whose kept sets are rules.

When every sparsified site of every layer is a :class:`KernelRule` (or the MLP is a compact
gather), nothing needs Python between the layers, and the per-call cost of a step's hundred-odd
kernel calls (about 3 ms per SmolLM2 token on this CPU) disappears. The structures below mirror
``LayerSpec``/``ModelSpec`` in ``csrc/sparse_gemv.c``; the tensors they point into are kept
alive by this object.
"""

from __future__ import annotations

import ctypes

from moyu_exp.lazy import lazy_import

torch = lazy_import("torch")

SITES = (
    "attn_input",
    "o_proj_input",
    "mlp_input",
    "gate_act",
    "mlp_intermediate",
    "q_input",
    "k_input",
    "v_input",
    "gate_input",
    "up_input",
)
PROJECTIONS = ("q_input", "k_input", "v_input", "gate_input", "up_input")  # LayerSpec.proj_t
ROTATED = {"rot_attn": ("attn_input", *PROJECTIONS[:3]), "rot_mlp": ("mlp_input", *PROJECTIONS[3:])}
P, I64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class Rule(ctypes.Structure):
    _fields_ = [
        ("scale", P),
        ("thresholds", P),
        ("threshold", F32),
        ("k", I64),
        ("active", I64),
        ("lr_vt", P),  # the dropped entries' low-rank path: V^T and US (R-Sparse)
        ("lr_us", P),
        ("rank", I64),
    ]


class LayerSpec(ctypes.Structure):
    _fields_ = [
        *[
            (name, P)
            for name in (
                "ln1",
                "ln2",
                "qkv",
                "o",
                "gate_up",
                "down",
                "qkv_t",
                "o_t",
                "gate_up_t",
                "down_t",
                "c_gate_up",
                "c_down",
                "c_gate_up_t",
            )
        ],
        ("c_kept", I64),
        ("keys", P),
        ("values", P),
        ("rules", Rule * len(SITES)),
        ("proj_t", P * len(PROJECTIONS)),
        ("rot_attn", P),
        ("rot_mlp", P),
        ("p_w1", P),  # a learned predictor of the MLP's neurons: W1, W2 and the count kept
        ("p_w2", P),
        ("p_rank", I64),
        ("p_k", I64),
    ]


class ModelSpec(ctypes.Structure):
    _fields_ = [
        *[
            (name, I64)
            for name in ("layers", "d", "d_ff", "heads", "kv", "head_dim", "max_tokens", "vocab")
        ],
        ("eps", F32),
        ("scale", F32),
        *[
            (name, P)
            for name in (
                "embed",
                "head",
                "norm",
                "cos",
                "sin",
                "layer",
                "h",
                "n",
                "qkv",
                "attn",
                "gu",
                "z",
                "out",
                "scores",
                "work",
                "upv",
                "acc",
                "list",
                "xr",
                "xd",
                "lr",
                "pred",
                "plist",
            )
        ],
    ]


def _ptr(tensor) -> int | None:
    return None if tensor is None else tensor.data_ptr()


class FusedStep:
    """Runs :class:`~moyu_exp.kernels.decoder.LeanDecoder` steps in one native call each."""

    def __init__(
        self,
        decoder,
        rules: dict[tuple[str, int], object],
        lowrank: dict[tuple[str, int], tuple] | None = None,
        scorers: dict[int, tuple] | None = None,
    ):
        self.decoder = decoder
        w = decoder.w
        # the dropped entries' low-rank paths (V (d_in, r), US (d_out, r)) as V^T and US
        self.lowrank = {
            key: (v.t().to(w.dtype).contiguous(), us.to(w.dtype).contiguous())
            for key, (v, us) in (lowrank or {}).items()
        }
        # learned predictors' scorers (W1 (r, d), W2 (d_ff, r), k) per layer
        self.scorers = {
            i: (w1.to(w.dtype).contiguous(), w2.to(w.dtype).contiguous(), k)
            for i, (w1, w2, k) in (scorers or {}).items()
        }
        rank = max(
            [v.shape[0] for v, _ in self.lowrank.values()]
            + [w1.shape[0] for w1, _, _ in self.scorers.values()],
            default=0,
        )
        lib = decoder.k.typed
        suffix = {torch.float32: "f32", torch.bfloat16: "bf16"}[w.head.dtype]
        self.fn = getattr(lib.lib, f"decode_step_{suffix}")
        self.fn.argtypes = [ctypes.POINTER(ModelSpec), I64, I64, P, P]
        self.fn.restype = None
        self.rules = rules
        self.layers = (LayerSpec * len(decoder.layers))()
        self.refresh()
        d, d_ff = w.d, w.d_ff
        threads = max(1, torch.get_num_threads())
        qkv = (w.heads + 2 * w.kv_heads) * w.head_dim
        widest = max(d, 2 * d_ff, w.heads * w.head_dim, qkv)
        stride = (widest + 15) // 16 * 16
        scratch = {
            "h": d,
            "n": d,
            "qkv": qkv,
            "attn": w.heads * w.head_dim,
            "gu": 2 * d_ff,
            "z": d_ff,
            "out": widest,
            "scores": threads * w.max_tokens,
            "work": 4 * max(d, d_ff) + 2048,  # + select_entries' histogram
            "upv": d_ff,
            "acc": (threads + 1) * stride,
            "xr": d,  # a rotated input
            "xd": max(d, d_ff, w.heads * w.head_dim),  # an input's dropped entries
            "lr": rank + widest,
            "pred": d_ff,
        }
        self.buffers = {k: torch.zeros(v, dtype=torch.float32) for k, v in scratch.items()}
        self.buffers["list"] = torch.zeros(max(d, d_ff, widest), dtype=torch.int64)
        self.buffers["plist"] = torch.zeros(d_ff, dtype=torch.int64)
        self.kept = torch.zeros(len(decoder.layers), len(SITES), dtype=torch.int64)
        self.logits = torch.empty(w.head.shape[0], dtype=torch.float32)
        self.model = ModelSpec(
            layers=len(decoder.layers),
            d=d,
            d_ff=d_ff,
            heads=w.heads,
            kv=w.kv_heads,
            head_dim=w.head_dim,
            max_tokens=w.max_tokens,
            vocab=w.head.shape[0],
            eps=w.eps,
            scale=decoder.scale,
            embed=w.embed.data_ptr(),
            head=w.head.data_ptr(),
            norm=w.norm.data_ptr(),
            cos=w.cos.data_ptr(),
            sin=w.sin.data_ptr(),
            layer=ctypes.cast(self.layers, P),
            **{name: buffer.data_ptr() for name, buffer in self.buffers.items()},
        )

    def refresh(self) -> None:
        """(Re)describe every layer: after a prefill the compact MLPs may have changed."""
        decoder = self.decoder
        for i, layer in enumerate(decoder.layers):
            spec = self.layers[i]
            for name in ("qkv", "o", "gate_up", "down"):
                setattr(spec, name, getattr(layer.w, name).data_ptr())
            spec.ln1, spec.ln2 = layer.w.ln1.data_ptr(), layer.w.ln2.data_ptr()
            spec.qkv_t = _ptr(layer.t.get("attn_input"))
            spec.o_t = _ptr(layer.t.get("o_proj_input"))
            spec.gate_up_t = _ptr(layer.t.get("mlp_input"))
            spec.down_t = _ptr(layer.t.get("down"))
            compact = layer.compact
            spec.c_gate_up = _ptr(compact[0]) if compact else None
            spec.c_down = _ptr(compact[1]) if compact else None
            spec.c_gate_up_t = _ptr(layer.compact_t)
            spec.c_kept = compact[1].shape[1] if compact else 0
            spec.keys, spec.values = decoder.keys[i].data_ptr(), decoder.values[i].data_ptr()
            for j, site in enumerate(SITES):
                rule = self.rules.get((site, i))
                if rule is None:
                    spec.rules[j] = Rule(active=0)
                    continue
                scale, thresholds, threshold, k = rule.native_args()
                vt, us = self.lowrank.get((site, i), (None, None))
                spec.rules[j] = Rule(
                    scale=_ptr(scale),
                    thresholds=_ptr(thresholds),
                    threshold=threshold,
                    k=k,
                    active=1,
                    lr_vt=_ptr(vt),
                    lr_us=_ptr(us),
                    rank=0 if vt is None else vt.shape[0],
                )
            for j, site in enumerate(PROJECTIONS):
                spec.proj_t[j] = _ptr(layer.t.get(site))
            for name, sites in ROTATED.items():
                bases = [layer.t[f"basis:{s}"] for s in sites if f"basis:{s}" in layer.t]
                setattr(spec, name, _ptr(bases[0]) if bases else None)
            w1, w2, k = self.scorers.get(i, (None, None, 0))
            spec.p_w1, spec.p_w2 = _ptr(w1), _ptr(w2)
            spec.p_rank, spec.p_k = (0 if w1 is None else w1.shape[0]), k

    def __call__(self, token: int, pos: int):
        """Logits of one step, and the kept counts per (layer, site)."""
        self.fn(ctypes.byref(self.model), token, pos, self.logits.data_ptr(), self.kept.data_ptr())
        return self.logits, self.kept
