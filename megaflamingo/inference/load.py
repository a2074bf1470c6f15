"""Load a model for inference from whatever the user has.

* an exported model directory (``megaflamingo-convert export``): config + weights (+ tokenizer,
  + the encoder record the training data was made with);
* a raw DeepSpeed training checkpoint (a run directory or its ``checkpoints/`` folder): consolidated
  through the checkpoint tools into a temporary export first;
* an AF1 checkpoint (``foundation.pt`` / ``chat.pt`` or its 5 parts): imported through
  ``megaflamingo-convert af1-import`` first (needs ``--config`` for the LM/tokenizer).

The result carries what inference needs besides the weights: tokenizer, token ids, the model
config, and the audio encoder record (which encoder, checkpoint hash, window layout, silence
embedding) so audio can be embedded exactly as preprocessing did.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megaflamingo.config import Config, ConfigError, ModelConfig, from_dict, validate

ENCODER_FILE = "encoder.json"


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    token_ids: dict
    config: Config
    encoder: dict  # {"encoder": <metadata encoder block>, "windows": {...}, "silence_embedding": [...]}
    source: str
    kind: str  # export | deepspeed | af1
    max_tokens: int = 512
    extra: dict = field(default_factory=dict)

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model

    @property
    def silence_embedding(self):
        s = self.encoder.get("silence_embedding")
        if s is None:
            raise ModelLoadError(f"{self.source}: no silence embedding recorded (needed to pad audio slots)")
        return s


# --------------------------------------------------------------------------------------------
# config / tokenizer / model construction


def read_config(model_dir: Path) -> Config:
    for name in ("config.json", "megaflamingo_config.json", "config.yaml", "train_config.yaml"):
        p = model_dir / name
        if p.is_file():
            if p.suffix == ".json":
                raw = json.loads(p.read_text(encoding="utf-8"))
            else:
                import yaml

                raw = yaml.safe_load(p.read_text(encoding="utf-8"))
            raw = raw.get("megaflamingo", raw) if isinstance(raw, dict) else raw
            if isinstance(raw, dict) and "model" in raw:
                raw = {k: v for k, v in raw.items() if k in ("model", "encoder", "data", "train", "deepspeed")}
                cfg = from_dict(Config, raw, "", str(p))
                cfg.source = str(p)
                validate(cfg)
                return cfg
    raise ModelLoadError(f"{model_dir}: no megaflamingo config (config.json / config.yaml) found")


def build_tokenizer(cfg: Config, model_dir: Optional[Path] = None):
    """The training run's tokenizer: tokenizer files saved in the model dir win, else the engine's
    own construction (same special tokens added the same way as at training time)."""
    if model_dir is not None and (model_dir / "tokenizer_config.json").is_file() and cfg.model.tokenizer not in (
            "tiny", "tiny-opt", "tiny-llama"):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir))
    from megaflamingo.engine.build import build_tokenizer as engine_tokenizer

    try:
        return engine_tokenizer(cfg)[0]
    except Exception as e:  # offline / missing path: say what was tried
        raise ModelLoadError(f"cannot load the tokenizer {cfg.model.tokenizer or cfg.model.lm!r} ({e})") from e


def build_from_config(cfg: Config, tokenizer, device: str = "cpu"):
    """AudioFlamingo exactly as the engine builds it (same LM construction, same vocab resize)."""
    from megaflamingo.engine.build import build_lm
    from megaflamingo.model import build_model
    from megaflamingo.testing import token_ids as get_token_ids

    ids = get_token_ids(tokenizer)
    try:
        lm = build_lm(cfg, len(tokenizer), None)
    except OSError as e:
        raise ModelLoadError(f"cannot load the language model {cfg.model.lm!r} ({e})") from e
    model = build_model(cfg.model, lm=lm, token_ids=ids)
    return model.to(device), ids


# --------------------------------------------------------------------------------------------
# weights


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    # The checkpoint tools' reader whenever an index exists: it verifies part sizes/sha256 and
    # re-ties the tied weights the index records (stored once, needed under every name).
    from megaflamingo.checkpoint import load_state_dict as verified_load

    if list(model_dir.glob("*.index.json")):
        try:
            return dict(verified_load(model_dir, verify=True))
        except Exception as e:
            raise ModelLoadError(f"{model_dir}: {e}") from e
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if files:
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            if not (model_dir / f).is_file():
                raise ModelLoadError(f"{model_dir}: weight file {f} listed in the index is missing")
            sd.update(load_file(str(model_dir / f)))
        return sd
    pts = sorted(model_dir.glob("*.bin")) + sorted(model_dir.glob("*.pt"))
    if pts:
        sd = {}
        for p in pts:
            sd.update(torch.load(str(p), map_location="cpu", weights_only=True))
        return sd
    raise ModelLoadError(f"{model_dir}: no weights (*.safetensors) found")


def apply_weights(model, sd: dict, source: str, trainable_only_ok: bool = True) -> dict:
    own = model.state_dict()
    unexpected = [k for k in sd if k not in own]
    if unexpected:
        raise ModelLoadError(f"{source}: {len(unexpected)} weights do not belong to the model, e.g. {unexpected[:5]}")
    bad = [k for k in sd if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ModelLoadError(f"{source}: shape mismatch for {bad[:5]} "
                             f"(e.g. {tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})")
    # Tied weights (e.g. OPT's lm_head = embed_tokens) are stored once: one name of a tied group
    # present counts for all.
    groups: dict = {}
    for k, v in own.items():
        groups.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
    covered = {k for g in groups.values() if any(x in sd for x in g) for k in g}
    missing = [k for k in own if k not in covered]
    if missing:
        # A trainable-only export needs the frozen LM from its original path; a random-init LM
        # (lm_config) has no such source, so missing LM weights would be silent garbage.
        needs_lm = [k for k in missing if k.startswith("lang_encoder.") and "gated_cross_attn" not in k]
        new = [k for k in missing if not k.startswith("lang_encoder.") or "gated_cross_attn" in k]
        if new or not trainable_only_ok:
            raise ModelLoadError(f"{source}: {len(missing)} model weights missing, e.g. {(new or missing)[:5]}")
        del needs_lm
    model.load_state_dict(sd, strict=False)
    return {"loaded": len(sd), "missing_from_file": len(missing)}


def read_encoder_record(model_dir: Path, cfg: Config) -> dict:
    p = model_dir / ENCODER_FILE
    if p.is_file():
        rec = json.loads(p.read_text(encoding="utf-8"))
        if "encoder" not in rec or "windows" not in rec:
            raise ModelLoadError(f"{p}: expected keys encoder, windows, silence_embedding")
        return rec
    rec = _record_from_training_data(cfg)
    if rec is not None:
        # Works only while the training data stays where the config says: a moved model dir loses it.
        warnings.warn(f"{model_dir}: no {ENCODER_FILE}; took the encoder record from the training data under "
                      f"{cfg.data.data_root} (re-export the model to record it)", stacklevel=2)
        return rec
    warnings.warn(f"{model_dir}: no {ENCODER_FILE} and no training data found; using the config's encoder "
                  "section (no checkpoint hash to check against)", stacklevel=2)
    e = cfg.encoder
    # Without the dataset's record: the config's encoder section (no checkpoint hash / silence).
    return {
        "encoder": {"name": e.name, "checkpoint": e.checkpoint, "random_init": e.random_init,
                    "embed_dim": e.embed_dim, "sample_rate": e.sample_rate, "config": {}},
        "windows": {"window_s": e.window_s, "overlap_s": e.overlap_s, "max_windows": e.max_windows},
        "silence_embedding": None,
    }


def _record_from_training_data(cfg: Config) -> Optional[dict]:
    """The encoder record of the model's training data, when its preprocessed splits are still
    where the config says (the usual case right after training); the first readable one wins."""
    from megaflamingo.data.reader import parse_blend_name

    root = cfg.data.data_root
    if not root or not Path(root).is_dir():
        return None
    for name in list(cfg.data.blend) + list(cfg.data.valid):
        try:
            d = Path(root) / parse_blend_name(name).split_dir
            if (d / "metadata.json").is_file():
                rec = encoder_record_from_dataset(d)
                if int(rec["encoder"]["embed_dim"]) != int(cfg.model.audio_embed_dim):
                    raise ModelLoadError(f"{d}: embed_dim {rec['encoder']['embed_dim']} != the model's "
                                         f"audio_embed_dim {cfg.model.audio_embed_dim}")
                return rec
        except (ValueError, OSError, KeyError):
            continue
    return None


def encoder_record_from_dataset(dataset_dir: str | os.PathLike) -> dict:
    """The encoder record of a preprocessed split (what ``encoder.json`` in a model dir holds)."""
    from megaflamingo.data.arrow_format import read_metadata

    meta = read_metadata(dataset_dir)
    return {"encoder": meta["encoder"], "windows": meta["windows"],
            "silence_embedding": meta["silence_embedding"], "clip_encoder": meta.get("clip_encoder"),
            "clip_embed_dim": meta.get("clip_embed_dim"), "dataset": f"{meta['dataset']}-{meta['task']}"}


def write_encoder_record(model_dir: str | os.PathLike, record: dict) -> Path:
    """Atomically (temp file + rename): a reader never sees half a record."""
    p = Path(model_dir) / ENCODER_FILE
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p


# --------------------------------------------------------------------------------------------
# entry point


def detect_kind(path: Path) -> str:
    if path.is_file():
        if path.suffix in (".pt", ".pth", ".bin"):
            return "af1"
        raise ModelLoadError(f"{path}: not a model directory or an AF1 .pt checkpoint")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} does not exist")
    if any((path / n).is_file() for n in ("config.json", "megaflamingo_config.json")) and (
            list(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()):
        return "export"
    if (path / "latest").is_file() or list(path.glob("global_step*")) or (path / "checkpoints").is_dir():
        return "deepspeed"
    if list(path.glob("*_part*.pt")):
        return "af1"
    raise ModelLoadError(f"{path}: not an exported model dir, a DeepSpeed checkpoint or an AF1 checkpoint")


def load_model(path: str | os.PathLike, device: str = "cpu", dtype: Optional[str] = None,
               config: Optional[str] = None, encoder_record: Optional[dict] = None,
               cache_dir: Optional[str | os.PathLike] = None) -> LoadedModel:
    """A DeepSpeed checkpoint or an AF1 file is converted to a model dir first: a temporary one,
    removed once the weights are in memory, or ``<cache_dir>/<name>`` (kept, reused by later calls
    when ``cache_dir`` is given)."""
    path = Path(path)
    kind = detect_kind(path)
    if kind == "export":
        loaded = _load_export(path, device, dtype, encoder_record)
    else:
        if kind == "af1" and config is None:
            raise ModelLoadError(f"{path}: an AF1 checkpoint needs --config (the model/LM/tokenizer settings)")
        convert = _convert_deepspeed if kind == "deepspeed" else (lambda p, o: _import_af1(p, o, config))
        if cache_dir is not None:
            out = Path(cache_dir) / f"{kind}-{path.resolve().name}"
            if not (out / "config.json").is_file():
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=cache_dir))
                try:
                    convert(path, tmp)
                    shutil.rmtree(out, ignore_errors=True)
                    os.replace(tmp, out)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            loaded = _load_export(out, device, dtype, encoder_record)
        else:
            with tempfile.TemporaryDirectory(prefix=f"megaflamingo-{kind}-") as tmp:
                convert(path, Path(tmp))
                loaded = _load_export(Path(tmp), device, dtype, encoder_record)
    loaded.kind, loaded.source = kind, str(path)
    return loaded


def _load_export(model_dir: Path, device: str, dtype: Optional[str], encoder_record: Optional[dict]) -> LoadedModel:
    try:
        cfg = read_config(model_dir)
    except ConfigError as e:
        raise ModelLoadError(str(e)) from e
    tok = build_tokenizer(cfg, model_dir)
    model, ids = build_from_config(cfg, tok, "cpu")
    sd = read_weights(model_dir)
    apply_weights(model, sd, str(model_dir), trainable_only_ok=cfg.model.lm_config is None)
    if dtype:
        model.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    model.to(device).eval()
    rec = encoder_record or read_encoder_record(model_dir, cfg)
    return LoadedModel(model=model, tokenizer=tok, token_ids=ids, config=cfg, encoder=rec, source=str(model_dir),
                       kind="export", max_tokens=cfg.data.max_tokens)


def _convert_deepspeed(path: Path, out: Path) -> None:
    from tools.convert import main as convert_main

    ckpt = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    rc = convert_main(["export", str(ckpt), str(out)])
    if rc not in (0, None):
        raise ModelLoadError(f"{ckpt}: megaflamingo-convert export failed (exit {rc})")


def _import_af1(path: Path, out: Path, config: str) -> None:
    from tools.convert import main as convert_main

    rc = convert_main(["af1-import", str(path), str(out), "--config", str(config)])
    if rc not in (0, None):
        raise ModelLoadError(f"{path}: megaflamingo-convert af1-import failed (exit {rc})")
