"""How close the gathered mat-vec kernels come to the dense one, on a model's own weights.

For each weight kind of the lean decoder (fused q/k/v, o, fused gate/up, down) over all layers:
the dense mat-vec's bandwidth (GB/s, the native ``dot`` on contiguous rows), and at each
density the two gathered paths as a share of it:

- input-sparse (``axpy_masked``: the kept rows of W^T, as TEAL, CATS' down projection, ...);
- output-sparse (``dot`` over listed rows of W, as the kept neurons' up rows of CATS/CHESS).

efficiency = dense time x density / gathered time (1 = the gathered bytes stream as fast as
dense bytes). The kept rows are a uniform random subset; dense and gathered passes alternate
in every round, each from DRAM (a buffer larger than the last-level cache is read before it),
and the median and IQR are over the rounds' ratios. ``--compare`` builds another
version of ``csrc/sparse_gemv.c`` and measures it in the same rounds (a before/after table from
one run: ``git show <rev>:moyu_exp/kernels/csrc/sparse_gemv.c > /tmp/old.c``).

    python benchmarks/kernel_bandwidth.py
    python benchmarks/kernel_bandwidth.py --densities 0.5 --compare /tmp/old.c
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

FLUSH_BYTES = 128 << 20  # read between timed passes: more than this CPU's last-level cache
KINDS = ("qkv", "o", "gate_up", "down")  # the lean decoder's weights of a layer


def flush_caches() -> None:
    """Read a buffer larger than the last-level cache, so that the next pass starts in DRAM."""
    _flush_buffer().sum()


@functools.cache
def _flush_buffer():
    import torch

    return torch.ones(FLUSH_BYTES // 4)


def dense_bandwidth(lib, weights: list, x, rounds: int = 5) -> float:
    """GB/s of the native dense mat-vec over ``weights`` (each (rows, cols), read in turn),
    every pass from DRAM."""
    import torch

    out = torch.empty(max(w.shape[0] for w in weights))
    times = []
    for _ in range(rounds):
        flush_caches()
        start = time.perf_counter()
        for w in weights:
            lib.fn("dot", w)(
                w.data_ptr(), w.shape[1], None, w.shape[0], x.data_ptr(), out.data_ptr()
            )
        times.append(time.perf_counter() - start)
    return sum(w.numel() * w.element_size() for w in weights) / statistics.median(times) / 1e9


def _quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4)
    return statistics.median(values), q[2] - q[0]


def _passes(libs, weights, transposed, mask, idx, buffers) -> dict:
    """One timed pass each over all layers: the dense mat-vec, then each library's gathered
    input-sparse (kept rows of W^T, by ``mask``) and output-sparse (rows ``idx`` of W) ones."""
    x_in, x_out, out, acc, listed = (b.data_ptr() for b in buffers)
    rows, cols = weights[0].shape

    def dense():
        for v in weights:
            libs["ours"].fn("dot", v)(v.data_ptr(), cols, None, rows, x_in, out)

    passes = {"dense": dense}
    for name, lib in libs.items():

        def input_sparse(lib=lib):
            for t in transposed:
                lib.fn("axpy_masked", t)(
                    t.data_ptr(), rows, mask.data_ptr(), cols, x_in, out, acc, listed
                )

        def output_sparse(lib=lib):
            for v in weights:
                lib.fn("dot", v)(v.data_ptr(), cols, idx.data_ptr(), idx.numel(), x_out, out)

        passes[f"{name}:in"], passes[f"{name}:out"] = input_sparse, output_sparse
    return passes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--densities", nargs="+", type=float, default=[0.7, 0.5, 0.3, 0.1])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compare", type=Path, help="another version of csrc/sparse_gemv.c")
    args = parser.parse_args(argv)

    import torch

    from moyu_exp import models
    from moyu_exp.kernels import native
    from moyu_exp.kernels.decoder import DecoderWeights
    from moyu_exp.schemas import compose_config

    if args.threads:
        torch.set_num_threads(args.threads)
    libs = {"ours": native.build(native.SOURCE)}
    if args.compare:
        libs["compared"] = native.build(args.compare.resolve())
    if any(lib is None for lib in libs.values()):
        print("the native kernels could not be built (no C compiler?)", file=sys.stderr)
        return 1
    loaded = models.load(compose_config([f"model={args.model}"]).model)
    if next(loaded.model.parameters()).dtype != torch.float32:
        print("this benchmark reads float32 weights", file=sys.stderr)
        return 1
    w = DecoderWeights(loaded.model, max_tokens=16)
    kinds = {kind: [getattr(layer, kind) for layer in w.layers] for kind in KINDS}
    print(
        f"model {args.model}, {torch.get_num_threads()} threads, {args.rounds} rounds; "
        f"libraries: {', '.join(libs)}; efficiency = dense time x density / gathered time"
    )
    print(
        f"{'kind':<8}{'shape':>11}{'density':>8}{'dense GB/s':>11}  "
        + "  ".join(
            f"{f'{name}: in-sparse (IQR)':>24}{f'{name}: out-sparse (IQR)':>25}" for name in libs
        )
    )
    gen = torch.Generator().manual_seed(0)
    for kind, weights in kinds.items():
        transposed = [v.t().contiguous() for v in weights]
        rows, cols = weights[0].shape
        x_in, x_out = torch.randn(cols, generator=gen), torch.randn(cols, generator=gen)
        out = torch.empty(max(rows, cols))
        threads = torch.get_num_threads()
        acc = torch.zeros((threads + 1) * ((rows + 15) // 16 * 16))
        listed = torch.empty(cols, dtype=torch.int64)
        for density in args.densities:
            mask = torch.zeros(cols, dtype=torch.uint8)
            mask[torch.randperm(cols, generator=gen)[: round(density * cols)]] = 1
            idx = torch.randperm(rows, generator=gen)[: round(density * rows)].sort().values
            buffers = (x_in, x_out, out, acc, listed)
            passes = _passes(libs, weights, transposed, mask, idx, buffers)
            for run in passes.values():  # burn-in
                run()
            times: dict[str, list[float]] = {name: [] for name in passes}
            for i in range(args.rounds):
                order = list(passes) if i % 2 == 0 else list(reversed(passes))
                for name in order:
                    flush_caches()  # every pass starts from DRAM, as in a decode step
                    start = time.perf_counter()
                    passes[name]()
                    times[name].append(time.perf_counter() - start)
            dense = times["dense"]
            nbytes = sum(v.numel() * v.element_size() for v in weights)
            cells = []
            for name in libs:
                for side, kept in (("in", mask.sum().item() / cols), ("out", idx.numel() / rows)):
                    ratios = [
                        d * kept / s for d, s in zip(dense, times[f"{name}:{side}"], strict=True)
                    ]
                    median, iqr = _quartiles(ratios)
                    cells.append(f"{f'{median:.2f} ({iqr:.2f})':>{24 if side == 'in' else 25}}")
            print(
                f"{kind:<8}{f'{rows}x{cols}':>11}{density:>8.2f}"
                f"{nbytes / statistics.median(dense) / 1e9:>11.1f}  " + "".join(cells),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
