"""Config loading: our dialect, AF1's dialect, overrides, placeholders and every error path."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megaflamingo.config import Config, ConfigError, load_config


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_match_af1_foundation():
    cfg = load_config()
    assert cfg.model.max_num_window * cfg.model.max_num_fewshot == 128
    assert cfg.model.audio_transformer.n_layers == 3 and cfg.model.audio_transformer.dropout == 0.1
    assert (cfg.encoder.window_s, cfg.encoder.overlap_s, cfg.encoder.sample_rate) == (7.0, 5.25, 44100)
    assert cfg.train.warmup_steps == 1875 and cfg.train.weight_decay == 0.1 and cfg.train.grad_clip == 1.0


def test_our_dialect_types_and_nested_sections(tmp_path):
    p = write(tmp_path, """
        model: {max_num_fewshot: 4, xattn: {every_n_layers: 2}}
        train: {lr: 2.0e-5, stage: sft, unfreeze_lm: true, betas: [0.9, 0.95]}
        data:
          data_root: /data
          blend:
            Clotho-AQA-AQA/train: {weight: 3.5, prefix_prob: 1.0, augmentations: {AQA_binary_instruction: 1.0}}
    """)
    cfg = load_config(p)
    assert cfg.model.max_num_fewshot == 4 and cfg.model.xattn.every_n_layers == 2
    assert cfg.train.lr == 2e-5 and cfg.train.betas == (0.9, 0.95) and cfg.train.unfreeze_lm
    entry = cfg.data.blend["Clotho-AQA-AQA/train"]
    assert entry.weight == 3.5 and entry.augmentations == {"AQA_binary_instruction": 1.0}
    assert cfg.source == str(p)


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 parses "1e-4" as a string; users write it that way all the time.
    cfg = load_config(write(tmp_path, "train: {lr: 1e-4}\n"))
    assert cfg.train.lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {lr: fast}\n", "train.lr: expected float, got 'fast'"),
        ("train: {micro_batch_size: 2.5}\n", "train.micro_batch_size: expected int, got 2.5"),
        ("train: {gradient_checkpointing: 'yes'}\n", "train.gradient_checkpointing: expected bool"),
        ("train: {lrr: 0.1}\n", "train.lrr: unknown key"),
        ("bogus: {}\n", "bogus: unknown key"),
        ("train: {precision: fp8}\n", "train.precision: expected one of"),
        ("train: {lr: -1.0}\n", "train.lr: must be > 0"),
        ("model: {max_num_window: 8}\n", "model.audio_transformer.max_window_per_audio: must equal"),
        ("model: {audio_transformer: {max_num_media: 64}}\n", "max_num_media: must be >="),
        ("encoder: {embed_dim: 512}\n", "encoder.embed_dim: must equal model.audio_embed_dim"),
        ("train: {stage: pretrain, unfreeze_lm: true}\n", "train.unfreeze_lm"),
        ("data: {blend: {Clotho/train: {augmentations: {}}}}\n", "data.blend.Clotho/train.augmentations"),
        ("data: {blend: {Clotho: {}}}\n", "data.blend.Clotho"),
        ("train: [1, 2]\n", "train: expected a mapping"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("train: {betas: [0.9]}\n", "train.betas: expected a list of 2 values"),
        ("model: {lm_config: {hidden_size: 8}}\n", "model.lm_config: must contain 'model_type'"),
    ],
)
def test_bad_values_name_field_and_file(tmp_path, text, message):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert message in str(err.value)
    assert str(p) in str(err.value)


def test_missing_file_and_yaml_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    p = write(tmp_path, "train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line \d+"):
        load_config(p)


def test_overrides(tmp_path):
    p = write(tmp_path, "train: {lr: 0.1}\n")
    cfg = load_config(p, ["train.lr=0.5", "model.xattn.heads=4", "data.valid=[A-B/val]"])
    assert cfg.train.lr == 0.5 and cfg.model.xattn.heads == 4 and cfg.data.valid == ["A-B/val"]
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_config(p, ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(p, ["train.lr"])
    with pytest.raises(ConfigError, match="train.lr is not a section"):
        load_config(p, ["train.lr.x=1"])


def test_env_and_placeholder_substitution(tmp_path, monkeypatch):
    p = write(tmp_path, "data: {data_root: '${MF_ROOT}/arrow', audio_root: '${MF_AUDIO:-audio}'}\n")
    monkeypatch.setenv("MF_ROOT", "/srv")
    cfg = load_config(p)
    assert cfg.data.data_root == "/srv/arrow" and cfg.data.audio_root == "audio"
    cfg = load_config(p, placeholders={"MF_ROOT": "/cli"})
    assert cfg.data.data_root == "/cli/arrow"
    monkeypatch.delenv("MF_ROOT")
    with pytest.raises(ConfigError, match=r"data.data_root: \$\{MF_ROOT\} is not set"):
        load_config(p)


AF1_SFT = """
train_config:
  expdir: YOUR_DATA_ROOT_DIR/audio-flamingo-data/checkpoint
  run_name: foundation_sft_8_shot
  delete_previous_checkpoint: true
  batch_size: 4
  gradient_accumulation_steps: 4
  seed: 42
  learning_rate: 0.00002
  lr_scheduler: constant
  loss_multiplier: 1.0
  warmup_steps: 1875
  weight_decay: 0.1
  precision: fp32
  gradient_checkpointing: False
  num_epochs: 100
  offline: false
  freeze_lm_embeddings: false
  logging_steps: 10
  dist_backend: nccl
  dist_url: env://
  no_set_device_rank: false
  fsdp: true
  fsdp_use_orig_params: false
  fsdp_sharding_strategy: full
  horovod: false
sft_config:
  pretrained_path: YOUR_DATA_ROOT_DIR/audio-flamingo-data/checkpoint/foundation_pretrain/
  pretrained_ckpt: checkpoint_99.pt
  unfreeze_full_lm: true
data_config:
  dataset_blending_global_weight: 0.01
  dataset_blending_config:
    Clotho-AQA-AQA/train:
      weight: 3.5
      prefix_prob: 1.0
      augmentations:
        AQA_binary_instruction: 1.0
    CochlScene-SceneClassification/interleaved_knn-train:
      weight: 0.3
      prefix_prob: 1.0
      augmentations:
        provide_all_labels: 0.9
        default: 0.1
  dataset_file_root: YOUR_DATA_ROOT_DIR/audio-flamingo-data/dataset_files
  data_root: YOUR_DATA_ROOT_DIR/datasets
  dataset_blending_output: dataset_blending.json
  max_tokens: 512
  num_workers: 4
  valid_dataset_config:
    Clotho-AQA-AQA/val: true
    NSynth-MIR/val: false
clap_config:
  method: microsoft-clap
  audio_embed_dim: 1024
  config_root: YOUR_REPO_ROOT_DIR/foundation/my_ms_clap/src/configs
  model_name: 'clapcap'
  checkpoint: YOUR_DATA_ROOT_DIR/audio-flamingo-data/clap/clapcap_weights_2023.pth
  window_length: 7.0
  window_overlap: 5.25
  max_num_window: 16
  max_num_fewshot: 8
model_config:
  cache_dir: YOUR_DATA_ROOT_DIR/audio-flamingo-data/LLM_pretrained/.cache
  lang_encoder_path: facebook/opt-iml-max-1.3b
  tokenizer_path: facebook/opt-iml-max-1.3b
  cross_attn_every_n_layers: 1
  audio_transformer_kwargs: {
    n_head: 8,
    n_layers: 3,
    d_inner: 2048,
    max_num_media: 128,
    max_window_per_audio: 16,
  }
"""


def test_af1_yaml_maps_onto_ours(tmp_path, monkeypatch):
    p = write(tmp_path, AF1_SFT)
    monkeypatch.setenv("YOUR_DATA_ROOT_DIR", "/env-root")
    cfg = load_config(p, placeholders={"YOUR_REPO_ROOT_DIR": "/repo"})
    t, d, m, e = cfg.train, cfg.data, cfg.model, cfg.encoder
    assert t.stage == "sft" and t.unfreeze_lm and t.embeddings == "full" and t.precision == "fp32"
    assert t.micro_batch_size == 4 and t.gradient_accumulation_steps == 4 and t.lr == 2e-5 and t.keep_last == 1
    assert t.run_dir == "/env-root/audio-flamingo-data/checkpoint/foundation_sft_8_shot"
    assert t.init_from == "/env-root/audio-flamingo-data/checkpoint/foundation_pretrain/checkpoint_99.pt"
    assert d.data_root == "/env-root/audio-flamingo-data/dataset_files" and d.audio_root == "/env-root/datasets"
    assert d.global_weight == 0.01 and d.valid == ["Clotho-AQA-AQA/val"]
    assert d.blend["CochlScene-SceneClassification/interleaved_knn-train"].augmentations == {
        "provide_all_labels": 0.9, "default": 0.1}
    assert e.name == "clapcap" and e.checkpoint.endswith("clapcap_weights_2023.pth")
    assert m.lm == "facebook/opt-iml-max-1.3b" and m.max_num_fewshot == 8 and m.audio_transformer.d_inner == 2048


def test_af1_yaml_placeholder_unset_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("YOUR_DATA_ROOT_DIR", raising=False)
    p = write(tmp_path, AF1_SFT)
    with pytest.raises(ConfigError, match="placeholder YOUR_DATA_ROOT_DIR is not set"):
        load_config(p)


def test_af1_pretrain_and_chat_stage_detection(tmp_path):
    pre = write(tmp_path, "train_config: {precision: amp_bf16, freeze_lm_embeddings: true}\n", "pre.yaml")
    cfg = load_config(pre)
    assert cfg.train.stage == "pretrain" and cfg.train.precision == "bf16" and cfg.train.embeddings == "frozen"
    chat = write(tmp_path, """
        sft_config: {pretrained_path: ckpts/sft4, pretrained_ckpt: checkpoint_99.pt, unfreeze_full_lm: true}
        data_config:
          dataset_blending_config:
            dialog_AudioSetSL-Dialog/train: {weight: 1.0, prefix_prob: 1.0}
        clap_config: {max_num_fewshot: 4}
    """, "chat.yaml")
    cfg = load_config(chat)
    assert cfg.train.stage == "chat" and cfg.model.max_num_fewshot == 4
    assert cfg.data.blend["dialog_AudioSetSL-Dialog/train"].augmentations == {"do_nothing": 1.0}


@pytest.mark.parametrize(
    "text, message",
    [
        ("train_config: {learnin_rate: 0.1}\n", "train_config.learnin_rate: unknown AF1 key"),
        ("extra_config: {}\n", "extra_config: unknown AF1 section"),
        ("train_config: {precision: int8}\n", "train_config.precision: expected one of"),
        ("clap_config: {method: openai-clip}\n", "clap_config.method: expected one of"),
        ("train_config: {batch_size: big}\n", "train.micro_batch_size: expected int, got 'big'"),
    ],
)
def test_af1_bad_keys(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(write(tmp_path, text))


SHIPPED = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_load(path, monkeypatch):
    """Every stage config we ship must load once its ${VAR} paths are supplied."""
    import re

    for var in set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", path.read_text())):
        monkeypatch.setenv(var, "/x")
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.source == str(path)
