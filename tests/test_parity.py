"""Parity with plain lm-eval, request by request, on both embedded models (SmolLM2 and Gemma 3):
our path (the cached checkpoint, ``MoyuLM``, the attachment's protocol bookkeeping) against
lm-eval's own ``HFLM`` loading the GGUF itself, on the same requests of a multiple-choice task
(piqa) and a rolling perplexity task (the embedded prose): every request's log-likelihood within
LL_TOLERANCE and the same is-greedy flag, with a per-token method (top-k) attached to each
model, and dense on SmolLM2.

In CI the benchmark data missing is a failure (``MOYU_REQUIRE_DATA``, set by .ci/run), not a
skip: a green run must have compared something."""

from __future__ import annotations

import functools

import pytest
import torch

from moyu_exp import models
from moyu_exp.evaluation.harness import MoyuLM
from moyu_exp.evaluation.tasks import embedded_task, local_task, task_manager
from tests.conftest import attach, compose_config, require_data

pytestmark = [pytest.mark.smollm2, pytest.mark.xdist_group("smollm2")]

LL_TOLERANCE = 2e-4  # nats, absolute (largest seen: in the note)
PIQA_ITEMS = 16
# Gemma 3's cases run on a worker of their own group (its two models load once there), beside
# the SmolLM2 group rather than after it
MODELS = ["smollm2_135m", pytest.param("gemma3_270m", marks=pytest.mark.xdist_group("gemma3"))]


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    return _pair(request.param)


@functools.cache
def _pair(name: str):
    """(ours, plain): the model as moyu_exp loads it, and plain lm-eval's HFLM loading the same
    GGUF itself (the reference we must match). Loaded once a worker: xdist may tear the module
    fixture down between two cases of a model (Gemma 3's loads took 60 s each time in CI)."""
    from lm_eval.models.huggingface import HFLM

    cfg = compose_config(f"model={name}").model
    gguf = models.gguf_path(cfg)
    plain = HFLM(
        pretrained=str(gguf.parent), gguf_file=gguf.name, dtype="float32", device="cpu",
        batch_size=8,
    )  # fmt: skip
    return models.load(cfg), plain


@pytest.fixture(scope="module")
def data_dir():
    return str(require_data())


def responses(lm, specs: list) -> dict[tuple[str, int, int], list]:
    """{(task, doc, request): response} of every request lm-eval sends ``lm`` for ``specs``."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(
        model=lm,
        tasks=specs,
        limit=PIQA_ITEMS,
        log_samples=True,
        use_cache=None,
        cache_requests=False,
        bootstrap_iters=0,
        task_manager=task_manager(("piqa",)),
    )
    return {
        (task, sample["doc_id"], i): list(resp[0]) if isinstance(resp[0], tuple) else [resp[0]]
        for task, samples in out["samples"].items()
        for sample in samples
        for i, resp in enumerate(sample["resps"])
    }


def compare(ours: dict, theirs: dict) -> float:
    """The largest |log-likelihood difference| over the requests; is-greedy flags equal."""
    assert ours.keys() == theirs.keys() and ours
    largest = 0.0
    for key, (mine, reference) in ((k, (ours[k], theirs[k])) for k in ours):
        largest = max(largest, abs(float(mine[0]) - float(reference[0])))
        assert mine[1:] == reference[1:], f"is-greedy differs at {key}"
    return largest


# (model, method). Gemma 3's dense case is implied by its top-k case (each side runs its own load
# of the model, so a difference in the loaded weights shows in both) and took a minute of CI.
CASES = [
    ("smollm2_135m", "dense"),
    ("smollm2_135m", "topk"),
    pytest.param("gemma3_270m", "topk", marks=pytest.mark.xdist_group("gemma3")),
]


@pytest.mark.parametrize(("pair", "name"), CASES, indirect=["pair"])
def test_every_request_equals_plain_lm_eval(name, pair, data_dir, capsys) -> None:
    specs = [local_task("piqa", data_dir), embedded_task()]
    model, plain = pair
    with attach(name, model, "sparsity=0.5") as live:
        ours = responses(MoyuLM(model, live, batch_size=8, prompt_fraction=0.5), specs)
    # the same method on plain lm-eval's own model (its batches, its padding)
    with attach(name, models.LoadedModel(plain.model, plain.tokenizer), "sparsity=0.5"):
        theirs = responses(plain, specs)
    largest = compare(ours, theirs)
    assert {task for task, _, _ in ours} == {"piqa", "embedded"}
    assert sum(task == "piqa" for task, _, _ in ours) == 2 * PIQA_ITEMS  # two choices an item
    with capsys.disabled():
        print(
            f"\n{model.info['name']} {name}: {len(ours)} requests, "
            f"largest |d loglikelihood| {largest:.2e}"
        )
    assert largest <= LL_TOLERANCE


@pytest.mark.parametrize("pair", MODELS[:1], indirect=True)  # the comparison, not the model
def test_a_biased_log_likelihood_fails_the_comparison(pair, data_dir) -> None:
    """The comparison catches a bias far smaller than an aggregate accuracy would show."""
    specs = [embedded_task()]
    model, plain = pair
    with attach("dense", model) as live:
        ours = responses(MoyuLM(model, live, batch_size=8, prompt_fraction=0.5), specs)
    theirs = responses(plain, specs)
    biased = {k: [v[0] + 10 * LL_TOLERANCE, *v[1:]] for k, v in ours.items()}
    assert compare(ours, theirs) <= LL_TOLERANCE
    with pytest.raises(AssertionError):
        assert compare(biased, theirs) <= LL_TOLERANCE
    assert torch.isfinite(torch.tensor([v[0] for v in ours.values()])).all()
