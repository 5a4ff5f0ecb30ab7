"""Putting every schema into Hydra's ConfigStore: the root config, each group option's, and the
strategies' and probes' (derived from their dataclasses). Above the plug-ins in the layering, so
that :mod:`moyu_exp.config` (what everything imports) imports none of them."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from moyu_exp import config
from moyu_exp.probes import PROBES
from moyu_exp.strategies import STRATEGIES


def register_configs() -> None:
    """Store the root schema and one schema per group option (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=config.Config)
    groups: dict[str, dict[str, type]] = {
        "model": {
            "embedded": config.EmbeddedModelConfig,
            "hf": config.HFModelConfig,
            "tiny_llama": config.TinyLlamaConfig,
        },
        "dataset": {
            "default": config.DefaultTextConfig,
            "embedded": config.EmbeddedTextConfig,
            "pydoc": config.PydocTextConfig,
            "wikitext2": config.WikitextConfig,
        },
        "eval": {"eval": config.EvalConfig},
        "bench": {"bench": config.BenchConfig},
        "logger": {"logger": config.LoggerConfig},
        "strategy": {name: config.schema_for(cls) for name, cls in STRATEGIES.items()},
        "probe": {name: config.schema_for(cls) for name, cls in PROBES.items()},
    }
    for group, schemas in groups.items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config ``python -m moyu_exp <overrides>`` composes (for scripts and tests)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(config.CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))
