"""Tiny AudioFlamingo builders for the model tests (random init, hard-picked token ids, no tokenizer).
Also imported by tests/compat and by zero3_worker.py when that runs as a script."""
import torch

from megaflamingo.compat import af1
from megaflamingo.testing import tiny_llama_config, tiny_opt_config, tiny_qwen2_config

VOCAB = 96
TOK = dict(media=90, eoc=91, sep=92, pad=1, bos=2, eos=2)
D_AUDIO, WPA, SHOTS = 32, 4, 3  # L = 12 slots
CONFIGS = {"opt": tiny_opt_config, "llama": tiny_llama_config, "qwen2": tiny_qwen2_config}


def build(arch="opt", every_n=1, seed=0, gates=True, attn_dropout=0.0, num_layers=2):
    torch.manual_seed(seed)
    model = af1.build_model(
        {"cross_attn_every_n_layers": every_n,
         "audio_transformer_kwargs": dict(n_head=4, n_layers=2, d_inner=48, max_num_media=WPA * SHOTS,
                                          max_window_per_audio=WPA, dropout=attn_dropout)},
        dict(audio_embed_dim=D_AUDIO, max_num_window=WPA, max_num_fewshot=SHOTS),
        CONFIGS[arch](vocab_size=VOCAB, hidden_size=32, num_layers=num_layers), TOK,
    )
    if gates:  # init gates are 0 (xattn = identity): open them so the tests can see the audio path
        with torch.no_grad():
            for i, b in enumerate(model.xattn_blocks()):
                b.attn_gate.fill_(1.0 + 0.3 * i)
                b.ff_gate.fill_(0.5)
    return model.eval()


def batch(B=3, T=14, seed=1, fully_masked_row=True):
    """Rows: text before first <audio>, several <audio>, invalid windows; one row whose audio 0 has no
    valid window (its tokens before the 2nd <audio> hit AF1's fully-masked uniform case)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 80, (B, T), generator=g)
    ids[0, 2] = TOK["media"]
    ids[0, 7] = TOK["media"]
    ids[1, 0] = TOK["media"]
    if B > 2:
        ids[2, 4] = TOK["media"]
        ids[2, 6] = TOK["media"]
        ids[2, 10] = TOK["media"]
    L = WPA * SHOTS
    emb = torch.randn(B, L, D_AUDIO, generator=g)
    am = torch.rand(B, L, generator=g) > 0.3
    am[:, 0] = True
    if fully_masked_row:
        am[0, :WPA] = False
        am[0, WPA] = True
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, -3:] = 0  # right padding (training layout)
    labels = ids.masked_fill(attn == 0, -100)
    return dict(input_ids=ids, attention_mask=attn, audio_embeds=emb, audio_mask=am, labels=labels)
