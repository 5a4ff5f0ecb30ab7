"""Task definitions handed to lm-eval: stock tasks, their local-file twins, and ``embedded``.

With a ``data_dir`` laid out as in ``../shared/data/README.md``, a stock task is rebuilt from its
own YAML (prompt, choices, targets, ``process_docs`` and metrics unchanged); only where the
documents come from changes. Without one, the stock task (which reads the hub) runs as is.
"""

from __future__ import annotations

import difflib
import functools
import gzip
import json
import logging
from pathlib import Path
from typing import Any

from moyu_exp import cache, datasets
from moyu_exp.errors import ConfigError, InputError

log = logging.getLogger(__name__)

EMBEDDED_TASK = "embedded"

# stock task -> (file under data_dir, the split of the stock task it stands for)
LOCAL_FILES: dict[str, tuple[str, str]] = {
    "piqa": ("piqa/validation.jsonl", "validation"),
    "hellaswag": ("hellaswag/validation.jsonl.gz", "validation"),
    "arc_easy": ("arc/arc_easy_test.jsonl", "test"),
    "arc_challenge": ("arc/arc_challenge_test.jsonl", "test"),
    "winogrande": ("winogrande/validation.jsonl", "validation"),
    "boolq": ("boolq/validation.jsonl", "validation"),
    "openbookqa": ("openbookqa/test.jsonl", "test"),
    "lambada_openai": ("lambada_openai/test.jsonl", "test"),
    "wikitext": ("wikitext2_raw/test_documents.jsonl", "test"),
}


# Folders (under lm_eval/tasks/) of the stock tasks we use most: indexing only these takes
# milliseconds, indexing all ~15k stock YAMLs about 7 s on a 2-core CPU.
STOCK_FOLDERS: dict[str, str] = {
    "piqa": "piqa",
    "hellaswag": "hellaswag",
    "arc_easy": "arc",
    "arc_challenge": "arc",
    "winogrande": "winogrande",
    "boolq": "super_glue/boolq",
    "openbookqa": "openbookqa",
    "lambada_openai": "lambada",
    "wikitext": "wikitext",
}


def task_manager(names: tuple[str, ...] | None = None):
    """An lm-eval task index that knows ``names`` (all tasks when None): small when it can be."""
    wanted = {n for n in names or () if n != EMBEDDED_TASK}
    if names is not None and wanted <= STOCK_FOLDERS.keys():
        return _task_manager(tuple(sorted({STOCK_FOLDERS[n] for n in wanted})))
    return _task_manager(None)


@functools.cache
def _task_manager(folders: tuple[str, ...] | None):
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    if folders is None:
        return TaskManager()
    root = Path(lm_eval.tasks.__file__).parent
    return TaskManager(include_defaults=False, include_path=[str(root / f) for f in folders])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a (gzipped) JSON-lines file; a malformed line is a one-line error naming the
    file and the line."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise InputError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise InputError(f"{path} cannot be read: {err}") from None
    return rows


def json_split(split: str, path: Path) -> dict[str, Any]:
    """The task keys that make lm-eval read one split from a JSON-lines file (as a plain
    ``dataset_path: json`` task YAML does)."""
    return {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path)}},
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
        "fewshot_split": None,
    }


def embedded_task() -> dict[str, Any]:
    """Rolling perplexity over the project's evaluation prose, like the stock ``wikitext`` task;
    its documents are written once (by content) as a JSON-lines file in the cache."""
    documents = datasets.embedded(split="evaluation")
    key = cache.content_key(documents)
    path = cache.root() / "data" / f"embedded-{key}.jsonl"
    if not path.is_file():
        text = "".join(json.dumps({"text": doc}) + "\n" for doc in documents)
        cache.write_bytes_atomic(path, text.encode())
    lower = {"aggregation": "weighted_perplexity", "higher_is_better": False}
    return {
        "task": EMBEDDED_TASK,
        **json_split("test", path),
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": "word_perplexity", **lower},
            {"metric": "byte_perplexity", **lower},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
        "metadata": {"version": 1.0},
    }


def check_task_name(name: str) -> None:
    if name == EMBEDDED_TASK or name in task_manager((name,)).all_tasks:
        return
    close = difflib.get_close_matches(name, [*task_manager().all_tasks, EMBEDDED_TASK], n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(
        f"unknown eval task '{name}': lm-eval has no such task{hint}; "
        "accepted: 'embedded' or any name listed by `lm_eval ls tasks`"
    )


def task_spec(name: str, data_dir: str | None) -> str | dict[str, Any]:
    """What to pass to lm-eval for one task name."""
    check_task_name(name)
    if name == EMBEDDED_TASK:
        return embedded_task()
    if not data_dir:
        return name
    if name not in LOCAL_FILES:
        log.warning("task '%s' has no local layout under data_dir; running the stock task", name)
        return name
    return local_task(name, data_dir)


def local_task(name: str, data_dir: str) -> dict[str, Any]:
    """The stock task's own config, with documents read from ``data_dir``."""
    from lm_eval.tasks._yaml_loader import load_yaml

    relative, split = LOCAL_FILES[name]
    path = datasets.require_data_file(data_dir, relative, f"eval task {name}")
    read_jsonl(path)  # a malformed line fails here, in one line, not deep inside datasets
    cfg = load_yaml(task_manager((name,)).task_index[name].yaml_path, resolve_func=True)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    cfg.update(json_split(split, path))
    return cfg
