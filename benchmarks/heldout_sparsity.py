"""Do calibrated thresholds hit their target on text they were not calibrated on?

For each threshold method and target sparsity, the strategy is calibrated as configured (its
YAML defaults, or ``--setting progressive``: thresholds found in execution order, every position
sparse except for sequence-level methods, which keep their protocol, TEAL's uniform allocation)
and then run on the embedded evaluation prose, which no calibration source contains. Each
document is one forward whose first half plays the prompt (a prompt-dense protocol keeps it
dense; sparse positions are what is counted). Prints the sparsity at the method's own sites (what
the target controls) and the model-level sparsity (the share of decoder-block linear weights
skipped per token).

    python benchmarks/heldout_sparsity.py
    python benchmarks/heldout_sparsity.py --setting progressive --sparsities 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from decode_speed import config

SETTINGS = {
    "default": {},
    "progressive": {"threshold_mode": "progressive", "prefill": "sparse", "allocation": "uniform"},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--strategies", nargs="+", default=["cats", "chess", "teal", "tda"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="default")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    import torch

    from moyu_exp import calibration, datasets, models
    from moyu_exp.config import build
    from moyu_exp.strategies import STRATEGIES

    loaded = None
    rows = []
    docs = datasets.embedded(split="evaluation")
    print("strategy  setting      target  site sparsity  model sparsity", flush=True)
    for name in args.strategies:
        for target in args.sparsities:
            cfg = config(args.model, "float32", None, name, target)
            for key, value in SETTINGS[args.setting].items():
                # a sequence-level method selects from a dense part: it keeps its protocol
                kept = key == "prefill" and STRATEGIES[name].sequence_level
                if key in cfg.strategy and not kept:
                    cfg.strategy[key] = value
            loaded = loaded or models.load(cfg.model)
            strategy = build(cfg.strategy)
            state, _ = calibration.prepare(strategy, loaded, cfg)
            with strategy.attach(loaded.model, state) as live, torch.inference_mode():
                for doc in docs:
                    ids = torch.tensor([loaded.tokenizer(doc).input_ids])
                    n = ids.shape[1]
                    with live.segments(torch.tensor([n]), torch.tensor([n // 2])):
                        loaded.model(ids)
                summary = live.meter.summary()
                site, model = summary["site_sparsity"], summary["model_sparsity"]
            rows.append(
                {
                    "strategy": name,
                    "setting": args.setting,
                    "target": target,
                    "site": site,
                    "model": model,
                }
            )
            print(
                f"{name:9s} {args.setting:12s} {target:6.2f} {site:14.3f} {model:15.3f}", flush=True
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
