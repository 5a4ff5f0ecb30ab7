"""What simulated masking costs: evaluation time of each strategy against the dense model's.

For every strategy, the same lm-eval evaluation (piqa from a local data dir, first ``--limit``
items, batch 16) runs dense through moyu_exp and then with the strategy attached (simulated
mode), back to back in one process, so each ratio pairs two neighbouring measurements; plain
lm-eval (``HFLM`` over the same loaded model, no moyu_exp bridge) is timed too. Eval time only:
calibration is done (and cached) before the clock starts. The goal is sparse / dense <= 1.15.

    python benchmarks/eval_overhead.py --data-dir ../shared/data          # 300 items
    python benchmarks/eval_overhead.py --data-dir ../shared/data --strategies topk cats --limit 100
    python benchmarks/eval_overhead.py --data-dir ../shared/data --strategies teal \
        --set allocation=uniform
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml
from decode_speed import config

STRATEGIES = ["topk", "random", "static", "cats", "teal", "chess", "wina", "cett", "griffin", "tda"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--task", default="piqa")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=1, help="dense/sparse pairs per strategy")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="strategy keys to change where a strategy has them, e.g. allocation=uniform",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    changes = dict(item.split("=", 1) for item in args.set)

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from moyu_exp import calibration, evaluation, models
    from moyu_exp.config import build
    from moyu_exp.evaluation.tasks import task_manager, task_spec

    def cfg_for(strategy: str):
        cfg = config(args.model, "float32", None, strategy, args.sparsity)
        cfg.eval.tasks = [args.task]
        cfg.eval.limit = args.limit
        cfg.eval.fidelity = False
        cfg.eval.data_dir = args.data_dir
        for key, value in changes.items():
            if key in cfg.strategy:
                cfg.strategy[key] = yaml.safe_load(value)
        return cfg

    dense_cfg = cfg_for("dense")
    loaded = models.load(dense_cfg.model)

    def timed_eval(strategy_name: str) -> float:
        cfg = cfg_for(strategy_name)
        strategy = build(cfg.strategy)
        state, _ = calibration.prepare(strategy, loaded, cfg)
        with strategy.attach(loaded.model, state) as live:
            start = time.perf_counter()
            evaluation.run(loaded, cfg.eval, live, seed=0)
            return time.perf_counter() - start

    def plain() -> float:
        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=16)
        spec = task_spec(args.task, args.data_dir)
        start = time.perf_counter()
        simple_evaluate(
            model=lm,
            tasks=[spec],
            limit=args.limit,
            log_samples=False,
            task_manager=task_manager((args.task,)),
        )
        return time.perf_counter() - start

    timed_eval("dense")  # warm-up: task index, datasets, allocator
    print(f"{args.task}, first {args.limit} items, batch 16, sparsity {args.sparsity}", flush=True)
    print(f"{'strategy':<10}{'dense s':>9}{'sparse s':>10}{'ratio':>7}", flush=True)
    rows = []
    plain_s, dense_s = plain(), timed_eval("dense")
    rows.append({"strategy": "plain lm-eval", "dense_s": dense_s, "sparse_s": plain_s})
    print(f"{'plain':<10}{dense_s:>9.1f}{plain_s:>10.1f}{plain_s / dense_s:>7.2f}", flush=True)
    for name in args.strategies:
        pairs = [(timed_eval("dense"), timed_eval(name)) for _ in range(args.repeats)]
        dense_s = statistics.median(d for d, _ in pairs)
        sparse_s = statistics.median(s for _, s in pairs)
        ratio = statistics.median(s / d for d, s in pairs)
        rows.append({"strategy": name, "dense_s": dense_s, "sparse_s": sparse_s, "ratio": ratio})
        print(f"{name:<10}{dense_s:>9.1f}{sparse_s:>10.1f}{ratio:>7.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
