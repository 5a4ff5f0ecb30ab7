"""strategy=moyu: each component is a key, GRIFFIN is the rule with every component off, the
layer allocation meets the target exactly and follows the calibrated profile. The default (attention
thresholds on) runs through every generic strategy test: sparsity 0 exact, restore, kernel mode
agreeing with simulated mode on each backend, the same counts."""

from __future__ import annotations

import pytest
import torch

from moyu_exp.activations import threshold_at
from moyu_exp.config import ConfigError, build
from moyu_exp.strategies.moyu import BANDS, allocate
from tests.conftest import attach, compose_config

GRIFFIN_RULE = [
    "strategy.prior_tokens=0",
    "strategy.output_weighted=false",
    "strategy.allocation=uniform",
    "strategy.attn_sparsity=0",
]


@torch.inference_mode()
def scored(tiny, live, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids`` with the first half as the dense prompt that selects the set."""
    half = ids.shape[1] // 2
    with live, live.segments(torch.tensor([ids.shape[1]]), torch.tensor([half])):
        return tiny.model(ids).logits


def test_every_component_off_is_griffin(tiny, tiny_batch) -> None:
    ids = tiny_batch[:1]
    griffin = scored(tiny, attach("griffin", tiny, "sparsity=0.6"), ids)
    moyu = scored(tiny, attach("moyu", tiny, "sparsity=0.6", *GRIFFIN_RULE), ids)
    assert torch.equal(moyu, griffin)
    # and each component changes the decision (none is a no-op)
    for key in (
        "strategy.prior_tokens=64",
        "strategy.allocation=profile",
        "strategy.output_weighted=true",
        "strategy.attn_sparsity=0.5",
        "strategy.mlp_input_sparsity=0.4",
    ):
        overrides = [o for o in GRIFFIN_RULE if o.split("=")[0] != key.split("=")[0]]
        changed = scored(tiny, attach("moyu", tiny, "sparsity=0.6", *overrides, key), ids)
        assert not torch.equal(changed, griffin), key


def test_the_profile_allocation_meets_the_target_and_varies_by_layer(tiny) -> None:
    d_ff = tiny.model.config.intermediate_size
    layers = tiny.model.config.num_hidden_layers
    with attach("moyu", tiny, "sparsity=0.6") as live:
        keeps = live.state.keeps
    assert sum(keeps.values()) == layers * round(0.4 * d_ff)
    profiles = torch.stack([live.strategy.profile(live.calibration, i) for i in range(layers)])
    assert profiles.shape == (layers, BANDS)
    assert torch.all(profiles[:, 0] == 0) and torch.all(profiles[:, -1] > profiles[:, 1])


def test_allocate_spends_sparsity_where_the_error_grows_least() -> None:
    bands = torch.linspace(0, 1, BANDS) ** 2  # convex: spreading beats concentrating
    profiles = torch.stack([bands, 4 * bands, bands])  # layer 1 costs four times as much
    keeps = allocate(profiles, 0.5, 1000)
    assert sum(keeps) == 3 * 500
    assert keeps[1] > max(keeps[0], keeps[2])  # the costly layer keeps more
    assert abs(keeps[0] - keeps[2]) <= 1000 // BANDS  # the two alike, up to the partial band
    equal = allocate(torch.stack([bands] * 3), 0.5, 1000)
    assert max(equal) - min(equal) <= 1000 // BANDS  # equal curves: equal sets, up to a band
    assert allocate(profiles, 0.97, 1000) == [30, 30, 30]  # no bands left: uniform
    assert allocate(profiles, 0.0, 1000) == [1000, 1000, 1000]


def test_greedy_attention_levels_are_teals_path_and_reuse_its_search(
    tiny, tiny_batch, tmp_path, monkeypatch
) -> None:
    from moyu_exp.strategies import greedy as search

    monkeypatch.setenv("MOYU_CACHE_DIR", str(tmp_path / "empty_cache"))
    original, searched = search.greedy_path, []
    monkeypatch.setattr(
        search, "greedy_path", lambda s, *a: searched.append(s.layer) or original(s, *a)
    )
    with attach("teal", tiny, "sparsity=0.4") as live:  # TEAL as published: its greedy path
        published = {i: live.strategy.site_levels(live.calibration, i) for i in (0, 1)}
    greedy = ("sparsity=0.6", "strategy.attn_allocation=greedy", "strategy.attn_sparsity=0.4")
    with attach("moyu", tiny, *greedy) as live:
        levels = {i: live.strategy.attention_levels(live.calibration, i) for i in (0, 1)}
        rules = live.state.rules
        tables = {key: live.calibration[f"table.{key[0]}.{key[1]}"] for key in rules}
    assert searched == [0, 1]  # MOYU read TEAL's cached path: no second search
    for layer in (0, 1):
        assert levels[layer] == {s: published[layer][s] for s in ("attn_input", "o_proj_input")}
        for site, level in levels[layer].items():
            assert rules[(site, layer)].threshold == threshold_at(tables[(site, layer)], level)
    assert len({level for by_site in levels.values() for level in by_site.values()}) > 1
    ids = tiny_batch[:1]
    uniform = scored(tiny, attach("moyu", tiny, *greedy[::2]), ids)
    assert not torch.equal(scored(tiny, attach("moyu", tiny, *greedy), ids), uniform)


def test_the_calibration_key_follows_teals_path_only_when_it_is_read() -> None:
    from moyu_exp.strategies.teal import Teal

    def key(*overrides: str) -> dict:
        return build(compose_config("strategy=moyu", *overrides).strategy).calibration_key()

    greedy = key("strategy.attn_allocation=greedy")["attn_path"]
    assert greedy == {"version": Teal.calibration_version, **Teal().greedy_params()}
    assert key()["attn_path"] is None  # uniform levels read no path
    assert key("strategy.attn_allocation=greedy", "strategy.attn_sparsity=0")["attn_path"] is None


def test_attention_follows_the_target_when_attn_sparsity_is_null(tiny) -> None:
    with attach("moyu", tiny, "sparsity=0.3", "strategy.attn_sparsity=null") as live:
        assert live.strategy.attention_levels(live.calibration, 1) == {
            "attn_input": 0.3,
            "o_proj_input": 0.3,
        }
        assert live.state.rules[("attn_input", 1)].threshold > 0
    with attach("moyu", tiny, "sparsity=0", "strategy.attn_sparsity=null") as live:
        assert set(live.strategy.attention_levels(live.calibration, 0).values()) == {0.0}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy.allocation=greedy", "strategy.allocation='greedy' is unknown"),
        ("strategy.sites=[attn_input]", "needs the site mlp_intermediate"),
        ("strategy.prior_tokens=-1", "0 <= strategy.prior_tokens"),
        ("strategy.attn_allocation=profile", "strategy.attn_allocation='profile' is unknown"),
        ("strategy.attn_sparsity=1", "0 <= strategy.attn_sparsity < 1"),
        ("strategy.mlp_input_sparsity=-0.1", "0 <= strategy.mlp_input_sparsity < 1"),
    ],
)
def test_bad_keys_fail_in_one_line(override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build(compose_config("strategy=moyu", override).strategy)
