"""Map AF1's YAML sections (``foundation/configs/*.yaml``, ``chat/configs/chat.yaml``) onto ours.

Every AF1 key is either mapped or listed in ``_AF1_IGNORED`` with the reason it has no meaning
here (FSDP/Horovod switches: DeepSpeed replaces them). Anything else is an error, so a typo in an
AF1 config is caught instead of silently dropped.
"""
from __future__ import annotations

from typing import Any

from megaflamingo.errors import ConfigError

# Keys AF1 has that do not apply to a DeepSpeed run, with the reason (shown by `--dry-run`).
_AF1_IGNORED = {
    "train_config": {
        "offline": "wandb switch; we log to TensorBoard",
        "dist_backend": "chosen by DeepSpeed (nccl on GPU, gloo on CPU)",
        "dist_url": "the launcher sets MASTER_ADDR/PORT",
        "no_set_device_rank": "DeepSpeed sets the device from LOCAL_RANK",
        "fsdp": "replaced by DeepSpeed ZeRO (deepspeed.config)",
        "fsdp_use_orig_params": "FSDP only",
        "fsdp_sharding_strategy": "FSDP only; pick a ds_configs/ JSON instead",
        "horovod": "not supported; DeepSpeed is the distributed backend",
    },
    "data_config": {"dataset_blending_output": "the resolved blend is written to the run dir"},
    "clap_config": {"config_root": "encoder configs ship with the encoder packages"},
    "model_config": {},
    "sft_config": {},
}

_PRECISION = {"amp_bf16": "bf16", "bf16": "bf16", "amp_fp16": "fp16", "fp16": "fp16", "fp32": "fp32"}
_ENCODER = {"microsoft-clap": "clapcap", "laion-clap": "laion-clap"}


def af1_to_ours(raw: dict, src: str) -> dict:
    """Translate an AF1-dialect dict into our sections (still untyped; typed by load_config)."""
    known = set(_AF1_IGNORED)
    for section in raw:
        if section not in known:
            raise ConfigError(f"{section}: unknown AF1 section (allowed: {', '.join(sorted(known))}) ({src})")
    out: dict[str, dict] = {"model": {}, "encoder": {}, "data": {}, "train": {}}
    tc = _section(raw, "train_config", src)
    dc = _section(raw, "data_config", src)
    cc = _section(raw, "clap_config", src)
    mc = _section(raw, "model_config", src)
    sc = _section(raw, "sft_config", src)

    t, d, e, m = out["train"], out["data"], out["encoder"], out["model"]
    take = _KeyReader(src)

    # train_config
    expdir = take(tc, "train_config", "expdir")
    run_name = take(tc, "train_config", "run_name")
    if expdir is not None or run_name is not None:
        t["run_dir"] = "/".join(str(x) for x in (expdir or "runs", run_name or "default"))
    if run_name is not None:
        t["run_name"] = run_name
    if take(tc, "train_config", "delete_previous_checkpoint") is True:
        t["keep_last"] = 1
    _move(take, tc, "train_config", t, {
        "batch_size": "micro_batch_size",
        "gradient_accumulation_steps": "gradient_accumulation_steps",
        "seed": "seed",
        "learning_rate": "lr",
        "lr_scheduler": "lr_scheduler",
        "loss_multiplier": "loss_multiplier",
        "warmup_steps": "warmup_steps",
        "weight_decay": "weight_decay",
        "gradient_checkpointing": "gradient_checkpointing",
        "num_epochs": "num_epochs",
        "logging_steps": "logging_steps",
    })
    precision = take(tc, "train_config", "precision")
    if precision is not None:
        if precision not in _PRECISION:
            raise ConfigError(
                f"train_config.precision: expected one of {', '.join(_PRECISION)}, got {precision!r} ({src})"
            )
        t["precision"] = _PRECISION[precision]
    freeze_emb = take(tc, "train_config", "freeze_lm_embeddings")
    if freeze_emb is not None:
        t["embeddings"] = "frozen" if freeze_emb else "full"

    # sft_config: presence means a fine-tuning stage.
    if sc:
        path = take(sc, "sft_config", "pretrained_path")
        ckpt = take(sc, "sft_config", "pretrained_ckpt")
        if path is not None:
            t["init_from"] = str(path).rstrip("/") + ("/" + str(ckpt) if ckpt else "")
        unfreeze = take(sc, "sft_config", "unfreeze_full_lm")
        if unfreeze is not None:
            t["unfreeze_lm"] = unfreeze
        blend_names = list((dc or {}).get("dataset_blending_config") or {})
        t["stage"] = "chat" if blend_names and all("Dialog" in n for n in blend_names) else "sft"
    else:
        t["stage"] = "pretrain"

    # data_config
    _move(take, dc, "data_config", d, {
        "dataset_blending_global_weight": "global_weight",
        "dataset_file_root": "data_root",
        "data_root": "audio_root",
        "max_tokens": "max_tokens",
        "num_workers": "num_workers",
    })
    blend = take(dc, "data_config", "dataset_blending_config")
    if blend is not None:
        if not isinstance(blend, dict):
            raise ConfigError(f"data_config.dataset_blending_config: expected a mapping ({src})")
        d["blend"] = {name: (entry if entry is not None else {}) for name, entry in blend.items()}
    valid = take(dc, "data_config", "valid_dataset_config")
    if valid is not None:
        if not isinstance(valid, dict):
            raise ConfigError(f"data_config.valid_dataset_config: expected a mapping ({src})")
        d["valid"] = [name for name, on in valid.items() if on]

    # clap_config
    method = take(cc, "clap_config", "method")
    if method is not None:
        if method not in _ENCODER:
            raise ConfigError(
                f"clap_config.method: expected one of {', '.join(_ENCODER)}, got {method!r} ({src})"
            )
        e["name"] = _ENCODER[method]
    take(cc, "clap_config", "model_name")  # 'clapcap' / '630k-fusion-best': implied by method
    dim = take(cc, "clap_config", "audio_embed_dim")
    if dim is not None:
        e["embed_dim"] = m["audio_embed_dim"] = dim
    _move(take, cc, "clap_config", e, {"checkpoint": "checkpoint", "window_length": "window_s",
                                        "window_overlap": "overlap_s"})
    nwin = take(cc, "clap_config", "max_num_window")
    if nwin is not None:
        e["max_windows"] = m["max_num_window"] = nwin
    _move(take, cc, "clap_config", m, {"max_num_fewshot": "max_num_fewshot"})
    if e.get("name") == "laion-clap":
        e.setdefault("sample_rate", 48000)

    # model_config
    _move(take, mc, "model_config", m, {"cache_dir": "cache_dir", "lang_encoder_path": "lm",
                                        "tokenizer_path": "tokenizer"})
    every = take(mc, "model_config", "cross_attn_every_n_layers")
    if every is not None:
        m["xattn"] = {"every_n_layers": every}
    atk = take(mc, "model_config", "audio_transformer_kwargs")
    if atk is not None:
        m["audio_transformer"] = atk

    for section_name, section in (("train_config", tc), ("data_config", dc), ("clap_config", cc),
                                  ("model_config", mc), ("sft_config", sc)):
        take.check_consumed(section, section_name)
    return {k: v for k, v in out.items() if v}


def _section(raw: dict, name: str, src: str) -> dict:
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__} ({src})")
    return value


class _KeyReader:
    """Reads keys from AF1 sections and remembers which were read, to flag the rest as unknown."""

    def __init__(self, src: str):
        self.src = src
        self.used: dict[str, set] = {}

    def __call__(self, section: dict, name: str, key: str) -> Any:
        self.used.setdefault(name, set()).add(key)
        return section.get(key)

    def check_consumed(self, section: dict, name: str) -> None:
        ignored = _AF1_IGNORED.get(name, {})
        for key in section:
            if key not in self.used.get(name, set()) and key not in ignored:
                raise ConfigError(f"{name}.{key}: unknown AF1 key ({self.src})")


def _move(take: _KeyReader, section: dict, name: str, dest: dict, mapping: dict[str, str]) -> None:
    for theirs, ours in mapping.items():
        value = take(section, name, theirs)
        if value is not None:
            dest[ours] = value


def ignored_af1_keys(raw: dict) -> list[str]:
    """The AF1 keys present in ``raw`` that we accept but ignore, with the reason (for --dry-run)."""
    notes = []
    for section, keys in _AF1_IGNORED.items():
        for key, why in keys.items():
            if key in (raw.get(section) or {}):
                notes.append(f"{section}.{key}: ignored ({why})")
    return notes
