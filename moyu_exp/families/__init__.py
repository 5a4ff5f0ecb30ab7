"""Model families: the registry of adapters, and the one hook mechanism.

Only the adapters (:mod:`moyu_exp.families.base` declares their interface) know module names,
configuration fields and cache layouts. A new family is one module that registers an adapter::

    from moyu_exp.families import register
    from moyu_exp.families.gated import GatedMLPAdapter

    register(GatedMLPAdapter(model_types=("my_llama",)))

Built in: gated MLPs (LLaMA, Mistral, Qwen2, Qwen3, Gemma; Gemma 2 and 3 with sandwich norms;
Phi-3 with fused projections), non-gated MLPs (OPT, GPT-NeoX) and routed experts (Mixtral).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from moyu_exp.families.base import Adapter, BlockParts, DecoderSpec
from moyu_exp.families.gated import FusedProjectionAdapter, GatedMLPAdapter, SandwichNormAdapter
from moyu_exp.families.nongated import GPT_NEOX_ADAPTER, OPT_ADAPTER
from moyu_exp.families.registry import (
    ADAPTERS,
    adapter_for,
    decoder_spec,
    decoding_types,
    model_types,
    register,
)
from moyu_exp.families.routed import RoutedExpertsAdapter
from moyu_exp.lazy import lazy_import
from moyu_exp.sites import SiteFn

torch = lazy_import("torch")

__all__ = [
    "ADAPTERS",
    "Adapter",
    "BlockParts",
    "DecoderSpec",
    "adapter_for",
    "decoder_spec",
    "decoding_types",
    "hooked",
    "model_types",
    "register",
]

for _adapter in (
    GatedMLPAdapter(),
    SandwichNormAdapter(),
    FusedProjectionAdapter(),
    OPT_ADAPTER,
    GPT_NEOX_ADAPTER,
    RoutedExpertsAdapter(),
):
    register(_adapter)


@contextmanager
def hooked(
    model: torch.nn.Module,
    fns: Iterable[tuple[tuple[str, int], SiteFn]],
    before_forward: Callable | None = None,
    after_forward: Callable | None = None,
) -> Iterator[None]:
    """Route each (site, layer)'s tensor through its function while the block runs (a function
    may observe the tensor or return a changed one; several may share a site, in order), and
    call ``before_forward(module, args, kwargs)`` before and ``after_forward(module, args,
    kwargs, output)`` after every forward of the model. The one
    hook mechanism of the project: strategies' attachments, calibration, TEAL's search and the
    probes all go through it. Every hook is removed on exit, also after an exception."""
    adapter = adapter_for(model)
    blocks = adapter.layers(model)
    handles = []
    try:
        if before_forward is not None:
            handles.append(model.register_forward_pre_hook(before_forward, with_kwargs=True))
        if after_forward is not None:
            handles.append(model.register_forward_hook(after_forward, with_kwargs=True))
        for (site, layer), fn in fns:
            handles.append(adapter.hook(blocks[layer], site, fn))
        yield
    finally:
        for handle in handles:
            handle.remove()
