"""Build everything a run needs from a Config: tokenizer, (partitioned) model, initial weights,
loaders, and the pre-flight checks that must fail before any rank starts training."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from megaflamingo.checkpoint.integrity import CheckpointError
from megaflamingo.checkpoint.load import open_checkpoint
from megaflamingo.compat.af1 import canonical_state_dict
from megaflamingo.config import Config, ConfigError
from megaflamingo.data import arrow_format as af
from megaflamingo.data import build_train_loader, build_valid_loaders
from megaflamingo.data.reader import parse_blend_name
from megaflamingo.model.build import build_lm, build_model
from megaflamingo.model.build import lm_hidden_size as model_lm_hidden_size
from megaflamingo.model.build import lm_max_positions as model_lm_max_positions
from megaflamingo.model.freeze import apply_freeze_policy, policy_from_train_config
from megaflamingo.tokens import SpecialTokens, build_tokenizer

from .distributed import comm_device

log = logging.getLogger("megaflamingo.train")


# ------------------------------------------------------------------------------------------ model


def build_run_tokenizer(cfg: Config):
    """The run's tokenizer and its special-token ids."""
    tok = build_tokenizer(cfg.model.tokenizer or cfg.model.lm, cache_dir=cfg.model.cache_dir)
    return tok, SpecialTokens.from_tokenizer(tok)


def build_run_model(cfg: Config, tokenizer, tokens: SpecialTokens, ds_config: Optional[dict]) -> nn.Module:
    """LM + AudioFlamingo, partitioned at creation under ZeRO-3 (``deepspeed.zero_init``), with the
    stage's freeze policy applied."""
    check_loss_head(cfg)
    zero_init = cfg.deepspeed.zero_init
    lm = build_lm(cfg.model, len(tokenizer), ds_config, zero_init)
    model = build_model(cfg.model, lm, tokens, ds_config, zero_init)
    policy, emb = policy_from_train_config(cfg.train)
    log.info("%s", apply_freeze_policy(model, policy, emb))
    return model


def check_loss_head(cfg: Config) -> None:
    """``train.loss_head: liger`` runs liger-kernel's Triton kernels: refuse it where they cannot run."""
    if cfg.train.loss_head == "liger":
        from megaflamingo.model.packed import liger_available

        if not liger_available():
            raise ConfigError(f"train.loss_head: liger needs the liger-kernel package and a CUDA device "
                              f"(pip install liger-kernel); use plain here ({cfg.source or '<config>'})")


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
            sd = _read_init_weights(model, path)
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


def _read_init_weights(model: nn.Module, path: str) -> dict:
    """The checkpoint under our key names (AF1 aliases and ``module.`` prefixes mapped, ``clap.*`` dropped),
    read through the checkpoint tools' one reader (verified, restricted loads)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"train.init_from={p}: does not exist")
    try:
        sd = open_checkpoint(p).materialize()
    except CheckpointError as e:
        raise ValueError(f"train.init_from={p}: {e}") from None
    return canonical_state_dict(model, sd)


def lm_hidden_size(cfg: Config) -> Optional[int]:
    return model_lm_hidden_size(cfg.model)


def lm_max_positions(cfg: Config) -> Optional[int]:
    return model_lm_max_positions(cfg.model)


# ------------------------------------------------------------------------------------------ data


def preflight(cfg: Config) -> list[str]:
    """Check data before any process group exists. Returns the dataset directories; raises ConfigError."""
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


def build_loaders(cfg: Config, tokenizer, tokens: SpecialTokens, rank: int, world_size: int):
    # The root Config carries micro-batch size, model and encoder settings the loaders check against.
    train = build_train_loader(cfg, tokenizer, tokens, rank, world_size, cfg.train.seed)
    valid = {}
    if cfg.data.valid:
        # AF1 cut validation text at 5 x data.max_tokens (2560 for its 512), past OPT's 2048 positions:
        # a long validation sample would crash the run at its first evaluation. Cap at the LM's limit.
        cap = 5 * cfg.data.max_tokens
        positions = lm_max_positions(cfg)
        if positions is not None and positions < cap:
            log.info("validation text cut at the LM's %d positions (AF1: 5 x data.max_tokens = %d)", positions, cap)
            cap = positions
        valid = build_valid_loaders(cfg, tokenizer, tokens, rank, world_size, max_tokens=cap)
    return train, valid
