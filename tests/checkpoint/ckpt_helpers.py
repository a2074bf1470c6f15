"""Helpers for the checkpoint tests (a uniquely named module: importable next to other dirs' conftests)."""
import torch

TINY_CONFIG = """\
model:
  lm: tiny
  tokenizer: tiny
  lm_config: {model_type: opt, vocab_size: 512, hidden_size: 32, num_hidden_layers: 2, ffn_dim: 64,
              num_attention_heads: 4, word_embed_proj_dim: 32, max_position_embeddings: 128, pad_token_id: 1,
              bos_token_id: 2, eos_token_id: 2, dropout: 0.0, attention_dropout: 0.0, activation_dropout: 0.0}
  audio_embed_dim: 16
  max_num_window: 4
  max_num_fewshot: 2
  audio_transformer: {n_head: 2, n_layers: 1, d_inner: 32, max_num_media: 8, max_window_per_audio: 4}
  xattn: {every_n_layers: 1, heads: 2, dim_head: 8, ff_mult: 2}
encoder: {name: tiny, random_init: true, embed_dim: 16, sample_rate: 16000, max_windows: 4}
"""


def synthetic_state_dict(seed: int = 0) -> dict:
    """Mixed dtypes and shapes, a tied pair (same tensor) and a 0-dim entry."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(40, 16, generator=g)
    return {
        "embed.weight": emb,
        "layers.0.w": torch.randn(16, 32, generator=g),
        "layers.0.b": torch.randn(32, generator=g).to(torch.bfloat16),
        "layers.1.w": torch.randn(32, 16, generator=g).half(),
        "layers.1.count": torch.arange(7, dtype=torch.int64),
        "layers.1.mask": torch.rand(5, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "big": torch.randn(64, 64, generator=g),  # 16 KB: larger than the tests' tiny part limit
        "head.weight": emb,  # tied to embed.weight
    }


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k



def build_tiny_model(config_path, seed: int = 0):
    """The model the tiny config builds (random init) with the xattn gates opened so audio matters."""
    from megaflamingo.config import load_config
    from megaflamingo.checkpoint.model_dir import config_tokenizer
    from megaflamingo.model import build_from_config

    cfg = load_config(config_path)
    tok = config_tokenizer(cfg)
    torch.manual_seed(seed)
    model, ids = build_from_config(cfg.model, tok)
    with torch.no_grad():
        for i, b in enumerate(model.xattn_blocks()):
            b.attn_gate.fill_(0.7 + 0.2 * i)
            b.ff_gate.fill_(0.4)
    return model.eval(), tok, ids


def tiny_batch(model, ids, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    B, T = 2, 12
    input_ids = torch.randint(10, 200, (B, T), generator=g)
    input_ids[input_ids == ids.media] = 9
    input_ids[0, 1] = ids.media
    input_ids[1, 0] = ids.media
    if model.max_num_fewshot > 1:
        input_ids[1, 6] = ids.media
    L = model.num_audio_slots
    audio = torch.randn(B, L, model.audio_embed_dim, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False
    return dict(input_ids=input_ids, attention_mask=torch.ones(B, T, dtype=torch.long), audio_embeds=audio,
                audio_mask=mask)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits
