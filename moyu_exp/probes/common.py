"""Shared measurements of the probes: MLP intermediates per token, top-k sets, overlaps, texts."""

from __future__ import annotations

from moyu_exp import datasets
from moyu_exp.activations import run_with_hooks
from moyu_exp.lazy import lazy_import
from moyu_exp.sites import adapter_for
from moyu_exp.strategies import keep_count

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
    """Greedy decoding from ``prompt`` (1, T). Returns the generated ids (1, steps) and, per
    (site, layer), the activations of the prompt (T, dim) and of each generated token
    (steps, dim)."""
    from moyu_exp.bench import cache_kwarg

    model = loaded.model
    adapter = adapter_for(model)
    blocks = adapter.layers(model)
    keys = [(site, layer) for site in sites for layer in range(len(blocks))]
    seen: dict[tuple[str, int], list[torch.Tensor]] = {key: [] for key in keys}

    def keep(key):
        def fn(x: torch.Tensor) -> torch.Tensor:
            seen[key].append(x[0].float().cpu())
            return x

        return fn

    handles = [adapter.hook(blocks[layer], site, keep((site, layer))) for site, layer in keys]
    kw = cache_kwarg(model)
    generated: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            out = model(prompt.to(loaded.device), use_cache=True)
            for _ in range(steps):
                token = out.logits[:, -1:].argmax(-1)
                generated.append(token)
                out = model(token, use_cache=True, **{kw: getattr(out, kw)})
    finally:
        for handle in handles:
            handle.remove()
    ids = torch.cat(generated, dim=1).cpu()
    prompt_z = {key: chunks[0] for key, chunks in seen.items()}
    decode_z = {key: torch.cat(chunks[1:], dim=0) for key, chunks in seen.items()}
    return ids, prompt_z, decode_z


def topk_sets(z: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool (T, d): the top-k of |z_t| per token, k = round((1 - s) * d)."""
    k = keep_count(sparsity, z.shape[-1])
    keep = torch.zeros_like(z, dtype=torch.bool)
    return keep.scatter_(-1, z.abs().topk(k, dim=-1).indices, True)


def prompt_set(z: torch.Tensor, sparsity: float) -> torch.Tensor:
    """GRIFFIN's selection from prompt activations z (T, d): top-k of ||(z_t / ||z_t||)_t||."""
    zn = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    score = zn.norm(dim=0)
    k = keep_count(sparsity, z.shape[-1])
    keep = torch.zeros_like(score, dtype=torch.bool)
    return keep.scatter_(-1, score.topk(k).indices, True)


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
