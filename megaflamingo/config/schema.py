"""The root ``Config`` and its sections (the model's own section lives in :mod:`megaflamingo.model.config`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from megaflamingo.model.config import AudioTransformerConfig, ModelConfig, XattnConfig

__all__ = ["AudioTransformerConfig", "Config", "DataConfig", "DatasetEntry", "DeepSpeedSection", "EncoderConfig",
           "ModelConfig", "TrainConfig", "XattnConfig"]


@dataclass
class EncoderConfig:
    """Audio encoder used offline (preprocessing) and at inference time."""

    name: Literal["clapcap", "laion-clap", "tiny"] = "clapcap"
    checkpoint: Optional[str] = None
    random_init: bool = False
    embed_dim: int = 1024
    sample_rate: int = 44100
    window_s: float = 7.0
    overlap_s: float = 5.25
    max_windows: int = 16
    # LAION-CLAP (kNN retrieval) settings.
    clip_checkpoint: Optional[str] = None
    clip_fusion: bool = True


@dataclass
class DatasetEntry:
    """One entry of AF1's ``dataset_blending_config``: ``<dataset>-<task>/<split>``."""

    weight: float = 1.0
    prefix_prob: float = 0.0
    augmentations: dict[str, float] = field(default_factory=lambda: {"do_nothing": 1.0})


@dataclass
class DataConfig:
    # Root of the preprocessed Arrow datasets (AF1's ``dataset_file_root``).
    data_root: Optional[str] = None
    # Root of the raw audio files (AF1's ``data_root``); needed by preprocessing and inference.
    audio_root: Optional[str] = None
    blend: dict[str, DatasetEntry] = field(default_factory=dict)
    # AF1's ``dataset_blending_global_weight``: fraction of the blend drawn per virtual epoch.
    global_weight: float = 1.0
    valid: list[str] = field(default_factory=list)
    max_tokens: int = 512
    num_workers: int = 4
    # Sort-ish batching by token length to cut padding (not in AF1; meaningless with packing).
    group_by_length: bool = False
    # Sequence packing: several samples per row up to max_tokens_per_row tokens, each run exactly as if
    # alone (block-diagonal attention, positions restarting, its own audio slots). A micro-batch is then
    # train.micro_batch_size *rows*. Off = AF1's one padded sample per row. See docs/training.md.
    packing: bool = False
    # Row capacity in tokens with packing; None = data.max_tokens. Must be >= data.max_tokens.
    max_tokens_per_row: Optional[int] = None
    # How far ahead the packer looks, in micro-batches' worth of tokens (of all ranks together).
    packing_lookahead: int = 2
    # Let blend/valid names and kNN manifests reach dataset directories outside data_root (off: an
    # absolute or `..` path that escapes the root is refused, naming this field).
    allow_outside_root: bool = False
    # User-defined prompt templates / augmentations, merged into the built-in registry.
    templates: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    run_name: Optional[str] = None
    stage: Literal["pretrain", "sft", "chat"] = "pretrain"
    micro_batch_size: int = 6
    gradient_accumulation_steps: int = 8
    seed: int = 42
    lr: float = 1e-4
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 1875
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    optimizer: Literal["adamw"] = "adamw"
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    num_epochs: int = 100
    max_steps: Optional[int] = None
    loss_multiplier: float = 1.0
    # Embedding policy: frozen (AF1 pretrain), new_tokens (only <audio>/<|endofchunk|> rows), full.
    embeddings: Literal["frozen", "new_tokens", "full"] = "frozen"
    # SFT: train the LM decoder blocks too (AF1's ``unfreeze_full_lm``).
    unfreeze_lm: bool = False
    # Reproduce AF1's FSDP behaviour where "unfrozen" decoder blocks never actually moved.
    af1_exact: bool = False
    # Initialise from a previous stage: our export dir, a DeepSpeed checkpoint dir, or an AF1 .pt.
    init_from: Optional[str] = None
    logging_steps: int = 10
    eval_steps: int = 1000
    save_steps: int = 1000
    keep_last: int = 3
    resume: str = "auto"
    max_consecutive_nonfinite: int = 10
    # Abort when more than this fraction of the micro-batches were skipped for a non-finite loss
    # (judged over at least 100 of them), or of the rows were dropped as bad (NaN/inf audio; over at
    # least 1000 rows). 1.0 disables either check.
    max_nonfinite_fraction: float = 0.05
    max_bad_row_fraction: float = 0.01
    # Validation: at most this many batches per validation set (None = all).
    eval_max_batches: Optional[int] = None
    # Generation-based task metrics every eval_steps (TensorBoard eval/<benchmark>/<metric>): names
    # from the evaluation registry (docs/evaluation.md), the first eval_max_items items of each,
    # split over the ranks. eval_registry: extra registry YAML files; eval_batch_size: generation
    # batch per rank (None = micro_batch_size); eval_max_new_tokens / eval_num_beams override the
    # registry's decoding (training-time numbers are a trend; megaflamingo-eval gives the real ones).
    eval_benchmarks: list[str] = field(default_factory=list)
    eval_max_items: int = 32
    eval_registry: list[str] = field(default_factory=list)
    eval_batch_size: Optional[int] = None
    eval_max_new_tokens: Optional[int] = None
    eval_num_beams: Optional[int] = None
    # Seconds a collective may block before the job fails (a dead rank must not hang the job).
    dist_timeout_s: int = 600
    # Seconds the other ranks wait while rank 0 converts a checkpoint to DeepSpeed's universal format
    # (resuming on another world size); a large checkpoint takes far longer than a collective.
    convert_timeout_s: int = 21600
    # Peak FLOP/s per device for MFU; None = a table for known GPUs, a measured matmul peak on CPU.
    peak_tflops: Optional[float] = None
    # Show a tqdm bar on rank 0 (the log line every ``logging_steps`` is printed either way).
    progress_bar: bool = True
    # Training/validation loss: "supervised" runs the LM head only where the shifted label is not -100
    # (same loss and gradients, ~14% less forward on OPT's 50k vocabulary); "full" computes [B, T, V] logits.
    loss_logits: Literal["supervised", "full"] = "supervised"
    # The scalar of a micro-batch: "token" = sum of its token losses / its supervised tokens (AF1's and
    # HF's token mean; with packing the micro-batch holds more samples); "sample" = mean over its samples
    # of each sample's token mean. DeepSpeed then averages the accumulated micro-batches of a step.
    loss_weighting: Literal["token", "sample"] = "token"
    # "liger": the LM head fused into the cross-entropy (liger-kernel, CUDA only; logits never
    # materialised); "plain": the LM's own head + cross-entropy.
    loss_head: Literal["plain", "liger"] = "plain"


@dataclass
class DeepSpeedSection:
    # JSON under ds_configs/ (or any path); micro-batch, accumulation, precision and clipping
    # come from ``train`` and are merged in; the JSON may not contradict them.
    config: str = "ds_configs/zero3.json"
    # Extra keys merged over the JSON (dotted paths allowed through CLI overrides).
    overrides: dict[str, Any] = field(default_factory=dict)
    # Build the LM partitioned (zero.Init) so big LMs never materialise whole on one rank.
    zero_init: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    # Where the config came from (for error messages and run records); not a YAML key.
    source: Optional[str] = field(default=None, metadata={"internal": True})
    # What loading noticed but accepted (e.g. AF1 keys that mean nothing under DeepSpeed), shown by
    # ``megaflamingo-train --dry-run`` and logged at start; not a YAML key.
    notes: list[str] = field(default_factory=list, metadata={"internal": True})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("internal"):
                d.pop(f.name, None)
        return d
