"""The lm-eval bridge: task specs, local files, no cross-config caching, padding bookkeeping."""

from __future__ import annotations

import pytest
import torch

from moyu_exp import evaluation
from moyu_exp.config import ConfigError, build
from moyu_exp.evaluation import tasks
from moyu_exp.evaluation.harness import MoyuLM, clean_metrics, item_scores
from tests.conftest import TINY, compose_config


def run_eval(loaded, *overrides: str):
    cfg = compose_config(*TINY, *overrides)
    strategy = build(cfg.strategy)
    with strategy.attach(loaded.model) as live:
        metrics, details = evaluation.run(loaded, cfg.eval, live, seed=0)
        return metrics, details, live.meter


def test_embedded_eval_reports_perplexity_and_fidelity(tiny) -> None:
    metrics, details, stats = run_eval(tiny, "strategy=topk", "sparsity=0.5")
    assert set(metrics) == {"embedded", "fidelity"}
    assert {"word_perplexity", "byte_perplexity", "bits_per_byte"} <= set(metrics["embedded"])
    assert metrics["fidelity"]["kl"] > 0
    assert 0 <= metrics["fidelity"]["top1_agreement"] <= 1
    assert details["embedded"]["n_samples"]["effective"] == 6
    assert stats.site_sparsity == pytest.approx(0.5)


def test_lm_evals_environment_report_is_built_once_per_process(tiny) -> None:
    """It runs ``pip list`` and friends; a sweep evaluates every point in one process."""
    from torch.utils import collect_env

    run_eval(tiny, "strategy=dense", "eval.fidelity=false")
    run_eval(tiny, "strategy=dense", "eval.fidelity=false")
    report = collect_env.get_pretty_env_info.cache_info()
    assert report.misses == 1 and report.hits >= 1


def test_dense_fidelity_is_perfect(tiny) -> None:
    metrics, _, _ = run_eval(tiny, "strategy=dense")
    assert metrics["fidelity"]["kl"] == 0.0
    assert metrics["fidelity"]["top1_agreement"] == 1.0


GENERATION = (
    "eval.tasks=[]",
    "eval=none",
    "eval.fidelity=false",
    "eval.generation=true",
    "eval.generation_prompts=2",
    "eval.generation_prompt_tokens=12",
    "eval.generation_tokens=20",
)


def test_generation_fidelity_is_reported_by_distance(tiny) -> None:
    metrics, details, meter = run_eval(tiny, "strategy=topk", "sparsity=0.5", *GENERATION)
    gen = metrics["generation"]
    assert set(gen) == {
        "kl", "top1_agreement", "prompts", "tokens", "model_sparsity",
        "kl_1_16", "top1_1_16", "kl_17_64", "top1_17_64",
    }  # fmt: skip
    assert gen["prompts"] == 2 and gen["tokens"] == 20
    # the overall mean weighs the two buckets by their lengths (16 and 4 of 20 distances)
    assert gen["kl"] == pytest.approx((16 * gen["kl_1_16"] + 4 * gen["kl_17_64"]) / 20)
    assert gen["kl"] > 0 and 0 <= gen["top1_agreement"] <= 1
    assert gen["model_sparsity"] == pytest.approx(0.125, abs=0.01)  # topk: down_proj rows
    assert details["generation"]["higher_is_better"]["top1_17_64"] is True
    assert not meter.measured  # the generation has its own meter, not the eval's
    curves = details["generation"]["by_distance"]  # what report's generation.png draws
    assert len(curves["kl"]) == len(curves["top1"]) == 20
    assert sum(curves["kl"]) / 20 == pytest.approx(gen["kl"])
    assert sum(curves["kl"][16:]) / 4 == pytest.approx(gen["kl_17_64"])
    assert sum(curves["top1"][:16]) / 16 == pytest.approx(gen["top1_1_16"])


def test_dense_generation_is_perfect(tiny) -> None:
    metrics, _, _ = run_eval(tiny, "strategy=dense", *GENERATION)
    assert metrics["generation"]["kl"] == 0.0 and metrics["generation"]["top1_agreement"] == 1.0


def test_sequence_level_generation_drifts_only_after_the_prompt(tiny) -> None:
    """GRIFFIN's generation mode: the prompt runs dense, so the first generated token (chosen
    by the prefill) is the dense model's; every later one comes from the frozen set."""
    from moyu_exp.evaluation import generation

    docs = ["The lighthouse keeper rose before dawn to trim the wicks and polish the lens."]
    strategy = build(compose_config(*TINY, "strategy=griffin", "sparsity=0.7").strategy)
    with strategy.attach(tiny.model) as live:
        first, _ = generation.measure(tiny, live, docs, prompts=1, prompt_tokens=10, tokens=1)
        later, curves = generation.measure(tiny, live, docs, prompts=1, prompt_tokens=10, tokens=17)
    assert first["kl"] == 0.0 and first["top1_agreement"] == 1.0
    assert later["kl_17_64"] > 0 and curves["kl"][0] == 0.0 and curves["kl"][16] > 0


def test_one_configuration_never_gets_anothers_scores(tiny, shared_data) -> None:
    tasks_ = "eval.tasks=[embedded,lambada_openai]"
    common = ["eval=zeroshot", tasks_, "eval.limit=6", f"data_dir={shared_data}"]
    dense, _, _ = run_eval(tiny, "strategy=dense", *common)
    sparse, _, _ = run_eval(tiny, "strategy=topk", "sparsity=0.9", *common)
    again, _, _ = run_eval(tiny, "strategy=dense", *common)
    assert dense == again
    for task in ("embedded", "lambada_openai"):
        perplexity = "perplexity" if task == "lambada_openai" else "word_perplexity"
        assert dense[task][perplexity] != sparse[task][perplexity]


def load_docs(spec: dict, split: str):
    """The split as lm-eval loads it: ``datasets.load_dataset(dataset_path, **dataset_kwargs)``."""
    import datasets

    return datasets.load_dataset(spec["dataset_path"], **spec["dataset_kwargs"])[split]


def test_local_task_reuses_the_stock_prompt_logic(shared_data) -> None:
    spec = tasks.task_spec("piqa", str(shared_data))
    assert spec["task"] == "piqa"
    assert spec["doc_to_text"] == "Question: {{goal}}\nAnswer:"
    assert spec["validation_split"] == "validation" and spec["test_split"] is None
    docs = load_docs(spec, "validation")
    assert len(docs) == 1838 and set(docs.column_names) == {"goal", "sol1", "sol2", "label"}


@pytest.mark.parametrize("name", sorted(tasks.LOCAL_FILES))
def test_every_local_task_builds_and_loads(name, shared_data) -> None:
    spec = tasks.task_spec(name, str(shared_data))
    split = spec["test_split"] or spec["validation_split"]
    assert spec["dataset_path"] == "json" and len(load_docs(spec, split)) > 0


def test_without_data_dir_the_stock_task_name_is_used() -> None:
    assert tasks.task_spec("piqa", None) == "piqa"


def test_unknown_task_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown eval task 'piqaa'.*did you mean piqa"):
        tasks.check_task_name("piqaa")


def test_missing_data_dir_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        tasks.task_spec("piqa", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"lacks piqa/validation\.jsonl"):
        tasks.task_spec("piqa", str(tmp_path))


def test_clean_metrics_drops_the_none_filter() -> None:
    raw = {"alias": "piqa", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict": 1.0}
    assert clean_metrics(raw) == {"acc": 0.5, "acc_stderr": 0.1, "exact_match,strict": 1.0}


def test_item_scores_keep_each_items_numbers_by_doc_id() -> None:
    names = ["acc", "acc_norm", "perplexity"]
    samples = [
        {"doc_id": 1, "filter": "none", "metrics": names, "acc": 0.0, "acc_norm": 1.0,
         "perplexity": (-1.2, 3)},
        {"doc_id": 0, "filter": "none", "metrics": names, "acc": 1.0, "acc_norm": 0.5,
         "perplexity": (-0.5, 2)},
        {"doc_id": 0, "filter": "strict", "metrics": ["acc"], "acc": 0.0},  # another filter
    ]  # fmt: skip
    # by doc id, the unfiltered responses, numbers only (a perplexity item is a pair)
    assert item_scores(samples) == {"doc_id": [0, 1], "acc": [1, 0], "acc_norm": [0.5, 1]}
    assert item_scores([]) == {}


def test_moyulm_finds_each_rows_real_length(tiny) -> None:
    live = build(compose_config(*TINY, "strategy=topk").strategy).attach(tiny.model)
    lm = MoyuLM(tiny, live, batch_size=4, prompt_fraction=0.5)
    lm._rows = {(5, 6, 7): (2, 2, "a"), (5, 6, 0, 9, 9): (4, 1, "b"), (8,): (1, 1, "a")}
    lm._lengths = [5, 3, 1]
    assert lm._row_segment([5, 6, 7, 0, 0]) == (3, 2, 2, "a")
    assert lm._row_segment([5, 6, 0, 9, 9]) == (5, 4, 1, "b")
    assert lm._row_segment([8, 0, 0, 0, 0]) == (1, 1, 1, "a")
    assert lm._row_segment([1, 2, 3]) == (3, 3, 0, None)  # unknown rows count in full
    with live:
        lm._rows, lm._lengths = {(5, 6, 7): (2, 1, "a"), (8,): (1, 1, "a")}, [3, 1]
        lm._model_call(torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert live.meter.entries == 4 * tiny.model.config.intermediate_size * 2


def test_batches_fit_the_token_budget_longest_first() -> None:
    from moyu_exp.errors import EnvironmentFault
    from moyu_exp.evaluation.harness import budgeted_chunks

    assert budgeted_chunks([5, 7, 3], batch_size=2, budget=14) == [[0, 1, 2]]  # lm-eval batches
    chunks = budgeted_chunks([5, 9, 3, 8], batch_size=3, budget=18)
    assert chunks == [[1, 3], [0, 2]]
    assert all(len(c) * max([5, 9, 3, 8][i] for i in c) <= 18 for c in chunks)
    assert sorted(i for c in chunks for i in c) == [0, 1, 2, 3]
    with pytest.raises(EnvironmentFault, match="a 30-token input needs more memory"):
        budgeted_chunks([30, 2], batch_size=2, budget=20)


def test_a_generation_run_ends_with_its_numbers(tmp_path) -> None:
    from moyu_exp import console, runner

    cfg = compose_config(*TINY, "strategy=griffin", "sparsity=0.5", *GENERATION, "bench=none")
    payload = runner.run(cfg, tmp_path)
    gen = payload["eval"]["generation"]
    text = console.render(payload, tmp_path)
    assert f"by distance 1-16: {gen['kl_1_16']:.4f} | 17-64: {gen['kl_17_64']:.4f} nats" in text
    assert (
        f"over 2 x 20 generated tokens (model-level sparsity {gen['model_sparsity']:.3f})" in text
    )


def test_report_draws_the_generation_curves(tmp_path) -> None:
    from moyu_exp import report, runner

    for strategy in ("griffin", "topk"):
        overrides = (f"strategy={strategy}", "sparsity=0.5", *GENERATION, "bench=none")
        runner.run(compose_config(*TINY, *overrides), tmp_path / strategy)
    table, _ = report.summarize([tmp_path], tmp_path)
    curves = report.generation_curves(report.collect([tmp_path]), table)
    assert [c["method"] for c in curves] == ["griffin", "topk"]  # one colour per method
    topk = next(r for r in table if r["strategy"] == "topk")
    assert (
        curves[1]["label"] == f"topk (s=0.5, model-level {topk['generation/model_sparsity']:.2f})"
    )
    assert len(curves[0]["kl"]) == 20 and report.generation_edges(table) == (16,)
    figure = tmp_path / "generation.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure.unlink()  # a figure missing from an unchanged summary is drawn again
    report.summarize([tmp_path], tmp_path)
    assert figure.is_file()
