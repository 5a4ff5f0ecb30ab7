"""strategy=moyu: each component is a key, GRIFFIN is the rule with every component off, the
layer allocation meets the target exactly and follows the calibrated profile. The default (attention
thresholds on) runs through every generic strategy test: sparsity 0 exact, restore, kernel mode
agreeing with simulated mode on each backend, the same counts."""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy.allocation=greedy", "strategy.allocation='greedy' is unknown"),
        ("strategy.sites=[attn_input]", "needs the site mlp_intermediate"),
        ("strategy.prior_tokens=-1", "0 <= strategy.prior_tokens"),
    ],
)
def test_bad_keys_fail_in_one_line(override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build(compose_config("strategy=moyu", override).strategy)
