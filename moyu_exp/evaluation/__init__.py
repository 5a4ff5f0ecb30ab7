"""Evaluation: lm-eval tasks (stock, local-file or embedded) plus fidelity to the dense model,
on the embedded text and along generated continuations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from moyu_exp import datasets

if TYPE_CHECKING:
    from moyu_exp.models import LoadedModel
    from moyu_exp.strategies import Attachment


def run(
    loaded: LoadedModel, cfg: DictConfig, live: Attachment, seed: int
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Evaluate the model as it is now (with ``live`` attached): metrics and per-task details."""
    # imported here: checking a config (``check``) should not cost lm-eval's and torch's imports
    from moyu_exp.evaluation import fidelity, generation, harness

    metrics: dict[str, dict[str, float]] = {}
    details: dict[str, Any] = {}
    if cfg.tasks:
        metrics, details = harness.evaluate(
            loaded,
            live,
            list(cfg.tasks),
            limit=cfg.limit,
            batch_size=cfg.batch_size,
            num_fewshot=cfg.num_fewshot,
            bootstrap_iters=cfg.bootstrap_iters,
            data_dir=cfg.data_dir,
            prompt_fraction=cfg.prompt_fraction,
            seed=seed,
        )
    if cfg.fidelity:
        documents = datasets.embedded(split="evaluation")
        metrics["fidelity"] = fidelity.measure(loaded, live, documents, cfg.prompt_fraction)
        details["fidelity"] = {"higher_is_better": fidelity.HIGHER_IS_BETTER}
    if cfg.generation:
        documents = datasets.embedded(split="evaluation")
        metrics["generation"], curves = generation.measure(
            loaded,
            live,
            documents,
            prompts=cfg.generation_prompts,
            prompt_tokens=cfg.generation_prompt_tokens,
            tokens=cfg.generation_tokens,
        )
        details["generation"] = {
            "higher_is_better": generation.HIGHER_IS_BETTER,
            "by_distance": curves,
        }
    return metrics, details


def check(cfg: DictConfig) -> None:
    """Fail fast (before loading any model) on unknown task names and missing local files."""
    from moyu_exp.evaluation.tasks import LOCAL_FILES, check_task_name

    for name in cfg.tasks:  # the files first: checking a name may index lm-eval's tasks
        if cfg.data_dir and name in LOCAL_FILES:
            datasets.require_data_file(cfg.data_dir, LOCAL_FILES[name][0], f"eval task {name}")
    for name in cfg.tasks:
        check_task_name(name)
