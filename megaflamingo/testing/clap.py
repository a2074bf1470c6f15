"""Offline stand-ins for LAION-CLAP: a RoBERTa-style tokenizer trained at run time, a tiny RoBERTa
text branch, and LAION-layout checkpoints (``state_dict`` with ``module.`` keys) with random weights,
so re-ranking is tested without the hub; and the one torchvision name LAION's HTSAT imports, for
machines where torchvision cannot be imported.

The text branch is built with transformers' ``RobertaModel`` + LAION's ``Sequential(Linear, ReLU,
Linear)`` projection (the layout LAION-CLAP's own code has), not with the class the library loads
into, so a wrong key map or a different architecture shows up as different embeddings.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import sys
import types
from pathlib import Path

import torch
from torch import nn

PROJ = 512  # LAION-CLAP's joint embedding size (the audio projection's output)
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..4

_WORDS = """a the tone chirp rising falling white pink noise click train modulated low high steady hum beep
sweeps up down bright dark hiss rumble clicks repeats pulses loud quiet sound music dog bark rain car siren bird
speech guitar piano violin drums engine water wind people talking laughing""".split()


@functools.lru_cache(maxsize=2)
def _tokenizer_json(vocab_size: int) -> str:
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = np.random.default_rng(1)
    corpus = [" ".join(rng.choice(_WORDS, size=int(rng.integers(3, 12)))) for _ in range(300)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tok.to_str()


def tiny_roberta_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)), bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                  cls_token="<s>", sep_token="</s>")
    assert tok.pad_token_id == 1 and len(tok) > 64, (tok.pad_token_id, len(tok))
    return tok


def roberta_config(vocab_size: int = 400, hidden: int = 128, layers: int = 2):
    from transformers import RobertaConfig

    # 64-dim heads, like roberta-base (the loader infers heads that way); LAION's positions: 77 + 2.
    return RobertaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, intermediate_size=2 * hidden, max_position_embeddings=80,
                         type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class LaionTextBranch(nn.Module):
    """LAION-CLAP's text path: RoBERTa pooler output -> Linear/ReLU/Linear -> L2 norm."""

    def __init__(self, config, seed: int = 0):
        from transformers import RobertaModel

        super().__init__()
        torch.manual_seed(seed)
        self.text_branch = RobertaModel(config, add_pooling_layer=True)
        self.text_projection = nn.Sequential(nn.Linear(config.hidden_size, PROJ), nn.ReLU(), nn.Linear(PROJ, PROJ))
        for m in self.modules():  # larger than HF's init so texts get clearly different embeddings
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.2)
        self.eval()

    @torch.no_grad()
    def forward(self, tokenizer, texts):
        enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        pooled = self.text_branch(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        return torch.nn.functional.normalize(self.text_projection(pooled), dim=-1)


@functools.lru_cache(maxsize=1)
def _torchvision_importable() -> bool:
    try:
        import torchvision.ops.misc  # noqa: F401
        return True
    except Exception:
        return False


def install_torchvision_stub() -> None:
    """LAION's HTSAT file imports ``torchvision.ops.misc.FrozenBatchNorm2d`` (for freezing only);
    torchvision does not import on CPU test machines. Provides that one name, when needed (for a
    whole process: the demo server a test starts)."""
    if _torchvision_importable():
        return
    import transformers  # noqa: F401  (it probes torchvision at import; do that before stubbing)

    def stub(name, **attrs):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__dict__.update(attrs)
        return m

    misc = stub("torchvision.ops.misc", FrozenBatchNorm2d=type("FrozenBatchNorm2d", (nn.Module,), {}))
    ops = stub("torchvision.ops", misc=misc)
    sys.modules.update({"torchvision": stub("torchvision", ops=ops), "torchvision.ops": ops,
                        "torchvision.ops.misc": misc})


@contextlib.contextmanager
def torchvision_stub():
    """:func:`install_torchvision_stub` for a block (module-scoped fixtures), undone afterwards
    together with the LAION modules imported under it."""
    before = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.ops", "torchvision.ops.misc")}
    install_torchvision_stub()
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for alias in [k for k in sys.modules if k.startswith("_megaflamingo_isolated_laion_clap")]:
            sys.modules.pop(alias, None)


def write_laion_checkpoint(path: Path, text: LaionTextBranch, fusion: bool = False, seed: int = 0,
                           audio: bool = True) -> Path:
    """A LAION-layout ``.pt``: ``{"epoch", "state_dict": {"module.<key>": tensor}}`` with the
    text branch above, LAION's contrastive-head leftovers, the legacy ``position_ids`` buffer, and
    (``audio``) a random HTSAT-tiny audio branch + projection (needs torchvision or the stub)."""
    sd = {k: v for k, v in text.state_dict().items()}
    sd["text_branch.embeddings.position_ids"] = torch.arange(text.text_branch.config.max_position_embeddings)[None]
    sd["text_transform.sequential.0.weight"] = torch.randn(PROJ, PROJ)
    sd["logit_scale_t"] = torch.tensor(2.0)
    if audio:
        from megaflamingo.audio.encoders import build_encoder

        enc = build_encoder("laion-clap", None, True, "cpu", None, seed, fusion, window_s=10.0)
        sd.update({k: v for k, v in enc.module.state_dict().items() if not k.startswith("mel.")})
    torch.save({"epoch": 45, "state_dict": {f"module.{k}": v.contiguous() for k, v in sd.items()}}, str(path))
    return path
