"""Offline preprocessing throughput, per CPU core.

    python bench/bench_preprocess.py [--files 6] [--seconds 30] [--htsat-windows 8]

1. decode + resample + normalise + window (our front end, `megaflamingo.audio.frontend.prepare`)
   as a real-time factor (audio seconds per wall second) on one core, for 44.1 kHz sources
   (no resampling) and 48 kHz / 22.05 kHz sources (resampled to 44.1 kHz), wav and flac;
2. the same files loaded the AF1 way: soundfile + `librosa.resample` (default res_type) + AF1's
   normalisation + windowing, when librosa is installed;
3. encoder windows/s: `tiny` and msclap's HTSAT (`clapcap`, random weights) on CPU.

Everything is synthetic and single-threaded on purpose; times are CPU seconds of this process,
so the figures are per core (`--workers` scales decoding out, one process per core).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from megaflamingo.audio.frontend import FrontendConfig, prepare, window_view  # noqa: E402
from megaflamingo.audio.windows import frame_windows  # noqa: E402
from megaflamingo.testing import write_audio  # noqa: E402


def _best(fn, repeats=3):
    """Best CPU time of this (single-threaded) process: a per-core figure that stays meaningful
    on a shared machine, where wall time mostly measures the neighbours."""
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times)


def af1_load(path: str, target_sr: int = 44100, duration: float = 33.25) -> np.ndarray:
    """AF1's loader (non-mp3 branch) with librosa's resampler, re-expressed for the comparison."""
    import librosa
    with sf.SoundFile(path) as f:
        sr, ch = f.samplerate, f.channels
        data = f.read(min(int(duration * sr), f.frames))
    if data.max() > 1 or data.min() < -1:
        data = data / max(abs(data.max()), abs(data.min()))
    if sr != target_sr:
        data = librosa.resample(data.T if ch > 1 else data, orig_sr=sr, target_sr=target_sr)
        data = data[0] if ch > 1 else data
    elif ch > 1:
        data = data.T[0]
    if data.min() >= 0:
        return 2 * data / abs(data.max()) - 1.0
    return data / max(abs(data.max()), abs(data.min()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--htsat-windows", type=int, default=8)
    ap.add_argument("--tiny-windows", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"front end, 1 core, {args.files} files x {args.seconds:.0f} s stereo "
              f"(real-time factor = audio s / CPU s; target >= 200x)")
        cfg = FrontendConfig(str(root))
        for sr, fmt in [(44100, "wav"), (44100, "flac"), (48000, "wav"), (48000, "flac"), (22050, "flac")]:
            names = []
            for i in range(args.files):
                name = f"{sr}_{i}.{fmt}"
                write_audio(root / name, "speech_like", args.seconds, sr, 2, seed=i)
                names.append(name)
            audio_s = args.files * min(args.seconds, 33.25)

            def ours():
                for n in names:
                    p = prepare(0, n, 0.0, cfg)
                    window_view(p.audio, p.num_windows, cfg).sum()

            t = _best(ours)
            line = f"  {sr / 1000:5.2f} kHz {fmt:4s}: ours {audio_s / t:7.0f}x"
            try:
                import librosa
                librosa.resample(np.zeros(4800), orig_sr=48000, target_sr=44100)  # warm-up

                def af1():
                    for n in names:
                        frame_windows(af1_load(str(root / n)), 44100).sum()

                t_af1 = _best(af1, repeats=2)
                line += f"   AF1-style librosa loader {audio_s / t_af1:7.0f}x  ({t_af1 / t:.1f}x slower)"
            except ImportError:
                line += "   (librosa not installed: no AF1-style comparison)"
            print(line, flush=True)

    from megaflamingo.audio.encoders import build_encoder

    print("encoders, CPU, 1 thread (7 s windows at 44.1 kHz)")
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (args.tiny_windows, 7 * 44100)).astype(np.float32)
    tiny = build_encoder("tiny", embed_dim=1024)
    tiny.encode(x[:4])
    t = _best(lambda: tiny.encode(x))
    print(f"  tiny (1024-d):            {args.tiny_windows / t:8.1f} windows/s")
    try:
        enc = build_encoder("clapcap", random_init=True)
    except Exception as e:  # noqa: BLE001
        print(f"  clapcap: cannot build ({e})")
        return
    xb = x[: args.htsat_windows]
    enc.encode(xb[:1])
    t = _best(lambda: enc.encode(xb), repeats=2)
    print(f"  clapcap HTSAT (random):   {args.htsat_windows / t:8.2f} windows/s "
          f"(batch {args.htsat_windows}; {t / args.htsat_windows * 16:.2f} s per 16-window sample)")


if __name__ == "__main__":
    main()
