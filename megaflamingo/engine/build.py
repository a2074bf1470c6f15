"""Build everything a run needs from a Config: tokenizer, (partitioned) LM, AudioFlamingo, loaders,
and the pre-flight checks that must fail before any rank starts training."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from megaflamingo.config import Config, ConfigError

from .distributed import comm_device

log = logging.getLogger("megaflamingo.train")


# ------------------------------------------------------------------------------------------ tokenizer


def build_tokenizer(cfg: Config):
    from megaflamingo.testing import EOC_TOKEN, MEDIA_TOKEN, SEP_TOKEN, token_ids, tiny_tokenizer

    name = cfg.model.tokenizer or cfg.model.lm
    if name in ("tiny", "tiny-opt"):
        tok = tiny_tokenizer("opt")
    elif name == "tiny-llama":
        tok = tiny_tokenizer("llama")
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name, cache_dir=cfg.model.cache_dir)
        # AF1 adds its special tokens to the LM's tokenizer (<SEP> as sep, <audio>/<|endofchunk|> extra).
        extra = [t for t in (MEDIA_TOKEN, EOC_TOKEN) if t not in tok.get_vocab()]
        special = {"additional_special_tokens": extra} if extra else {}
        if SEP_TOKEN not in tok.get_vocab():
            special["sep_token"] = SEP_TOKEN
        if tok.pad_token is None:
            special["pad_token"] = "<PAD>"
        if special:
            tok.add_special_tokens(special)
        tok.padding_side = "right"
    return tok, token_ids(tok)


# ------------------------------------------------------------------------------------------ model


def build_lm(cfg: Config, vocab_size: int, ds_config: Optional[dict]) -> nn.Module:
    """The HF causal LM; partitioned while it is built (zero.Init through transformers' DeepSpeed
    integration) when ZeRO-3 and ``deepspeed.zero_init`` are on, so a 7B LM never exists whole."""
    from transformers import AutoConfig, AutoModelForCausalLM

    m = cfg.model
    zero3 = bool(ds_config) and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3
    hf_ds = None
    if zero3 and cfg.deepspeed.zero_init:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # must stay referenced while the LM is built
    kw = dict(attn_implementation=m.attn_implementation)
    if m.lm_config is not None:
        conf = dict(m.lm_config)
        conf_obj = AutoConfig.for_model(conf.pop("model_type"), **conf)
        lm = AutoModelForCausalLM.from_config(conf_obj, **kw)
    else:
        lm = AutoModelForCausalLM.from_pretrained(m.lm, cache_dir=m.cache_dir, dtype=torch.float32, **kw)
    # Exactly len(tokenizer) rows, as AF1 (resize_token_embeddings(len(text_tokenizer))): OPT ships
    # 50272 rows, AF1's tokenizer has 50268 tokens, so AF1 checkpoints hold 50268-row embeddings.
    if lm.get_input_embeddings().num_embeddings != vocab_size:
        lm.resize_token_embeddings(vocab_size)
    del hf_ds
    return lm


def build_flamingo(cfg: Config, lm: nn.Module, token_ids: dict, ds_config: Optional[dict]) -> nn.Module:
    from megaflamingo.model import apply_freeze_policy, build_model, policy_from_train_config

    zero3 = bool(ds_config) and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3
    ctx = contextlib.nullcontext()
    if zero3 and cfg.deepspeed.zero_init:
        import deepspeed

        # The xattn blocks of a 1.3B LM are ~0.9B parameters: partition them at creation too.
        # dtype follows the config (passing dtype= explicitly picks bf16 on CPU in DeepSpeed 0.19).
        ctx = deepspeed.zero.Init(config_dict_or_path=ds_config)
    with ctx:
        model = build_model(cfg.model, lm=lm, token_ids=token_ids)
    policy, emb = policy_from_train_config(cfg.train)
    report = apply_freeze_policy(model, policy, emb)
    log.info("%s", report)
    return model


def load_init_weights(model: nn.Module, path: str, rank: int) -> dict:
    """Initialise from a previous stage: a DeepSpeed checkpoint dir (ours), a consolidated state-dict
    file (.pt/.pth/.bin/.safetensors: ours or AF1's, through compat.af1's key mapping), or a dir
    holding one.

    Only rank 0 reads the checkpoint: an AF1-size one is ~9 GB, a 7B LM's far more, and every rank of
    a node holding a copy would exhaust host memory. The other ranks learn its keys and shapes (one
    broadcast) so all run the same collectives; ZeRO-3 parameters are gathered one at a time with
    rank 0 writing, the others get rank 0's tensors by broadcast. A checkpoint error on rank 0 is
    raised on every rank (no rank is left waiting in a collective)."""
    import torch.distributed as dist

    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    reader = rank == 0 or not multi
    sd, header, error = {}, None, None
    if reader:
        try:
            sd = _canonical_state_dict(model, Path(path))
            header = {"shapes": {k: tuple(v.shape) for k, v in sd.items()}}
        except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks, then re-raise
            error, header = e, {"error": f"{type(e).__name__}: {e}"}
    if multi:
        box = [header]
        dist.broadcast_object_list(box, src=0)
        header = box[0]
    if error is not None:
        raise error
    if "error" in header:
        raise ValueError(f"train.init_from={path}: rank 0 could not read it: {header['error']}")
    shapes = header["shapes"]

    # remove_duplicate=False: tied weights (OPT's lm_head = embed_tokens) answer to both names.
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    unexpected = sorted(set(shapes) - set(named))
    if unexpected:
        raise ValueError(f"train.init_from={path}: {len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
    for name, shape in shapes.items():
        t = named[name]
        want = tuple(getattr(t, "ds_shape", t.shape))
        if tuple(shape) != want:
            raise ValueError(f"train.init_from={path}: {name} has shape {tuple(shape)}, model {want}")
    missing = sorted(set(named) - set(shapes))
    loaded = 0
    for name, t in named.items():  # the same order on every rank
        if name not in shapes:
            continue
        if hasattr(t, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([t], modifier_rank=0):
                if reader:
                    with torch.no_grad():
                        t.data.copy_(sd[name].to(t.dtype))
        else:
            with torch.no_grad():
                if reader:
                    t.data.copy_(sd[name].to(t.dtype))
                if multi:
                    buf = t.data.to(comm_device())
                    dist.broadcast(buf, src=0)
                    t.data.copy_(buf)
        if reader:
            del sd[name]  # free each source tensor once copied
        loaded += 1
    return {"loaded": loaded, "missing": missing}


def _canonical_state_dict(model: nn.Module, p: Path) -> dict:
    from megaflamingo.compat.af1 import _canonical_key, _layers_prefix

    sd = _read_state_dict(p)
    prefix = _layers_prefix(model)
    return {_canonical_key(k, prefix): v for k, v in sd.items() if not k.split("module.")[-1].startswith("clap.")}


def _read_state_dict(p: Path) -> dict:
    if p.is_dir():
        if (p / "latest").is_file() or any(p.glob("*/megaflamingo.json")) or any(p.glob("*model_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            tag = None
            if any(p.glob("*model_states.pt")):
                p, tag = p.parent, p.name
            return get_fp32_state_dict_from_zero_checkpoint(str(p), tag=tag)
        files = sorted(list(p.glob("*.safetensors")) + list(p.glob("*.pt")) + list(p.glob("*.bin")))
        if not files:
            raise FileNotFoundError(f"train.init_from={p}: no checkpoint files in the directory")
        sd = {}
        for f in files:  # AF1's 5-part release merges by dict update
            sd.update(_read_state_dict(f))
        return sd
    if not p.is_file():
        raise FileNotFoundError(f"train.init_from={p}: does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    obj = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "model_state_dict" in obj:  # AF1's checkpoint layout
        obj = obj["model_state_dict"]
    if isinstance(obj, dict) and "module" in obj and isinstance(obj["module"], dict):
        obj = obj["module"]
    return obj


def lm_hidden_size(cfg: Config) -> Optional[int]:
    """The LM width from ``model.lm_config`` or the LM's config file (no weights loaded); sizes
    DeepSpeed's "auto" buckets. None when it cannot be read."""
    return _lm_config_value(cfg, "hidden_size", "d_model")


def lm_max_positions(cfg: Config) -> Optional[int]:
    """How many positions the LM can embed (OPT: 2048); None when unknown or unbounded (rotary)."""
    return _lm_config_value(cfg, "max_position_embeddings", "n_positions")


def _lm_config_value(cfg: Config, *names: str) -> Optional[int]:
    m = cfg.model
    if m.lm_config is not None:
        conf = m.lm_config
        get = conf.get
    else:
        try:
            from transformers import AutoConfig

            conf = AutoConfig.from_pretrained(m.lm, cache_dir=m.cache_dir)
        except Exception:
            return None

        def get(k):
            return getattr(conf, k, None)
    for k in names:
        if get(k):
            return int(get(k))
    return None


# ------------------------------------------------------------------------------------------ data


def preflight(cfg: Config) -> list[str]:
    """Check data before any process group exists. Returns the dataset directories; raises ConfigError."""
    from megaflamingo.data import arrow_format as af

    d, src = cfg.data, cfg.source or "<config>"
    if not d.blend:
        raise ConfigError(f"data.blend: no training datasets configured ({src})")
    if not d.data_root:
        raise ConfigError(f"data.data_root: not set ({src})")
    root = Path(d.data_root)
    if not root.is_dir():
        raise ConfigError(f"data.data_root: directory {root} does not exist ({src})")
    positions = lm_max_positions(cfg)
    if positions is not None and d.max_tokens > positions:
        raise ConfigError(f"data.max_tokens: {d.max_tokens} exceeds the LM's {positions} positions ({src})")
    dirs = []
    for field, names in (("data.blend", list(d.blend)), ("data.valid", list(d.valid))):
        for name in names:
            from megaflamingo.data.reader import parse_blend_name

            # '<ds>-<task>/interleaved_knn-<split>' reads the <split> directory (+ its kNN manifest).
            sd = root / parse_blend_name(name).split_dir
            if not sd.is_dir():
                raise ConfigError(f"{field}.{name}: dataset directory {sd} does not exist ({src})")
            try:
                meta = af.read_metadata(sd)
            except af.FormatError as e:
                raise ConfigError(f"{field}.{name}: {e} ({src})") from None
            dim = int(meta["encoder"]["embed_dim"])
            if dim != cfg.model.audio_embed_dim:
                raise ConfigError(f"{field}.{name}: embeddings are {dim}-d ({meta['encoder']['name']}), "
                                  f"model.audio_embed_dim is {cfg.model.audio_embed_dim} ({src})")
            mw = int(meta["windows"]["max_windows"])
            if mw > cfg.model.max_num_window:
                raise ConfigError(f"{field}.{name}: preprocessed with max_windows={mw} > model.max_num_window="
                                  f"{cfg.model.max_num_window} ({src})")
            if meta["num_rows"] == 0:
                raise ConfigError(f"{field}.{name}: the split has no rows ({sd})")
            dirs.append(str(sd))
    return dirs


def build_loaders(cfg: Config, tokenizer, token_ids: dict, rank: int, world_size: int):
    try:
        from megaflamingo.data import build_train_loader, build_valid_loaders
    except ImportError as e:  # pragma: no cover - the data pipeline ships with the package
        raise RuntimeError(f"the data pipeline (megaflamingo.data) is not available: {e}") from e
    # The root Config carries micro-batch size, model and encoder settings the loaders check against.
    train = build_train_loader(cfg, tokenizer, token_ids, rank, world_size, cfg.train.seed)
    valid = {}
    if cfg.data.valid:
        # AF1 cut validation text at 5 x data.max_tokens (2560 for its 512), past OPT's 2048 positions:
        # a long validation sample would crash the run at its first evaluation. Cap at the LM's limit.
        cap = 5 * cfg.data.max_tokens
        positions = lm_max_positions(cfg)
        if positions is not None and positions < cap:
            log.info("validation text cut at the LM's %d positions (AF1: 5 x data.max_tokens = %d)", positions, cap)
            cap = positions
        valid = build_valid_loaders(cfg, tokenizer, token_ids, rank, world_size, max_tokens=cap)
    return train, valid
