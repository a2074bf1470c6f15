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
from megaflamingo.hub import missing_offline
from megaflamingo.tokens import TINY_TOKENIZERS, SpecialTokens, build_tokenizer

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


class PreflightError(ConfigError):
    """Everything wrong with a run's data and model sources, found at once: ``problems`` holds one
    line per problem (``field: what is wrong``)."""

    def __init__(self, problems: list[str], src: str):
        self.problems = list(problems)
        if len(problems) == 1:
            super().__init__(f"{problems[0]} ({src})")
        else:
            super().__init__(f"{len(problems)} problems ({src}):\n" + "\n".join(f"  {p}" for p in problems))


def preflight(cfg: Config) -> list[str]:
    """Check the data (and what the model is built from) before any process group exists. Every
    check appends to one list of problems, and all of them are reported together (one
    :class:`PreflightError`), so a user fixes a config in one round. Returns the dataset directories."""
    problems: list[str] = []
    dirs = _check_datasets(cfg, problems)
    _check_model_sources(cfg, problems)
    if problems:
        raise PreflightError(problems, cfg.source or "<config>")
    return dirs


def _check_model_sources(cfg: Config, problems: list[str]) -> None:
    m = cfg.model
    if m.lm_config is None:
        for what, name, file in (("model.lm", m.lm, "config.json"),
                                 ("model.tokenizer", m.tokenizer or m.lm, "tokenizer_config.json")):
            if name not in TINY_TOKENIZERS and (msg := missing_offline(name, m.cache_dir, file)):
                problems.append(f"{what}: {msg}")
    positions = lm_max_positions(cfg)
    if positions is not None and cfg.data.max_tokens > positions:
        problems.append(f"data.max_tokens: {cfg.data.max_tokens} exceeds the LM's {positions} positions")


def _check_datasets(cfg: Config, problems: list[str]) -> list[str]:
    d = cfg.data
    if not d.blend:
        problems.append("data.blend: no training datasets configured")
    if not d.data_root:
        problems.append("data.data_root: not set")
        return []
    root = Path(d.data_root)
    if not root.is_dir():
        problems.append(f"data.data_root: directory {root} does not exist")
        return []
    dirs = []
    for field, names in (("data.blend", list(d.blend)), ("data.valid", list(d.valid))):
        for name in names:
            where = f"{field}.{name}"
            try:  # '<ds>-<task>/interleaved_knn-<split>' reads the <split> directory (+ its kNN manifest)
                sd = root / parse_blend_name(name).split_dir
            except ValueError as e:
                problems.append(f"{where}: {e}")
                continue
            if not sd.is_dir():
                problems.append(f"{where}: dataset directory {sd} does not exist")
                continue
            try:
                meta = af.read_metadata(sd)
            except af.FormatError as e:
                problems.append(f"{where}: {e}")
                continue
            mismatches = dataset_mismatches(meta, cfg)
            if not mismatches:
                try:  # every shard's footer and row count (memory-mapped: no rows are read)
                    af.open_shards(sd)
                except af.FormatError as e:
                    mismatches.append(str(e))
            problems.extend(f"{where}: {p}" for p in mismatches)
            dirs.append(str(sd))
    return dirs


def dataset_mismatches(meta: dict, cfg: Config) -> list[str]:
    """How a preprocessed split (its ``metadata.json``) disagrees with the model and encoder sections
    (the config's own rules keep encoder.embed_dim / max_windows equal to the model's)."""
    enc, win, m, e = meta["encoder"], meta["windows"], cfg.model, cfg.encoder
    out = []
    dim = int(enc["embed_dim"])
    if dim != m.audio_embed_dim:
        out.append(f"embeddings are {dim}-d ({enc['name']}), model.audio_embed_dim is {m.audio_embed_dim}")
    mw = int(win["max_windows"])
    if mw != m.max_num_window:
        out.append(f"preprocessed with max_windows={mw}, model.max_num_window is {m.max_num_window}")
    if enc["name"] != e.name:
        out.append(f"embedded with encoder {enc['name']!r}, encoder.name is {e.name!r}")
    if enc.get("sample_rate") is not None and int(enc["sample_rate"]) != e.sample_rate:
        out.append(f"embedded at {enc['sample_rate']} Hz, encoder.sample_rate is {e.sample_rate}")
    for key in ("window_s", "overlap_s"):
        if win.get(key) is not None and abs(float(win[key]) - float(getattr(e, key))) > 1e-6:
            out.append(f"embedded with {key}={win[key]}, encoder.{key} is {getattr(e, key)}")
    if meta["num_rows"] == 0:
        out.append("the split has no rows")
    return out


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
