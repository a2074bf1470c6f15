"""Checkpoint tools benchmark: zero-to-fp32 / split / merge throughput vs the disk, peak RSS vs the largest part.

Generates a ZeRO-3 checkpoint (2 ranks) of the AF1 shape with random weights: OPT-IML-1.3B-shaped LM
(vocab 50275, d 2048, ffn 8192; frozen, as in pretraining; lm_head tied to the embedding) + a gated
xattn block per decoder layer + the 3-layer audio transformer (trainable). ``--scale`` scales the number of
decoder layers (1.0 = 24 layers, ~9 GB fp32; 0.1 = 2 layers, ~1.2 GB) so it fits a small machine.
The rank files are written in DeepSpeed's ZeRO-3 layout (per-parameter partitions of ceil(n/world)
elements, concatenated per rank; frozen parameters as per-rank fragments in the model-states files), and
the consolidated result is checked against the generated weights.

Each measured command runs in a fresh subprocess that reports its own peak RSS (VmHWM: includes the
page-cache pages of memory-mapped inputs it touched) and its peak anonymous RSS (sampled every 20 ms).
The disk's sequential write speed is measured by writing a file of the same size in 16 MB blocks + fsync
(and with dd). Inputs are usually still in the page cache (we do not drop caches on a shared machine), so
the figures are write-bound, which is what the >= 80 % goal is about.

    python bench/bench_convert.py --scale 0.1 --workdir /tmp/mf-bench
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

VOCAB, D, FFN, D_AUDIO, AT_FFN, AT_LAYERS, XH, XDH = 50275, 2048, 8192, 1024, 2048, 3, 8, 64


def af1_shapes(layers: int) -> tuple[OrderedDict, OrderedDict]:
    """(frozen LM shapes, trainable shapes) in model order."""
    frozen, train = OrderedDict(), OrderedDict()
    for i in range(AT_LAYERS):
        p = f"audio_transformer.layer_stack.{i}."
        for n, s in (("slf_attn.w_qs.weight", (D_AUDIO, D_AUDIO)), ("slf_attn.w_ks.weight", (D_AUDIO, D_AUDIO)),
                     ("slf_attn.w_vs.weight", (D_AUDIO, D_AUDIO)), ("slf_attn.fc.weight", (D_AUDIO, D_AUDIO)),
                     ("slf_attn.layer_norm.weight", (D_AUDIO,)), ("slf_attn.layer_norm.bias", (D_AUDIO,)),
                     ("pos_ffn.w_1.weight", (AT_FFN, D_AUDIO)), ("pos_ffn.w_1.bias", (AT_FFN,)),
                     ("pos_ffn.w_2.weight", (D_AUDIO, AT_FFN)), ("pos_ffn.w_2.bias", (D_AUDIO,)),
                     ("pos_ffn.layer_norm.weight", (D_AUDIO,)), ("pos_ffn.layer_norm.bias", (D_AUDIO,))):
            train[p + n] = s
    lm = "lang_encoder.model.decoder."
    frozen[lm + "embed_tokens.weight"] = (VOCAB, D)
    frozen[lm + "embed_positions.weight"] = (2050, D)
    for i in range(layers):
        x = f"{lm}layers.{i}.gated_cross_attn_layer."
        for n, s in (("attn_gate", (1,)), ("attn.norm.weight", (D,)), ("attn.norm.bias", (D,)),
                     ("attn.to_q.weight", (XH * XDH, D)), ("attn.to_kv.weight", (2 * XH * XDH, D_AUDIO)),
                     ("attn.to_out.weight", (D, XH * XDH)), ("ff_gate", (1,)), ("ff.0.weight", (D,)),
                     ("ff.0.bias", (D,)), ("ff.1.weight", (4 * D, D)), ("ff.3.weight", (D, 4 * D))):
            train[x + n] = s
        y = f"{lm}layers.{i}.decoder_layer."
        for n, s in (("self_attn.k_proj.weight", (D, D)), ("self_attn.k_proj.bias", (D,)),
                     ("self_attn.v_proj.weight", (D, D)), ("self_attn.v_proj.bias", (D,)),
                     ("self_attn.q_proj.weight", (D, D)), ("self_attn.q_proj.bias", (D,)),
                     ("self_attn.out_proj.weight", (D, D)), ("self_attn.out_proj.bias", (D,)),
                     ("self_attn_layer_norm.weight", (D,)), ("self_attn_layer_norm.bias", (D,)),
                     ("fc1.weight", (FFN, D)), ("fc1.bias", (FFN,)), ("fc2.weight", (D, FFN)), ("fc2.bias", (D,)),
                     ("final_layer_norm.weight", (D,)), ("final_layer_norm.bias", (D,))):
            frozen[y + n] = s
    frozen[lm + "final_layer_norm.weight"] = (D,)
    frozen[lm + "final_layer_norm.bias"] = (D,)
    return frozen, train


def value(name: str, shape) -> torch.Tensor:
    """Deterministic random weights (regenerated for the check instead of being kept in memory)."""
    g = torch.Generator().manual_seed(hash(name) % (2**31))
    return torch.randn(shape, generator=g)


def write_zero3(ckpt: Path, layers: int, world: int = 2) -> int:
    """DeepSpeed ZeRO-3 rank files for the AF1 shape; returns the fp32 bytes of the model."""
    import deepspeed
    from deepspeed.checkpoint import constants as C

    frozen, train = af1_shapes(layers)
    tag = ckpt / "global_step1"
    tag.mkdir(parents=True, exist_ok=True)
    (ckpt / "latest").write_text("global_step1")
    order = list(train) + list(frozen)  # module order does not matter for the bench
    for rank in range(world):
        frags, flat = {}, []
        for name, shape in frozen.items():
            n = math.prod(shape)
            per = math.ceil(n / world)
            full = torch.nn.functional.pad(value(name, shape).reshape(-1), (0, per * world - n))
            frags[name] = full[rank * per:(rank + 1) * per].clone()
        for name, shape in train.items():
            n = math.prod(shape)
            per = math.ceil(n / world)
            full = torch.nn.functional.pad(value(name, shape).reshape(-1), (0, per * world - n))
            flat.append(full[rank * per:(rank + 1) * per])
        model_states = {
            "module": OrderedDict((k, torch.empty(0)) for k in order + ["lang_encoder.lm_head.weight"]),
            C.BUFFER_NAMES: [], C.PARAM_SHAPES: [OrderedDict((k, torch.Size(s)) for k, s in train.items())],
            C.FROZEN_PARAM_SHAPES: OrderedDict((k, torch.Size(s)) for k, s in frozen.items()),
            C.FROZEN_PARAM_FRAGMENTS: frags,
            "shared_params": {"lang_encoder.lm_head.weight": "lang_encoder.model.decoder.embed_tokens.weight"},
            C.DS_VERSION: deepspeed.__version__, "dp_world_size": world,
        }
        torch.save(model_states, tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        del frags
        optim = {C.OPTIMIZER_STATE_DICT: {C.ZERO_STAGE: 3, C.PARTITION_COUNT: world,
                                          C.FP32_FLAT_GROUPS: [torch.cat(flat)]}}
        torch.save(optim, tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        del flat, optim
    return 4 * sum(math.prod(s) for s in list(frozen.values()) + list(train.values()))


# ------------------------------------------------------------------------------------------ measuring

def disk_write_speed(path: Path, nbytes: int) -> float:
    buf = os.urandom(16 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        done = 0
        while done < nbytes:
            f.write(buf)
            done += len(buf)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return done / dt


def dd_speed(path: Path, nbytes: int) -> float | None:
    if not shutil.which("dd"):
        return None
    count = max(1, nbytes // (16 << 20))
    t0 = time.perf_counter()
    r = subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={count}", "conv=fdatasync"],
                       capture_output=True)
    dt = time.perf_counter() - t0
    path.unlink(missing_ok=True)
    return count * (16 << 20) / dt if r.returncode == 0 else None


def child(argv: list[str]) -> None:
    """Run one megaflamingo-convert command in this process; print timing and memory as JSON."""
    peak_anon = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
            time.sleep(0.02)
    th = threading.Thread(target=sample, daemon=True)
    from megaflamingo.cli.convert import main  # imports outside the timed region

    import deepspeed.utils.zero_to_fp32  # noqa: F401  (heavy import: not part of the conversion)
    import megaflamingo.checkpoint.consolidate  # noqa: F401
    with open("/proc/self/status") as f:
        base = next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))
    th.start()
    t0 = time.perf_counter()
    rc = main(argv + ["--no-progress"])
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    print("BENCH " + json.dumps({"rc": rc, "seconds": dt, "vmhwm": hwm, "anon_peak": peak_anon[0], "anon_base": base}))


def run_child(argv: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", "--", *argv], capture_output=True, text=True)
    line = [l for l in r.stdout.splitlines() if l.startswith("BENCH ")]
    if r.returncode != 0 or not line:
        raise SystemExit(f"command failed: {argv}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(line[-1][6:])


def dir_bytes(d: Path) -> tuple[int, int]:
    sizes = [p.stat().st_size for p in d.iterdir() if p.is_file() and not p.name.endswith(".json")]
    return sum(sizes), max(sizes)


def main() -> None:
    if "--child" in sys.argv:
        child(sys.argv[sys.argv.index("--") + 1:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.1, help="fraction of AF1's 24 decoder layers (1.0 = full)")
    ap.add_argument("--workdir", default="runs/bench-convert")
    ap.add_argument("--part-size", default=None, help="split limit (default: total/4, like AF1's 5 parts)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="runs per step (the fastest is reported)")
    args = ap.parse_args()
    wd = Path(args.workdir)
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True)
    layers = max(1, round(24 * args.scale))
    t0 = time.perf_counter()
    total = write_zero3(wd / "ckpt", layers)
    print(f"generated ZeRO-3 checkpoint: {layers} decoder layers, {total / 1e9:.2f} GB fp32 "
          f"({time.perf_counter() - t0:.0f} s)")
    disk = disk_write_speed(wd / "speed.bin", total)
    dd = dd_speed(wd / "dd.bin", total)
    print(f"disk sequential write: {disk / 1e9:.2f} GB/s (python 16 MB blocks + fsync)"
          + (f", dd: {dd / 1e9:.2f} GB/s" if dd else ""))
    # like AF1's 5 parts; at small --scale the embedding (412 MB) alone sets the floor
    part = args.part_size or str(max(total // 4, 4 * VOCAB * D + (1 << 20)))
    rows = []
    steps = [
        ("zero-to-fp32 (safetensors)", ["zero-to-fp32", str(wd / "ckpt"), str(wd / "fp32"), "--max-shard-size", part],
         wd / "fp32"),
        (f"split --max-size {int(part) / 1e9:.2f} GB",
         ["split", str(wd / "fp32"), str(wd / "parts"), "--max-size", part], wd / "parts"),
        (f"split --max-size {int(part) / 1e9:.2f} GB --no-verify",
         ["split", str(wd / "fp32"), str(wd / "parts_nv"), "--max-size", part, "--no-verify"], wd / "parts_nv"),
        ("merge -> one .safetensors", ["merge", str(wd / "parts"), str(wd / "merged" / "model.safetensors")],
         wd / "merged"),
        ("split --layout af1 (torch parts)", ["split", str(wd / "fp32"), str(wd / "af1parts"), "--max-size", part,
                                              "--layout", "af1", "--name", "foundation"], wd / "af1parts"),
    ]
    for label, argv, out in steps:
        # the shared disk's speed drifts: measure it right before each step, over the same byte count
        best = None
        for rep in range(args.repeats):
            if rep:
                shutil.rmtree(out, ignore_errors=True)
            m = run_child(argv)
            if best is None or m["seconds"] < best["seconds"]:
                best = m
        m = best
        written, largest = dir_bytes(out)
        d = disk_write_speed(wd / "speed.bin", written)
        m["disk"] = d
        rows.append((label, written, largest, m))
        print(f"{label}: {written / 1e9:.2f} GB in {m['seconds']:.1f} s = {written / m['seconds'] / 1e9:.2f} GB/s "
              f"({100 * written / m['seconds'] / d:.0f}% of the disk's {d / 1e9:.2f} GB/s measured next to it); "
              f"peak RSS {m['vmhwm'] / 1e9:.2f} GB (anon {m['anon_peak'] / 1e9:.2f} GB, of which "
              f"{m['anon_base'] / 1e9:.2f} GB is the interpreter + imports), largest part {largest / 1e9:.2f} GB "
              f"-> RSS/part {m['vmhwm'] / largest:.2f}x (anon {m['anon_peak'] / largest:.2f}x, "
              f"anon above imports {(m['anon_peak'] - m['anon_base']) / largest:.2f}x)")
    # correctness: a few consolidated tensors equal the generated ones
    from megaflamingo.checkpoint import open_checkpoint

    src = open_checkpoint(wd / "merged" / "model.safetensors")
    frozen, train = af1_shapes(layers)
    for name in [next(iter(train)), "lang_encoder.model.decoder.embed_tokens.weight", list(frozen)[-3]]:
        shape = (frozen.get(name) or train.get(name))
        assert torch.equal(src.ref(name).load(), value(name, shape)), name
    assert src.ties == {"lang_encoder.lm_head.weight": "lang_encoder.model.decoder.embed_tokens.weight"}
    print("check: consolidated tensors equal the generated weights; lm_head tie recorded")
    print(json.dumps({"scale": args.scale, "model_gb": total / 1e9, "disk_gbps": disk / 1e9,
                      "dd_gbps": dd / 1e9 if dd else None,
                      "steps": [{"step": l, "gb": w / 1e9, "s": m["seconds"], "gbps": w / m["seconds"] / 1e9,
                                 "pct_disk": 100 * w / m["seconds"] / m["disk"], "disk_gbps": m["disk"] / 1e9, "vmhwm_gb": m["vmhwm"] / 1e9,
                                 "anon_peak_gb": m["anon_peak"] / 1e9, "anon_base_gb": m["anon_base"] / 1e9,
                                 "largest_part_gb": lg / 1e9}
                                for l, w, lg, m in rows]}))
    if not args.keep:
        shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    main()
