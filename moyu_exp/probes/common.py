"""Shared measurements of the probes: MLP intermediates per token, top-k sets, overlaps, texts."""

from __future__ import annotations

from moyu_exp import datasets
from moyu_exp.activations import run_with_hooks
from moyu_exp.decode import ModelStepper, greedy
from moyu_exp.families import adapter_for, hooked
from moyu_exp.lazy import lazy_import
from moyu_exp.strategies.griffin import Griffin
from moyu_exp.strategies.topk import TopK

torch = lazy_import("torch")

SITE = "mlp_intermediate"


def intermediates(loaded, ids: torch.Tensor, site: str = SITE) -> dict[int, torch.Tensor]:
    """Per layer, the site's activations for every token of ``ids`` (1, T): (T, dim), float."""
    layers = range(len(adapter_for(loaded.model).layers(loaded.model)))
    seen: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def fn(x: torch.Tensor) -> torch.Tensor:
            seen[layer] = x[0].float().cpu()
            return x

        return fn

    run_with_hooks(
        loaded.model, [ids.to(loaded.device)], {(site, i): keep(i) for i in layers}, desc="probe"
    )
    return seen


def generate(loaded, prompt: torch.Tensor, steps: int, sites=(SITE,)):
    """Greedy decoding from ``prompt`` (1, T) (:func:`moyu_exp.decode.greedy`). Returns the ids
    fed after the prompt (1, steps) and, per (site, layer), the activations of the prompt
    (T, dim) and of each fed token (steps, dim)."""
    layers = range(len(adapter_for(loaded.model).layers(loaded.model)))
    keys = [(site, layer) for site in sites for layer in layers]
    seen: dict[tuple[str, int], list[torch.Tensor]] = {key: [] for key in keys}

    def keep(key):
        def fn(x: torch.Tensor) -> torch.Tensor:
            seen[key].append(x[0].float().cpu())
            return x

        return fn

    with hooked(loaded.model, [(key, keep(key)) for key in keys]):
        tokens, _ = greedy(ModelStepper(loaded.model), prompt, steps + 1)
    ids = torch.tensor([tokens[:steps]])
    prompt_z = {key: chunks[0] for key, chunks in seen.items()}
    decode_z = {key: torch.cat(chunks[1:], dim=0) for key, chunks in seen.items()}
    return ids, prompt_z, decode_z


def topk_sets(z: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool (T, d): the top-k strategy's kept set A_l(t) of every token, k = round((1 - s) d)."""
    return TopK(sparsity=sparsity).select(z)


def prompt_set(z: torch.Tensor, sparsity: float) -> torch.Tensor:
    """GRIFFIN's selection (the griffin strategy's own) from prompt activations z (T, d)."""
    everywhere = torch.ones(1, z.shape[0], dtype=torch.bool, device=z.device)
    return Griffin(sparsity=sparsity).select(z[None], everywhere)[0]


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Jaccard of bool sets along the last dim (broadcasting)."""
    inter = (a & b).sum(-1).float()
    union = (a | b).sum(-1).float().clamp_min(1)
    return inter / union


def recall(reference: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """|reference ∩ set_t| / |set_t| for each row of ``sets``."""
    return (reference & sets).sum(-1).float() / sets.sum(-1).float().clamp_min(1)


def prose_ids(tokenizer, tokens: int) -> torch.Tensor:
    """(1, tokens) of the project's prose, evaluation then calibration split, repeated if short."""
    text = "\n\n".join(datasets.embedded("embedded", "evaluation") + datasets.embedded())
    return _fit(tokenizer(text, add_special_tokens=False).input_ids, tokens)


def docs_ids(tokenizer, tokens: int) -> torch.Tensor:
    """(1, tokens) of CPython's documentation topics (code and technical prose)."""
    text = "\n\n".join(datasets.pydoc_topics(max_documents=400))
    return _fit(tokenizer(text, add_special_tokens=False).input_ids, tokens)


def random_ids(vocab_size: int, tokens: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (1, tokens), generator=generator)


def _fit(ids: list[int], tokens: int) -> torch.Tensor:
    while len(ids) < tokens:
        ids = ids + ids
    return torch.tensor([ids[:tokens]])


def vocab(loaded) -> int:
    return min(len(loaded.tokenizer), loaded.model.config.vocab_size)
