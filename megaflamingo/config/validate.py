"""Cross-field validation of a loaded :class:`Config` (the model section validates itself)."""
from __future__ import annotations

from megaflamingo.errors import ConfigError

from .schema import Config


def validate(cfg: Config) -> None:
    src = cfg.source or "<config>"

    def bad(field_path: str, msg: str) -> None:
        raise ConfigError(f"{field_path}: {msg} ({src})")

    m, t, d, e = cfg.model, cfg.train, cfg.data, cfg.encoder
    m.validate(src)
    positive = {
        "train.micro_batch_size": t.micro_batch_size,
        "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train.lr": t.lr,
        "train.logging_steps": t.logging_steps,
        "train.save_steps": t.save_steps,
        "train.eval_steps": t.eval_steps,
        "train.keep_last": t.keep_last,
        "train.max_consecutive_nonfinite": t.max_consecutive_nonfinite,
        "train.dist_timeout_s": t.dist_timeout_s,
        "train.convert_timeout_s": t.convert_timeout_s,
        "data.max_tokens": d.max_tokens,
        "encoder.embed_dim": e.embed_dim,
        "encoder.sample_rate": e.sample_rate,
        "encoder.window_s": e.window_s,
        "encoder.max_windows": e.max_windows,
    }
    for name, value in positive.items():
        if value <= 0:
            bad(name, f"must be > 0, got {value!r}")
    for name in ("eval_batch_size", "eval_max_new_tokens", "eval_num_beams"):
        if getattr(t, name) is not None and getattr(t, name) <= 0:
            bad(f"train.{name}", f"must be > 0 (or null), got {getattr(t, name)}")
    if t.eval_benchmarks and t.eval_max_items <= 0:
        bad("train.eval_max_items", f"must be > 0, got {t.eval_max_items}")
    if t.max_steps is not None and t.max_steps <= 0:
        bad("train.max_steps", f"must be > 0, got {t.max_steps}")
    if t.warmup_steps < 0:
        bad("train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    if not 0.0 <= t.weight_decay < 1.0:
        bad("train.weight_decay", f"must be in [0, 1), got {t.weight_decay}")
    if t.grad_clip < 0:
        bad("train.grad_clip", f"must be >= 0 (0 disables clipping), got {t.grad_clip}")
    for name in ("max_nonfinite_fraction", "max_bad_row_fraction"):
        if not 0.0 <= getattr(t, name) <= 1.0:
            bad(f"train.{name}", f"must be in [0, 1] (1 disables the check), got {getattr(t, name)}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        bad("train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    if d.num_workers < 0:
        bad("data.num_workers", f"must be >= 0, got {d.num_workers}")
    if d.global_weight <= 0:
        bad("data.global_weight", f"must be > 0, got {d.global_weight}")
    if not 0 <= e.overlap_s < e.window_s:
        bad("encoder.overlap_s", f"must be in [0, window_s={e.window_s}), got {e.overlap_s}")
    if e.max_windows != m.max_num_window:
        bad("encoder.max_windows", f"must equal model.max_num_window ({m.max_num_window}), got {e.max_windows}")
    if e.embed_dim != m.audio_embed_dim:
        bad("encoder.embed_dim", f"must equal model.audio_embed_dim ({m.audio_embed_dim}), got {e.embed_dim}")
    if t.af1_exact and t.stage == "pretrain" and t.unfreeze_lm:
        bad("train.af1_exact", "af1_exact with unfreeze_lm in pretrain is contradictory (AF1 never unfroze it there)")
    if t.unfreeze_lm and t.stage == "pretrain":
        bad("train.unfreeze_lm", "the pretrain stage keeps the LM frozen; use stage: sft or chat")
    _validate_packing(cfg, bad)
    for name, entry in d.blend.items():
        if entry.weight < 0:
            bad(f"data.blend.{name}.weight", f"must be >= 0, got {entry.weight}")
        if not 0.0 <= entry.prefix_prob <= 1.0:
            bad(f"data.blend.{name}.prefix_prob", f"must be in [0, 1], got {entry.prefix_prob}")
        if not entry.augmentations:
            bad(f"data.blend.{name}.augmentations", "must name at least one augmentation")
        if any(p < 0 for p in entry.augmentations.values()) or sum(entry.augmentations.values()) <= 0:
            bad(f"data.blend.{name}.augmentations", "probabilities must be >= 0 and sum to > 0")
        if "/" not in name:
            bad(f"data.blend.{name}", "dataset names look like '<dataset>-<task>/<split>'")
    for name in d.valid:
        if "/" not in name:
            bad("data.valid", f"{name!r}: dataset names look like '<dataset>-<task>/<split>'")


def _validate_packing(cfg: Config, bad) -> None:
    d, t = cfg.data, cfg.train
    if d.max_tokens_per_row is not None and d.max_tokens_per_row < d.max_tokens:
        bad("data.max_tokens_per_row", f"must be >= data.max_tokens ({d.max_tokens}) so that every sample fits "
            f"a row, got {d.max_tokens_per_row}")
    if d.packing_lookahead < 1:
        bad("data.packing_lookahead", f"must be >= 1, got {d.packing_lookahead}")
    if t.loss_logits == "full" and t.loss_head == "liger":
        bad("train.loss_head", "liger computes the loss without logits; it needs train.loss_logits: supervised")
    if d.packing and d.group_by_length:
        bad("data.group_by_length", "has no meaning with data.packing (packing removes the padding that grouping "
            "reduces); set one of them")
