"""Every config file composes; typed schemas and range checks reject bad values."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

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
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.gpus_per_node == 1


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
    with pytest.raises(ConfigError, match=r"probe\.\w+=.* must be in \(0, 1\]"):
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
