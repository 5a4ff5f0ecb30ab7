"""Site adapters: every site of every supported architecture is reachable; layer selection."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moyu_exp.config import ConfigError
from moyu_exp.families import adapter_for
from moyu_exp.sites import SITES, resolve_layers
from moyu_exp.strategies.topk import TopK

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma"]


def tiny_model(model_type: str):
    config = AutoConfig.for_model(
        model_type,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ARCHS)
def test_every_site_is_hooked_with_its_dimension(model_type: str) -> None:
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        dense = model(ids).logits
    for site in SITES:
        seen: list[torch.Size] = []

        def record(x, site=site, seen=seen):
            seen.append(x.shape)
            return torch.zeros_like(x)

        handle = adapter.hook(adapter.layers(model)[1], site, record)
        with torch.inference_mode():
            changed = model(ids).logits
        handle.remove()
        assert seen == [torch.Size([1, 5, adapter.dim(model, site)])], site
        assert not torch.equal(changed, dense), f"zeroing {site} changed nothing"
        assert all(
            isinstance(m, torch.nn.Linear) for m in adapter.readers(model.model.layers[0], site)
        )


def test_unsupported_architecture_is_a_config_error() -> None:
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=32)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ConfigError, match="model type 'gpt2' has no activation-site adapter"):
        adapter_for(model)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", [0, 1, 2, 3, 4]),
        ([0, 2], [0, 2]),
        ([-1], [4]),
        (3, [3]),
        ("1:-1", [1, 2, 3]),
        (":2", [0, 1]),
        ("::2", [0, 2, 4]),
    ],
)
def test_layer_specs(spec, expected) -> None:
    assert resolve_layers(spec, 5) == expected


@pytest.mark.parametrize("spec", [[5], [-6], "a:b", "4:2", ["x"], "0:4:0", "1:2:3:4"])
def test_bad_layer_specs_are_config_errors(spec) -> None:
    with pytest.raises(ConfigError, match="layers"):
        resolve_layers(spec, 5)


@pytest.mark.parametrize("spec", ["a:b", ["x"], "0:4:0"])
def test_a_malformed_layer_spec_fails_when_the_strategy_is_built(spec) -> None:
    """Before any model loads: its syntax needs no model, only its range does."""
    with pytest.raises(ConfigError, match="layers"):
        TopK(sparsity=0.5, layers=spec)
    TopK(sparsity=0.5, layers=[9])  # out of range only for a model with fewer layers
