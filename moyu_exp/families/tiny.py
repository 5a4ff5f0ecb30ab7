"""Tiny random models of every built-in family, from their transformers config classes (tests,
and timing at shapes that cannot be downloaded): ``model=tiny model.family=<family>``."""

from __future__ import annotations

from typing import Any

from moyu_exp.errors import ConfigError

# family -> (transformers config class, causal-LM class, extra config keys from the shape)
TINY_FAMILIES: dict[str, tuple[str, str, Any]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", lambda head_dim: {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", lambda head_dim: {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", lambda head_dim: {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", lambda head_dim: {"head_dim": head_dim}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", lambda head_dim: {"head_dim": head_dim}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        lambda head_dim: {"head_dim": head_dim, "query_pre_attn_scalar": head_dim},
    ),
    "gemma3": (  # sliding and global attention layers alternating, as 5:1 in Gemma 3
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        lambda head_dim: {
            "head_dim": head_dim,
            "query_pre_attn_scalar": head_dim,
            "sliding_window": 16,
            "sliding_window_pattern": 2,
        },
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", lambda head_dim: {}),  # fused qkv and gate/up
    # non-gated MLPs and LayerNorms with a bias; no grouped-query attention
    "opt": (  # ReLU fc1/fc2, pre-LN (as OPT-125m and every size but 350m)
        "OPTConfig",
        "OPTForCausalLM",
        lambda head_dim: {"do_layer_norm_before": True, "activation_function": "relu"},
    ),
    "gpt_neox": (  # GELU, fused query_key_value, parallel attention and MLP (Pythia)
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        lambda head_dim: {"use_parallel_residual": True, "hidden_act": "gelu"},
    ),
    "mixtral": (  # routed experts: 4 per block, 2 per token
        "MixtralConfig",
        "MixtralForCausalLM",
        lambda head_dim: {"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
}
# the shape keys a family's config spells differently, and those it does not have
RENAMED = {"opt": {"intermediate_size": "ffn_dim"}}
NO_GQA = ("opt", "gpt_neox")  # num_key_value_heads does not apply
# families researchers bring whose blocks no adapter describes yet
NO_ADAPTER_YET = ("qwen2_moe", "olmoe")


def tiny_config(family: str, tokenizer, **shape):
    """The transformers config of a tiny ``family`` model of the given shape."""
    import transformers

    if family not in TINY_FAMILIES:
        accepted = ", ".join(TINY_FAMILIES)
        if family in NO_ADAPTER_YET:
            raise ConfigError(
                f"model.family='{family}' has no activation-site adapter yet: accepted families "
                f"are {accepted}"
            )
        raise ConfigError(f"model.family='{family}' is unknown: accepted families are {accepted}")
    config_class, _, extra = TINY_FAMILIES[family]
    head_dim = shape["hidden_size"] // max(1, shape["num_attention_heads"])
    if family in NO_GQA:
        shape.pop("num_key_value_heads")
    if family == "opt":
        shape["word_embed_proj_dim"] = shape["hidden_size"]
    renamed = RENAMED.get(family, {})
    return getattr(transformers, config_class)(
        **{renamed.get(key, key): value for key, value in shape.items()},
        **extra(head_dim),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def model_type(family: str) -> str:
    """The transformers model type of a tiny ``family`` model (what adapters are keyed by)."""
    import transformers

    return getattr(transformers, TINY_FAMILIES[family][0]).model_type
