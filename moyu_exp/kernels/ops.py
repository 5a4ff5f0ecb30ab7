"""What a decode step needs from a backend, in two implementations.

Mat-vecs: ``linear`` (dense), ``rows_masked`` (output-sparse: only the rows a mask keeps are
read; the others come out 0) and ``sparse_in`` (input-sparse: only the rows of W^T whose input
a mask keeps are read; returns the kept count too). With a strategy's :class:`KernelRule`
instead of a mask, ``sparse_in_rule`` and ``gated_rule`` (the MLP with its activation site
sparse: kept up rows and down columns) select and compute in one call. Helpers: ``norm``
(RMSNorm), ``silu_mul``, ``attend`` (RoPE, KV-cache write, single-query grouped attention).

``NativeKernels`` (CPU) calls the compiled library of :mod:`moyu_exp.kernels.native` with fp32
activations into preallocated buffers; ``TorchKernels`` (CUDA, or a CPU without a compiler)
uses stock PyTorch ops: input-sparse through ``embedding_bag`` with per-sample weights, which
sums rows of W^T without copying them first (on this CPU, 50% active, weights streamed from
memory: 1.5x faster than torch's dense mat-vec, while a copied column selection was 4x slower).
"""

from __future__ import annotations

from moyu_exp.kernels import native
from moyu_exp.lazy import lazy_import

torch = lazy_import("torch")


class TorchKernels:
    name = "torch"

    def __init__(self, dtype, device):
        self.dtype = dtype  # activations stay in the model's dtype
        self.offsets = torch.zeros(1, dtype=torch.long, device=device)

    def norm(self, x, weight, eps):
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)

    def linear(self, weight, x):
        return torch.nn.functional.linear(x, weight)

    def rows_masked(self, weight, mask, x):
        idx = mask.nonzero().view(-1)
        out = torch.zeros(weight.shape[0], dtype=x.dtype, device=x.device)
        out[idx] = torch.nn.functional.linear(x, weight.index_select(0, idx))
        return out

    def sparse_in(self, weight_t, mask, x):
        idx = mask.nonzero().view(-1)
        values = x.index_select(0, idx).to(weight_t.dtype)
        # the ATen op directly (mode 0 = sum): the Python wrapper costs several small ops a call
        bag = torch.embedding_bag(weight_t, idx, self.offsets, False, 0, False, values)
        return bag[0].view(-1).to(x.dtype), idx.numel()

    def silu_mul(self, gate_up):
        gate, up = gate_up.chunk(2)
        return torch.nn.functional.silu(gate) * up

    def sparse_in_rule(self, weight_t, rule, x):
        return self.sparse_in(weight_t, rule.mask(x), x)

    def gated_rule(self, up_weight, down_t, gate, x, rule):
        act = torch.nn.functional.silu(gate)
        mask = rule.mask(act)
        up = self.rows_masked(up_weight, mask, x)
        return self.sparse_in(down_t, mask, act * up)

    def attend(self, qkv, keys, values, pos, cos, sin, heads, kv, dim, scale, window=None):
        return _attend(qkv, keys, values, pos, cos, sin, heads, kv, dim, scale, window)


class NativeKernels:
    name = "native"

    def __init__(self, lib: native.Native, max_tokens: int, max_cols: int):
        self.lib = lib.lib
        self.typed = lib
        self.dtype = torch.float32
        threads = max(1, torch.get_num_threads())
        self.scores = torch.empty(threads * max_tokens, dtype=torch.float32)
        stride = (max_cols + 15) // 16 * 16
        self.acc = torch.empty((threads + 1) * stride, dtype=torch.float32)  # axpy scratch
        self.list = torch.empty(max_cols, dtype=torch.int64)
        self.work = torch.empty(2 * max_cols + 2048, dtype=torch.float32)  # + a histogram
        self.upv = torch.empty(max_cols, dtype=torch.float32)

    def _fn(self, kind, weight):
        return self.typed.fn(kind, weight)

    def norm(self, x, weight, eps):
        out = torch.empty_like(x)
        self.lib.rmsnorm(x.data_ptr(), weight.data_ptr(), x.numel(), eps, out.data_ptr())
        return out

    def linear(self, weight, x):
        out = torch.empty(weight.shape[0], dtype=torch.float32)
        self._fn("dot", weight)(
            weight.data_ptr(), weight.shape[1], None, weight.shape[0], x.data_ptr(), out.data_ptr()
        )
        return out

    def rows_masked(self, weight, mask, x):
        out = torch.empty(weight.shape[0], dtype=torch.float32)
        self._fn("dot_masked", weight)(
            weight.data_ptr(),
            weight.shape[1],
            mask.data_ptr(),
            weight.shape[0],
            x.data_ptr(),
            out.data_ptr(),
            self.list.data_ptr(),
        )
        return out

    def sparse_in(self, weight_t, mask, x):
        out = torch.empty(weight_t.shape[1], dtype=torch.float32)
        kept = self._fn("axpy_masked", weight_t)(
            weight_t.data_ptr(),
            weight_t.shape[1],
            mask.data_ptr(),
            weight_t.shape[0],
            x.data_ptr(),
            out.data_ptr(),
            self.acc.data_ptr(),
            self.list.data_ptr(),
        )
        return out, kept

    def silu_mul(self, gate_up):
        out = torch.empty(gate_up.numel() // 2, dtype=torch.float32)
        self.lib.silu_mul(gate_up.data_ptr(), out.numel(), out.data_ptr())
        return out

    def sparse_in_rule(self, weight_t, rule, x):
        out = torch.empty(weight_t.shape[1], dtype=torch.float32)
        kept = self._fn("axpy_rule", weight_t)(
            weight_t.data_ptr(),
            weight_t.shape[1],
            weight_t.shape[0],
            x.data_ptr(),
            *rule.native_pointers(),
            out.data_ptr(),
            self.work.data_ptr(),
            self.list.data_ptr(),
            self.acc.data_ptr(),
        )
        return out, kept

    def gated_rule(self, up_weight, down_t, gate, x, rule):
        out = torch.empty(down_t.shape[1], dtype=torch.float32)
        kept = self._fn("gated_rule", up_weight)(
            up_weight.data_ptr(),
            down_t.data_ptr(),
            up_weight.shape[1],
            up_weight.shape[0],
            gate.data_ptr(),
            x.data_ptr(),
            *rule.native_pointers(),
            out.data_ptr(),
            self.work.data_ptr(),
            self.list.data_ptr(),
            self.upv.data_ptr(),
            self.acc.data_ptr(),
        )
        return out, kept

    def attend(self, qkv, keys, values, pos, cos, sin, heads, kv, dim, scale, window=None):
        if window is not None and pos >= window:  # a sliding window: keys from pos - window + 1
            return _attend(qkv, keys, values, pos, cos, sin, heads, kv, dim, scale, window)
        out = torch.empty(heads * dim, dtype=torch.float32)
        self.lib.attend(
            qkv.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            heads,
            kv,
            dim,
            keys.shape[1],
            pos,
            cos.data_ptr(),
            sin.data_ptr(),
            scale,
            self.scores.data_ptr(),
            out.data_ptr(),
        )
        return out


def kernels_for(device, dtype, max_tokens: int, max_cols: int):
    """Native kernels on the CPU (fp32 or bf16 weights) when they build, else stock ops."""
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        lib = native.load()
        if lib is not None:
            return NativeKernels(lib, max_tokens, max_cols)
    return TorchKernels(dtype, device)


def _attend(qkv, keys, values, pos, cos, sin, heads, kv, dim, scale, window=None):
    """RoPE, the KV-cache write and single-query attention over the last ``window`` positions
    (all of them when None), with stock ops."""
    d_q, d_kv = heads * dim, kv * dim
    q = _rope(qkv[:d_q].view(heads, dim), cos, sin)
    keys[:, pos] = _rope(qkv[d_q : d_q + d_kv].view(kv, dim), cos, sin)
    values[:, pos] = qkv[d_q + d_kv :].view(kv, dim)
    start = 0 if window is None else max(0, pos + 1 - window)
    out = torch.nn.functional.scaled_dot_product_attention(
        q[None, :, None, :],
        keys[None, :, start : pos + 1],
        values[None, :, start : pos + 1],
        scale=scale,
        enable_gqa=heads != kv,
    )
    return out.reshape(d_q)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
