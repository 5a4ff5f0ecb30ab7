"""The registry of family adapters: which adapter describes which model type."""

from __future__ import annotations

from moyu_exp.errors import ConfigError
from moyu_exp.families.base import Adapter
from moyu_exp.lazy import lazy_import

torch = lazy_import("torch")

ADAPTERS: list[Adapter] = []


def register(adapter: Adapter) -> Adapter:
    """Make ``adapter`` the one for its ``model_types`` (a later registration wins)."""
    taken = set(adapter.model_types)
    ADAPTERS[:] = [a for a in ADAPTERS if not taken & set(a.model_types)] + [adapter]
    return adapter


def model_types() -> list[str]:
    """Every model type a registered adapter describes."""
    return sorted(t for a in ADAPTERS for t in a.model_types)


def decoding_types() -> list[str]:
    """The model types kernel mode's lean decoder runs."""
    return [t for a in ADAPTERS if a.decodes for t in a.model_types]


def decoder_spec(model: torch.nn.Module):
    """What kernel mode's lean decoder reads of ``model`` (a DecoderSpec), or a one-line
    ConfigError naming the model types it runs."""
    adapter = adapter_for(model)
    if not adapter.decodes:
        raise ConfigError(
            f"bench.mode=kernel supports model types {', '.join(decoding_types())}, "
            f"not '{model.config.model_type}'"
        )
    return adapter.decoder_spec(model)


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter for ``model``'s architecture, or a one-line ConfigError."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ConfigError(
        f"model type '{model_type}' has no activation-site adapter: "
        f"supported types are {', '.join(model_types())}"
    )
