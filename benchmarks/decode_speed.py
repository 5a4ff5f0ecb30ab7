"""Dense vs sparse batch-1 decode speed, in one run on one machine, against the bytes-bound ideal.

For each strategy and sparsity: greedy decode tokens/s of the dense model and of the sparse one
(both through the lean decoder of ``moyu_exp.kernels``, so they share every kernel), their
ratio, the weight bytes each reads per token (all linears, the LM head and the embedding row),
the ideal ratio if time were proportional to bytes (dense bytes / sparse bytes, from the sets
the strategy really kept), and measured / ideal (efficiency, with its IQR over the rounds). The
dense decode's own bandwidth (GB/s) is printed beside the native dense mat-vec's over the same
weights, the roof both sides of a ratio stand under. Dense and sparse windows alternate in every
round (in alternating order); tokens/s are medians over rounds, and the speedup is the median of
the rounds' sparse/dense ratios, so a slow phase of a shared machine hits both sides of a ratio.
This is a loop over :func:`moyu_exp.bench.paired`, the measurement ``bench.mode=kernel`` makes
inside every sweep point.

    python benchmarks/decode_speed.py                       # SmolLM2, the issue's grid
    python benchmarks/decode_speed.py --strategies teal --sparsities 0.5 0.9 --rounds 9
    python benchmarks/decode_speed.py --model tiny_llama --shape 1b   # random 1B-shape model
    python benchmarks/decode_speed.py --model gemma3_270m --strategies topk cats griffin
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

SHAPES = {  # tiny_llama shapes for timing at sizes we cannot download
    "1b": [
        "model.hidden_size=2048",
        "model.intermediate_size=8192",
        "model.num_hidden_layers=16",
        "model.num_attention_heads=32",
        "model.num_key_value_heads=8",
        "model.vocab_size=128256",
    ],
}


def config(model: str, dtype: str, shape: str | None, strategy: str, sparsity: float, extra=()):
    from moyu_exp.schemas import compose_config

    overrides = [
        f"model={model}",
        f"model.dtype={dtype}",
        f"strategy={strategy}",
        f"sparsity={sparsity}",
        *(SHAPES[shape] if shape else []),
        *extra,
    ]
    return compose_config(overrides)


def _gemv_bandwidth(loaded) -> float:
    """The native dense mat-vec's bandwidth over the decoder's weights (the decode's roof)."""
    import torch
    from kernel_bandwidth import KINDS, dense_bandwidth

    from moyu_exp.kernels import native
    from moyu_exp.kernels.decoder import DecoderWeights

    lib = native.load()
    w = DecoderWeights(loaded.model, max_tokens=16)
    if lib is None or w.head.dtype not in (torch.float32, torch.bfloat16):
        return float("nan")
    weights = [getattr(layer, kind) for layer in w.layers for kind in KINDS]
    return dense_bandwidth(lib, [*weights, w.head], torch.randn(w.d))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a tiny_llama shape")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--strategies", nargs="+", default=["topk", "cats", "teal", "griffin"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timed window")
    parser.add_argument("--rounds", type=int, default=9, help="dense/sparse window pairs")
    parser.add_argument("--burn-in", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--csv", type=Path, help="append the rows here, with the model, commit, date and machine"
    )
    parser.add_argument("--label", default="", help="what the CSV rows measured (default: commit)")
    parser.add_argument(
        "--from-json", type=Path, help="measure nothing: take the rows of an earlier --json run"
    )
    parser.add_argument(
        "--overrides",
        nargs="+",
        default=[],
        help="config overrides for every sparse point, e.g. strategy.allocation=uniform",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        if not args.csv or not args.label:
            parser.error("--from-json converts rows: give --csv, and --label (what was measured)")
        rows = json.loads(args.from_json.read_text())
        append_csv(args.csv, rows, args.model, args.label, commit=args.label.split()[0])
        return 0

    import torch

    from moyu_exp import bench, calibration, models
    from moyu_exp.config import build

    if args.threads:
        torch.set_num_threads(args.threads)
    base = config(args.model, args.dtype, args.shape, "dense", 0.0)
    loaded = models.load(base.model)
    prompt = bench.prompt_ids(loaded.tokenizer, args.prompt_tokens).to(loaded.device)
    print(
        f"model {base.model.name} ({args.dtype}), {torch.get_num_threads()} threads, "
        f"device: {loaded.device}; prompt {args.prompt_tokens}, {args.rounds} rounds of "
        f"{args.steps} steps (dense and sparse windows alternating, bench.paired)",
        flush=True,
    )
    header = (
        f"{'strategy':<9}{'target':>7}{'achieved':>9}{'dense tok/s':>12}{'sparse tok/s':>13}"
        f"{'speedup':>8}{'IQR':>6}{'dense MB':>9}{'sparse MB':>10}{'ideal':>7}{'meas/ideal':>11}"
        f"{'IQR':>6}{'dense GB/s':>11}"
    )
    print(f"dense mat-vec over the model's weights, from DRAM: {_gemv_bandwidth(loaded):.1f} GB/s")
    print(header)
    rows = []
    for name in args.strategies:
        for sparsity in args.sparsities:
            cfg = config(args.model, args.dtype, args.shape, name, sparsity, args.overrides)
            strategy = build(cfg.strategy)
            state, _ = calibration.prepare(strategy, loaded, cfg)
            with strategy.attach(loaded.model, state) as live, live.measuring() as meter:
                timing = bench.paired(
                    loaded, live, prompt, args.steps, args.rounds, args.burn_in, False
                )
            row = {
                "strategy": name,
                "sparsity": sparsity,
                "achieved_sparsity": meter.site_sparsity,
                **timing,
                "efficiency_iqr": timing["speedup_iqr"] / timing["ideal_speedup"],
            }
            rows.append(row)
            print(
                f"{name:<9}{sparsity:>7.2f}{row['achieved_sparsity']:>9.3f}"
                f"{row['dense_tokens_per_s']:>12.1f}{row['decode_tokens_per_s']:>13.1f}"
                f"{row['speedup']:>8.2f}{row['speedup_iqr']:>6.2f}"
                f"{row['dense_weight_bytes_per_token'] / 1e6:>9.1f}"
                f"{row['weight_bytes_per_token'] / 1e6:>10.1f}{row['ideal_speedup']:>7.2f}"
                f"{row['efficiency']:>11.2f}{row['efficiency_iqr']:>6.2f}"
                f"{row['dense_tokens_per_s'] * row['dense_weight_bytes_per_token'] / 1e9:>11.1f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.csv:
        append_csv(args.csv, rows, args.model, args.label)
    return 0


CSV_COLUMNS = (
    "label", "model", "strategy", "sparsity", "achieved_sparsity", "speedup", "speedup_iqr",
    "ideal_speedup", "efficiency", "efficiency_iqr", "dense_tokens_per_s", "commit", "date",
    "machine",
)  # fmt: skip


def append_csv(path: Path, rows: list[dict], model: str, label: str, commit: str = "") -> None:
    """Append the rows (efficiency's IQR: the speedup's over the ideal) to ``path``, stamped
    with the commit measured (default: this tree's), today's date and this machine."""
    from moyu_exp.ship import machine_description, short_commit

    commit = commit or short_commit()
    stamp = {
        "label": label or commit,
        "model": model,
        "commit": commit,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine_description(),
    }
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as f:
        out = csv.DictWriter(f, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
        if new:
            out.writeheader()
        for row in rows:
            iqr = row["speedup_iqr"] / row["ideal_speedup"]  # (rows of runs before it was a field)
            out.writerow({"efficiency_iqr": iqr, **row, **stamp})


if __name__ == "__main__":
    sys.exit(main())
