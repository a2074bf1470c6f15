"""Window encoders behind one interface.

    enc = build_encoder("clapcap", checkpoint="clapcap_weights_2023.pth")   # or "laion-clap", "tiny"
    emb = enc.encode(clips)            # float32 numpy [B, enc.num_samples] -> float32 [B, enc.embed_dim]
    enc.describe()                     # the `encoder` block of metadata.json

`tiny`       : log-mel statistics -> fixed random projection (seeded); CPU quickstart and tests.
`clapcap`    : msclap's HTSAT audio encoder + projection (config 2023 / clapcap), 7 s @ 44.1 kHz -> 1024.
`laion-clap` : LAION-CLAP HTSAT-tiny (fusion or not) + audio projection, 10 s @ 48 kHz -> 512,
               L2-normalised like `CLAP_Module.get_audio_embedding_from_data`.
Real encoders load weights from a user path (never the hub); `random_init=True` builds them with
random weights for tests, and the flag is written to the metadata so such a dataset is never
mistaken for a real one.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ENCODERS = ("tiny", "clapcap", "laion-clap")


class EncoderError(RuntimeError):
    pass


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# shared log-mel front end (HTK mel, like torchaudio's MelSpectrogram with norm=None)


def mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> torch.Tensor:
    """[n_freqs, n_mels] triangular HTK-mel filters (torchaudio `melscale_fbanks`, norm=None)."""
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)
    to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    m_pts = torch.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2, dtype=torch.float64)
    f_pts = 700.0 * (10 ** (m_pts / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0).float()


class LogMel(nn.Module):
    """power mel spectrogram in dB: [B, S] -> [B, frames, n_mels] (center=True, reflect pad)."""

    def __init__(self, sample_rate: int, n_fft: int, hop: int, n_mels: int, f_min: float, f_max: float):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("fb", mel_filterbank(n_fft // 2 + 1, f_min, f_max, n_mels, sample_rate),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(x, self.n_fft, self.hop, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True).abs().pow(2)
        mel = spec.transpose(1, 2) @ self.fb
        return 10.0 * torch.log10(mel.clamp_min(1e-10))


# --------------------------------------------------------------------------------------------
# interface


@dataclass
class EncoderInfo:
    name: str
    sample_rate: int
    embed_dim: int
    window_s: float                 # the clip length the model expects
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    random_init: bool = False
    config: dict = field(default_factory=dict)

    def describe(self) -> dict:
        d = asdict(self)
        d.pop("window_s")
        d["config"] = dict(d["config"], clip_seconds=self.window_s)
        return d


class WindowEncoder:
    """Wraps an nn.Module mapping float waveforms [B, S] to embeddings [B, D]."""

    def __init__(self, module: nn.Module, info: EncoderInfo, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.module = module.to(device=device).eval()
        self.info = info
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def embed_dim(self) -> int:
        return self.info.embed_dim

    @property
    def sample_rate(self) -> int:
        return self.info.sample_rate

    @property
    def num_samples(self) -> int:
        return int(self.info.window_s * self.info.sample_rate)

    def describe(self) -> dict:
        return self.info.describe()

    @torch.inference_mode()
    def encode(self, clips: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(clips, dtype=torch.float32)
        if x.ndim != 2:
            raise EncoderError(f"{self.info.name}: expected [batch, samples], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        x = x.to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            y = self.module(x)
        y = y.float().cpu().numpy()
        if y.shape != (x.shape[0], self.embed_dim):
            raise EncoderError(f"{self.info.name}: produced {y.shape}, expected "
                               f"({x.shape[0]}, {self.embed_dim})")
        return y

    def silence_embedding(self) -> np.ndarray:
        """AF1 pads missing windows with zero AUDIO, so padding slots hold this, not zeros."""
        return self.encode(np.zeros((1, self.num_samples), np.float32))[0]


# --------------------------------------------------------------------------------------------
# tiny


class TinyEncoderModule(nn.Module):
    """log-mel -> per-band mean/std/max over time -> fixed random projection -> tanh.
    All weights come from `seed`, so the same seed gives the same embeddings anywhere."""

    def __init__(self, embed_dim: int, sample_rate: int, seed: int, n_mels: int = 64):
        super().__init__()
        self.mel = LogMel(sample_rate, 1024, 320, n_mels, 50.0, 8000.0)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(3 * n_mels, embed_dim, generator=g) / math.sqrt(3 * n_mels))
        self.register_buffer("bias", 0.1 * torch.randn(embed_dim, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mel(x) / 20.0  # dB scaled to O(1)
        feats = torch.cat([m.mean(1), m.std(1), m.amax(1)], dim=-1)
        return torch.tanh(feats @ self.proj + self.bias)


def build_tiny(embed_dim: int = 1024, seed: int = 0, sample_rate: int = 44100,
               window_s: float = 7.0, device: str = "cpu") -> WindowEncoder:
    info = EncoderInfo("tiny", sample_rate, embed_dim, window_s, None, None, True,
                       {"seed": seed, "n_mels": 64, "n_fft": 1024, "hop": 320})
    return WindowEncoder(TinyEncoderModule(embed_dim, sample_rate, seed), info, device)


# --------------------------------------------------------------------------------------------
# importing the real encoders' model code


def import_isolated(package: str, subpackage: str, run_init: bool = True) -> types.ModuleType:
    """Import `package.subpackage` without executing `package/__init__.py`.

    msclap's and laion_clap's top-level __init__ import torchaudio/torchvision (for file loading
    and image transforms we never use); on machines where those cannot be imported the model
    code itself still works. The subpackage is registered under a private alias."""
    alias = f"_megaflamingo_isolated_{package}_{subpackage}".replace(".", "_")
    if alias in sys.modules:
        return sys.modules[alias]
    spec = importlib.util.find_spec(package)  # top-level: locates without executing
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(f"package {package!r} is not installed (pip install "
                           f"'megaflamingo[encoders]')")
    location = Path(list(spec.submodule_search_locations)[0]) / subpackage.replace(".", "/")
    sub = importlib.util.spec_from_file_location(alias, location / "__init__.py",
                                                 submodule_search_locations=[str(location)])
    module = importlib.util.module_from_spec(sub)
    sys.modules[alias] = module
    if not run_init:  # an empty package: only the submodules asked for get imported
        return module
    try:
        sub.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(alias, None)
        raise
    return module


def _import_submodule(package: str, subpackage: str, module: str) -> types.ModuleType:
    """`package.subpackage.module`, normally; isolated from the package __init__ if that fails."""
    try:
        return importlib.import_module(f"{package}.{subpackage}.{module}")
    except ImportError as first:
        try:
            parent = import_isolated(package, subpackage)
            return importlib.import_module(f"{parent.__name__}.{module}")
        except ImportError as e:
            raise EncoderError(f"cannot import {package}.{subpackage}.{module}: {first}; "
                               f"isolated import also failed: {e}") from e


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"checkpoint {path} does not exist")
    from megaflamingo.checkpoint.integrity import CheckpointError
    from megaflamingo.checkpoint.safe_load import restricted_load

    try:
        sd = restricted_load(path)
    except CheckpointError as e:  # names the file and, for a refused pickle, the global it needs
        raise EncoderError(str(e)) from None
    for key in ("model", "state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def _take_prefixed(sd: dict, prefixes: tuple[str, ...], what: str, path) -> dict:
    for p in prefixes:
        sub = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
        if sub:
            return sub
    raise EncoderError(f"{path}: no {what} weights (looked for keys starting with {prefixes})")


def _load_strict(module: nn.Module, sd: dict, path, what: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing:
        raise EncoderError(f"{path}: {what} weights missing {len(missing)} tensors, e.g. {missing[:5]}")
    bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if bad:
        raise EncoderError(f"{path}: {what} shape mismatch for {bad[:5]}")
    module.load_state_dict({k: sd[k] for k in own}, strict=True)
    del unexpected  # text tower / decoder weights in the same file are expected and ignored


# --------------------------------------------------------------------------------------------
# clapcap (msclap)

CLAPCAP_CONFIG = dict(audioenc_name="HTSAT", d_in=768, d_out=1024, sample_rate=44100,
                      window_size=1024, hop_size=320, mel_bins=64, fmin=50, fmax=8000,
                      classes_num=527)


class _FirstOutput(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)[0]


def build_clapcap(checkpoint: str | None = None, random_init: bool = False, device: str = "cpu",
                  seed: int = 0, window_s: float = 7.0) -> WindowEncoder:
    if window_s != 7.0:
        # AF1's CLAP wrapper repeat-pads every window to the 7 s the model was trained on
        raise EncoderError(f"clapcap encodes 7 s windows (config_2023 duration), got window_s={window_s}")
    if checkpoint is None and not random_init:
        raise EncoderError("clapcap needs --checkpoint PATH (clapcap_weights_2023.pth) or "
                           "--random-init (tests only)")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise EncoderError(f"checkpoint {checkpoint} does not exist")
    clap_mod = _import_submodule("msclap", "models", "clap")
    torch.manual_seed(seed)
    enc = clap_mod.AudioEncoder(**CLAPCAP_CONFIG)
    sha = None
    if checkpoint is not None:
        sd = load_checkpoint(checkpoint)
        # clapcap_weights_2023.pth: ClapCaption.clap = CLAP.audio_encoder -> "clap.*";
        # plain CLAP 2023 weights: "audio_encoder.*".
        _load_strict(enc, _take_prefixed(sd, ("clap.", "audio_encoder."), "audio encoder", checkpoint),
                     checkpoint, "clapcap audio encoder")
        sha = sha256_file(checkpoint)
    info = EncoderInfo("clapcap", 44100, 1024, 7.0, None if checkpoint is None else str(checkpoint),
                       sha, checkpoint is None, {"msclap_config": "config_2023/clapcap", **CLAPCAP_CONFIG})
    return WindowEncoder(_FirstOutput(enc), info, device)


# --------------------------------------------------------------------------------------------
# LAION-CLAP

LAION_AUDIO_CFG = dict(audio_length=1024, clip_samples=480000, mel_bins=64, sample_rate=48000,
                       window_size=1024, hop_size=480, fmin=50, fmax=14000, class_num=527,
                       model_type="HTSAT", model_name="tiny")


class LaionAudioModule(nn.Module):
    """HTSAT audio branch + audio projection + L2 norm, fed the way `get_audio_features`
    prepares a <= 10 s clip (repeat-pad to 480000 samples; fusion: the same mel 4 times)."""

    def __init__(self, branch: nn.Module, fusion: bool, joint_dim: int = 512, width: int = 768):
        super().__init__()
        self.audio_branch = branch
        self.audio_projection = nn.Sequential(nn.Linear(width, joint_dim), nn.ReLU(),
                                              nn.Linear(joint_dim, joint_dim))
        self.fusion = fusion
        c = LAION_AUDIO_CFG
        self.mel = LogMel(c["sample_rate"], c["window_size"], c["hop_size"], c["mel_bins"],
                          c["fmin"], c["fmax"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = repeat_pad(x, LAION_AUDIO_CFG["clip_samples"])
        longer = torch.zeros(x.shape[0], 1, dtype=torch.bool, device=x.device)
        if self.fusion:
            mel = self.mel(x)
            inp = {"mel_fusion": mel.unsqueeze(1).expand(-1, 4, -1, -1).contiguous(), "longer": longer}
        else:
            inp = {"waveform": x, "longer": longer}
        emb = self.audio_branch(inp, mixup_lambda=None, device=x.device)["embedding"]
        return F.normalize(self.audio_projection(emb), dim=-1)


def repeat_pad(x: torch.Tensor, n: int) -> torch.Tensor:
    """LAION's `repeatpad` for a batch of equal-length clips, and a deterministic cut at `n`
    (LAION crops longer input at a random offset; we feed at most n samples)."""
    length = x.shape[1]
    if length >= n:
        return x[:, :n]
    reps = n // length
    x = x.repeat(1, reps)
    return F.pad(x, (0, n - x.shape[1]))


def build_laion_clap(checkpoint: str | None = None, random_init: bool = False, fusion: bool = True,
                     device: str = "cpu", seed: int = 0, window_s: float = 10.0) -> WindowEncoder:
    """`window_s`: the clip length it will be fed (10 s for AF1's kNN clip embedding; the window
    length when it encodes windows). Shorter clips are repeat-padded to 10 s, as LAION does."""
    if not 0 < window_s <= 10.0:
        raise EncoderError(f"LAION-CLAP takes clips of at most 10 s, got {window_s} s")
    if checkpoint is None and not random_init:
        raise EncoderError("laion-clap needs --checkpoint PATH (630k-audioset-fusion-best.pt) or "
                           "--random-init (tests only)")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise EncoderError(f"checkpoint {checkpoint} does not exist")
    try:
        # laion_clap/__init__ and clap_module/__init__ pull the text towers, the training data
        # code (torchaudio) and image transforms; the HTSAT file only needs its siblings.
        pkg = import_isolated("laion_clap", "clap_module", run_init=False)
        htsat = importlib.import_module(f"{pkg.__name__}.htsat")
    except ImportError as e:
        raise EncoderError(
            f"cannot import laion_clap.clap_module.htsat ({e}). LAION-CLAP's model code needs "
            f"torchvision importable (its utils import torchvision.ops); install a torchvision "
            f"matching your torch") from e
    cfg = types.SimpleNamespace(**LAION_AUDIO_CFG)
    torch.manual_seed(seed)
    branch = htsat.create_htsat_model(cfg, enable_fusion=fusion, fusion_type="aff_2d" if fusion else "None")
    module = LaionAudioModule(branch, fusion)
    sha = None
    if checkpoint is not None:
        sd = load_checkpoint(checkpoint)
        wanted = {k: v for k, v in sd.items() if k.startswith(("audio_branch.", "audio_projection."))}
        if not wanted:
            raise EncoderError(f"{checkpoint}: no audio_branch/audio_projection weights")
        own_keys = set(k for k in module.state_dict() if not k.startswith("mel."))
        wanted = {k: v for k, v in wanted.items() if k in own_keys}
        _load_strict(nn.ModuleDict({"audio_branch": module.audio_branch,
                                    "audio_projection": module.audio_projection}),
                     wanted, checkpoint, "LAION-CLAP audio")
        sha = sha256_file(checkpoint)
    info = EncoderInfo("laion-clap", 48000, 512, float(window_s), None if checkpoint is None else str(checkpoint),
                       sha, checkpoint is None, {"fusion": fusion, "amodel": "HTSAT-tiny", **LAION_AUDIO_CFG})
    return WindowEncoder(module, info, device)


# --------------------------------------------------------------------------------------------


def build_encoder(name: str, checkpoint: str | None = None, random_init: bool = False,
                  device: str = "cpu", embed_dim: int | None = None, seed: int = 0,
                  fusion: bool = True, window_s: float | None = None,
                  sample_rate: int | None = None) -> WindowEncoder:
    """`window_s`: clip length the encoder is fed (default: 7 s; 10 s for laion-clap, its
    clip-embedding length). `sample_rate`: the tiny encoder's (default 44100); the real encoders
    have their own and ignore it (the caller compares)."""
    if name == "tiny":
        if checkpoint is not None:
            raise EncoderError("the tiny encoder has no checkpoint (its weights come from --seed)")
        return build_tiny(embed_dim or 1024, seed=seed, sample_rate=sample_rate or 44100, device=device,
                          window_s=window_s or 7.0)
    if embed_dim is not None:
        raise EncoderError(f"--embed-dim applies to the tiny encoder only ({name} has a fixed size)")
    if name == "clapcap":
        return build_clapcap(checkpoint, random_init, device, seed, window_s or 7.0)
    if name == "laion-clap":
        return build_laion_clap(checkpoint, random_init, fusion, device, seed, window_s or 10.0)
    raise EncoderError(f"unknown encoder {name!r}; choose from {ENCODERS}")
