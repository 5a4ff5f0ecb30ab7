"""Every config file composes; typed schemas and range checks reject bad values."""

from __future__ import annotations

import dataclasses

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from moyu_exp import config as config_module
from moyu_exp.config import ConfigError, build, validate
from moyu_exp.strategies import STRATEGIES, Strategy
from tests.conftest import CONF, compose_config

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in {"hydra"})
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_file_composes(group: str, option: str) -> None:
    extra = ["model.path=some/model"] if (group, option) == ("model", "hf") else []
    plus = "+" if group == "sweep" else ""  # sweep presets are opt-in: +sweep=<name>
    cfg = compose_config(f"{plus}{group}={option}", *extra)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    validate(cfg)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "hydra/launcher").glob("*.yaml")))
def test_launcher_presets_compose(option: str) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", [f"hydra/launcher={option}"], return_hydra_config=True)
    # moyu_exp's launcher; SLURM's default partition and no GPU unless the command line asks
    assert cfg.hydra.launcher._target_ == "hydra_plugins.moyu_exp_launcher.launcher.SlurmLauncher"
    assert cfg.hydra.launcher.partition is None and cfg.hydra.launcher.gpus_per_node is None


def test_every_strategy_has_a_yaml_and_instantiates() -> None:
    assert {p.stem for p in (CONF / "strategy").glob("*.yaml")} == set(STRATEGIES)
    for name in STRATEGIES:
        strategy = instantiate(compose_config(f"strategy={name}").strategy, _convert_="all")
        assert isinstance(strategy, Strategy)
        assert strategy.name == name


def test_sparsity_follows_the_top_level_key() -> None:
    cfg = compose_config("strategy=topk", "sparsity=0.7")
    assert cfg.strategy.sparsity == 0.7
    assert instantiate(cfg.strategy, _convert_="all").sparsity == 0.7


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_sparsity_out_of_range_is_a_config_error(value: str) -> None:
    cfg = compose_config(f"sparsity={value}")
    with pytest.raises(ConfigError, match=r"sparsity=.* is out of range: accepted values are 0"):
        validate(cfg)


@pytest.mark.parametrize("override", ["probe.hot_fraction=0", "probe.always_on=1.5"])
def test_probe_fractions_out_of_range_are_config_errors(override: str) -> None:
    cfg = compose_config("probe=hot_neurons", override)
    with pytest.raises(ConfigError, match=r"probe\.\w+=.* is out of range: accepted values"):
        validate(cfg)


def test_sparsity_of_the_wrong_type_fails_at_compose_time() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("sparsity=high")
    assert isinstance(err.value.__cause__, ValidationError)


def test_unknown_key_fails_at_compose_time() -> None:
    with pytest.raises(ConfigCompositionException, match="spars"):
        compose_config("spars=0.5")


def test_unknown_option_fails_at_compose_time() -> None:
    with pytest.raises(Exception, match="Could not find 'strategy/nope'"):
        compose_config("strategy=nope")


def test_enum_values_are_checked_at_compose_time() -> None:
    with pytest.raises(ConfigCompositionException, match=r"logger\.mode"):
        compose_config("logger.mode=sometimes")


def test_unknown_site_is_a_config_error() -> None:
    cfg = compose_config("strategy=topk", "strategy.sites=[mlp_nowhere]")
    with pytest.raises(ConfigError, match="unknown site 'mlp_nowhere': accepted sites are"):
        build(cfg.strategy)


# ------------------------------------------------------------- every typed leaf, every range
def _plugins() -> list[tuple[str, str, type]]:
    from moyu_exp.probes import PROBES

    return [("strategy", n, c) for n, c in sorted(STRATEGIES.items())] + [
        ("probe", n, c) for n, c in sorted(PROBES.items())
    ]


def _leaves(cls: type, kinds: tuple[str, ...]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if str(f.type) in kinds]


def _outside(accepted) -> float:
    return accepted.low - 1 if accepted.low is not None else accepted.high + 1


@pytest.mark.parametrize(("group", "name", "cls"), _plugins(), ids=lambda v: str(v)[:20])
def test_every_numeric_key_rejects_a_string_at_compose_time(group, name, cls) -> None:
    for key in _leaves(cls, ("int", "float")):
        with pytest.raises(ConfigCompositionException) as err:
            compose_config(f"{group}={name}", f"{group}.{key}=lots")
        assert isinstance(err.value.__cause__, ValidationError), key


@pytest.mark.parametrize(("group", "name", "cls"), _plugins(), ids=lambda v: str(v)[:20])
def test_every_ranged_key_rejects_a_value_outside(group, name, cls) -> None:
    ints = _leaves(cls, ("int",))
    cases = {key: _outside(r) for key, r in cls.RANGES.items() if key in _leaves(cls, ("float",))}
    cases |= {key: -1 if key in ("seed", "starts") else 0 for key in ints}
    cases |= {key: int(_outside(r)) for key, r in cls.RANGES.items() if key in ints}
    for key, value in cases.items():
        cfg = compose_config(f"{group}={name}", f"{group}.{key}={value}")
        with pytest.raises(ConfigError, match=rf"{group}\.{key}=.* is out of range: accepted"):
            validate(cfg)


def _typed_leaves(node, prefix: str = "") -> list[str]:
    """Keys of numeric, boolean and enum leaves (interpolations and plug-ins excluded)."""
    from omegaconf import DictConfig

    keys = []
    for key in node:
        full = f"{prefix}{key}"
        if full in ("strategy", "probe", "hydra") or OmegaConf.is_interpolation(node, key):
            continue
        value = node._get_node(key)
        if isinstance(node[key], DictConfig):
            keys += _typed_leaves(node[key], f"{full}.")
        elif type(value).__name__ in ("IntegerNode", "FloatNode", "BooleanNode", "EnumNode"):
            keys.append(full)
    return keys


ROOT = ["model=tiny_llama"]


def test_every_typed_key_of_the_config_rejects_a_wrong_value_in_one_line() -> None:
    from moyu_exp.errors import is_config_mistake, one_line

    keys = _typed_leaves(compose_config(*ROOT))
    assert {"sparsity", "eval.batch_size", "bench.mode", "model.dtype", "logger.mode"} <= set(keys)
    for key in keys:
        with pytest.raises(ConfigCompositionException) as err:
            compose_config(*ROOT, f"{key}=lots")
        message = one_line(err.value)
        assert is_config_mistake(err.value) and "\n" not in message, key
        assert key.split(".")[-1] in message and "lots" in message, message


@pytest.mark.parametrize("key", sorted(config_module.RANGES))
def test_every_ranged_key_of_the_config_rejects_a_value_outside(key: str) -> None:
    value = _outside(config_module.RANGES[key])
    value = int(value) if isinstance(OmegaConf.select(compose_config(*ROOT), key), int) else value
    cfg = compose_config(*ROOT, f"{key}={value}")
    with pytest.raises(ConfigError, match=rf"^{key}={value}\.?0* is out of range: accepted"):
        validate(cfg)
