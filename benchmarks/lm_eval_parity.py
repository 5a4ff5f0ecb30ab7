"""A dense embedded model through moyu_exp vs plain lm-eval on the same local task file.

Plain lm-eval is run the way its users run local data: a task YAML that includes the stock task
and points ``dataset_path: json`` at the file, with ``HFLM`` loading the GGUF itself (and adding
BOS as it decides for the model: always for Gemma). moyu_exp runs through its runner (cached
checkpoint, dense strategy, local task built from the stock YAML).

    python benchmarks/lm_eval_parity.py --data-dir ../shared/data --task piqa --limit 200
    python benchmarks/lm_eval_parity.py --model gemma3_270m --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from moyu_exp import runner
from moyu_exp.evaluation.harness import clean_metrics
from moyu_exp.evaluation.tasks import LOCAL_FILES, task_manager
from moyu_exp.models import gguf_path
from moyu_exp.schemas import compose_config


def model_config(model: str):
    return compose_config([f"model={model}"]).model


def plain_lm_eval(
    model: str, task: str, data_file: Path, split: str, limit: int | None, batch_size: int
):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    gguf = gguf_path(model_config(model))
    stock_yaml = task_manager((task,)).task_index[task].yaml_path
    with tempfile.TemporaryDirectory() as tmp:
        name = f"{task}_plain"
        Path(tmp, f"{name}.yaml").write_text(
            f"include: {stock_yaml}\n"
            f"task: {name}\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {data_file}\n"
            "training_split: null\n"
            f"validation_split: {split if split == 'validation' else 'null'}\n"
            f"test_split: {split if split == 'test' else 'null'}\n"
        )
        out = simple_evaluate(
            model="hf",
            model_args={
                "pretrained": str(gguf.parent),
                "gguf_file": gguf.name,
                "dtype": "float32",
                "device": "cpu",
            },
            tasks=[name],
            batch_size=batch_size,
            limit=limit,
            task_manager=TaskManager(include_path=tmp, include_defaults=False),
            bootstrap_iters=1000,
            log_samples=False,
        )
    return clean_metrics(out["results"][name])


def ours(model: str, task: str, data_dir: str, limit: int | None, batch_size: int):
    overrides = [
        f"model={model}",
        "strategy=dense",
        "eval=zeroshot",
        f"eval.tasks=[{task}]",
        f"eval.limit={limit if limit else 'null'}",
        f"eval.batch_size={batch_size}",
        f"data_dir={data_dir}",
        "bench=none",
        "logger=none",
    ]
    cfg = compose_config(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        payload = runner.run(cfg, Path(tmp))
    return payload["eval"][task]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m", help="an embedded model config")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--task", default="piqa", choices=sorted(LOCAL_FILES))
    parser.add_argument("--limit", type=int, default=None, help="items (default: the full set)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    relative, split = LOCAL_FILES[args.task]
    data_file = (Path(args.data_dir) / relative).resolve()

    start = time.perf_counter()
    plain = plain_lm_eval(args.model, args.task, data_file, split, args.limit, args.batch_size)
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    mine = ours(args.model, args.task, args.data_dir, args.limit, args.batch_size)
    ours_s = time.perf_counter() - start

    print(json.dumps({"model": args.model, "task": args.task, "limit": args.limit}))
    nan = float("nan")
    print(f"{'metric':<16}{'plain lm-eval':>16}{'moyu_exp':>16}")
    for metric in sorted(set(plain) | set(mine)):
        print(f"{metric:<16}{plain.get(metric, nan):>16.6f}{mine.get(metric, nan):>16.6f}")
    same = all(plain.get(m) == mine.get(m) for m in plain if not m.endswith("_stderr"))
    print(f"identical: {same}   time: plain {plain_s:.0f} s, moyu_exp {ours_s:.0f} s")
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
