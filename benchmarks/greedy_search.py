"""TEAL's (or WINA's) greedy search on a few layers: the plain evaluation against the staged one.

For each layer the search runs twice in one process on the same captured inputs: with the plain
evaluation (the block's own modules on the whole sequence for every trial: how the search ran
before the staged one) and with the staged one (:class:`moyu_exp.strategies.greedy.BlockSearch`:
dense prefix keys and values once, queries of the error window only, o_proj input, gate/up
outputs and activation kept across trials). It prints the seconds per layer of each, their
ratio, and the largest relative difference between the two paths' rows (they should be equal).
With ``--shipped`` it also compares the fresh rows with the shipped file's for those layers;
``--csv FILE`` appends a row per layer to FILE (docs/calibration.md's table is generated from
docs/greedy_search.csv).

    python benchmarks/greedy_search.py                      # SmolLM2, TEAL, layers 0 and 1
    python benchmarks/greedy_search.py --method wina --layers 0 29
    python benchmarks/greedy_search.py --model gemma3_270m --layers 0 17 --shipped --staged-only
    python benchmarks/greedy_search.py --model tiny --family gemma2 --reach 0.5
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--family", help="model=tiny's family (llama, gemma2, ...)")
    parser.add_argument("--method", default="teal", choices=["teal", "wina"])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--reach", type=float, default=0.9, help="sparsity the paths go to")
    parser.add_argument("--staged-only", action="store_true", help="skip the plain evaluation")
    parser.add_argument("--shipped", action="store_true", help="compare with the shipped rows")
    parser.add_argument("--csv", type=Path, help="append a row per layer to this CSV")
    args = parser.parse_args(argv)

    import torch

    from moyu_exp import calibration, models, shipped
    from moyu_exp.cache import content_key
    from moyu_exp.config import build
    from moyu_exp.schemas import compose_config
    from moyu_exp.strategies import greedy

    overrides = [f"model={args.model}", f"strategy={args.method}"]
    overrides += [f"model.family={args.family}"] if args.family else []
    cfg = compose_config(overrides)
    cfg.strategy.sparsity = args.reach
    cfg.strategy.layers = list(args.layers)
    loaded = models.load(cfg.model)
    torch.set_grad_enabled(False)
    seq_len = min(cfg.calibration.seq_len, calibration.context_length(loaded.model))
    batches = calibration.token_batches(
        loaded.tokenizer, build(cfg.dataset), cfg.calibration.tokens, seq_len
    )
    data_key = content_key(
        calibration.VERSION,
        models.weights_fingerprint(loaded.model),
        calibration.token_digest(batches),
    )
    print(f"{args.model} {args.method}: layers {args.layers}, paths to {args.reach}", flush=True)
    modes = [True] if args.staged_only else [False, True]
    paths: dict[bool, dict[int, torch.Tensor]] = {}
    seconds: dict[bool, dict[int, float]] = {}
    original, estimate = greedy.greedy_path, greedy.ModelPaths.estimate
    estimates: dict[bool, float] = {}
    for staged in modes:
        times: dict[int, float] = {}

        def timed(search, *rest, times=times):
            start = time.perf_counter()
            rows = original(search, *rest)
            times[search.layer] = time.perf_counter() - start
            return rows

        def estimated(self, *rest, staged=staged, **named):
            estimates[staged] = estimate(self, *rest, **named)
            return estimates[staged]

        strategy = build(cfg.strategy)
        with (
            tempfile.TemporaryDirectory() as cache_dir,
            mock.patch.dict("os.environ", {"MOYU_CACHE_DIR": cache_dir}),
            mock.patch.object(greedy, "greedy_path", timed),
            mock.patch.object(greedy.ModelPaths, "estimate", estimated),
            mock.patch.object(greedy, "STAGED", staged),
        ):
            parts = calibration.Parts(data_key, strategy.name, use_shipped=False)
            state = strategy.calibrate(loaded.model, batches, parts)
        paths[staged] = {i: state[f"greedy.{i}"] for i in args.layers}
        seconds[staged] = times
    print("layer | rows | plain s | staged s | plain/staged | largest relative difference")
    records = []
    for layer in args.layers:
        staged_rows = paths[True][layer]
        record = {"model": args.model, "method": args.method, "layer": layer, "reach": args.reach}
        record |= {"rows": len(staged_rows), "staged_s": round(seconds[True][layer], 1)}
        line = f"{layer} | {len(staged_rows)} | "
        if not args.staged_only:
            plain_rows = paths[False][layer]
            diff = relative_difference(plain_rows, staged_rows)
            ratio = seconds[False][layer] / seconds[True][layer]
            line += f"{seconds[False][layer]:.1f} | {seconds[True][layer]:.1f} | {ratio:.2f} | "
            line += f"{diff:.2e}"
            record |= {"plain_s": round(seconds[False][layer], 1), "ratio": round(ratio, 2)}
            record |= {"largest_relative_difference": diff}
        else:
            line += f"- | {seconds[True][layer]:.1f} | - | -"
        print(line, flush=True)
        records.append(record)
    if args.csv:
        append_csv(args.csv, records)
    took = sum(seconds[True].values())
    if True in estimates:  # what the console line said before the (staged) search ran
        print(
            f"estimate said beforehand {estimates[True]:.1f} s; the staged search took "
            f"{took:.1f} s (estimate / actual {estimates[True] / took:.2f})"
        )
    if args.shipped:
        owner, params = build(cfg.strategy).shipped_part()
        for layer in args.layers:
            label = f"greedy-{layer}"
            found = shipped.find(content_key(data_key, owner, label, params | {"layer": layer}))
            if found is None:
                print(f"layer {layer}: no shipped path matches this model, tokens and search")
                continue
            ship, fresh = found["path"], paths[True][layer]
            same = min(len(ship), len(fresh))
            largest = float((ship[:same, 1:] - fresh[:same, 1:]).abs().max())
            print(
                f"layer {layer}: shipped {len(ship)} rows, fresh {len(fresh)}; "
                f"largest level difference over the first {same} rows {largest:.2e}"
            )
    return 0


COLUMNS = (
    "model", "method", "layer", "rows", "plain_s", "staged_s", "ratio",
    "largest_relative_difference", "reach", "commit", "date", "machine",
)  # fmt: skip


def append_csv(path: Path, records: list[dict]) -> None:
    """Append the layers' rows (with the commit, date and machine) to ``path``."""
    from moyu_exp.ship import machine_description, short_commit

    stamp = {
        "commit": short_commit(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine_description(),
    }
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as f:
        out = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            out.writeheader()
        for record in records:
            out.writerow(record | stamp)


def relative_difference(a, b) -> float:
    """The largest |a - b| / max(|a|, 1e-12) between two paths' rows (inf if shapes differ)."""
    if a.shape != b.shape:
        return float("inf")
    return float(((a - b).abs() / a.abs().clamp_min(1e-12)).max())


if __name__ == "__main__":
    raise SystemExit(main())
