"""Tiny random-init LM configs (OPT, Llama, Qwen2 shapes) for tests, benchmarks and CPU configs."""
from __future__ import annotations


def tiny_opt_config(vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, **kw):
    from transformers import OPTConfig

    args = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        ffn_dim=hidden_size * 4,
        num_attention_heads=4,
        max_position_embeddings=1024,
        word_embed_proj_dim=hidden_size,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
    )
    args.update(kw)
    return OPTConfig(**args)


def _tiny_rope_lm_args(vocab_size: int, hidden_size: int, num_layers: int) -> dict:
    """Shape shared by the Llama-family tiny configs (RoPE, grouped-query attention)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )


def tiny_llama_config(vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, **kw):
    from transformers import LlamaConfig

    args = _tiny_rope_lm_args(vocab_size, hidden_size, num_layers)
    args.update(pad_token_id=1, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    args.update(kw)
    return LlamaConfig(**args)


def tiny_qwen2_config(vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, **kw):
    from transformers import Qwen2Config

    args = _tiny_rope_lm_args(vocab_size, hidden_size, num_layers)
    args.update(tie_word_embeddings=True)
    args.update(kw)
    return Qwen2Config(**args)


def tiny_lm_config_dict(model_type: str = "opt", vocab_size: int = 512, **kw) -> dict:
    """A ``model.lm_config`` dict for YAML configs (random-init LM)."""
    build = {"opt": tiny_opt_config, "llama": tiny_llama_config, "qwen2": tiny_qwen2_config}[model_type]
    return build(vocab_size=vocab_size, **kw).to_dict()
