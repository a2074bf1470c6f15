"""`megaflamingo-demo`: serve a web page (and a scriptable API) over one trained model.

    megaflamingo-demo --model runs/quickstart/export
    megaflamingo-demo --model DIR --icl-from ARROW/<ds>-<task>/train --icl-audio-root DATA
    megaflamingo-demo --model DIR --rerank-clap 630k-audioset-fusion-best.pt --rerank-tokenizer roberta-base/

Open the printed URL. Scripts use the API: gradio_client.Client(URL).predict(handle_file("a.wav"),
"describe the sound.", api_name="/answer") and .predict(wav, message, history, api_name="/chat").
--model takes what megaflamingo-infer takes (exported dir, DeepSpeed run/checkpoint, AF1 .pt with --config).
Needs the optional extra: pip install 'megaflamingo[demo]'.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from megaflamingo.inference.uploads import DEFAULT_MAX_SECONDS

    p = argparse.ArgumentParser(prog="megaflamingo-demo", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model dir, DeepSpeed checkpoint dir, or AF1 .pt")
    p.add_argument("--config", help="config YAML (required for AF1 checkpoints)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--encoder-checkpoint", help="the audio encoder's weights (real encoders)")
    p.add_argument("--encoder-from", help="take the encoder record from this preprocessed split dir")
    p.add_argument("--cache-dir", help="keep a model dir converted from a DeepSpeed/AF1 checkpoint here")
    p.add_argument("--icl-from", help="preprocessed TRAIN split dir: enables the few-shot tab")
    p.add_argument("--icl-audio-root", help="root of that split's audio paths (plays the retrieved examples)")
    p.add_argument("--clip-checkpoint", help="LAION-CLAP checkpoint for --icl-from's clip keys (default: recorded)")
    p.add_argument("--rerank-clap", metavar="CKPT", help="LAION-CLAP checkpoint: enables AF1's sample-and-re-rank")
    p.add_argument("--rerank-tokenizer", metavar="DIR",
                   help="RoBERTa tokenizer files for --rerank-clap (default: roberta-base from the local HF cache)")
    p.add_argument("--host", default="127.0.0.1", help="interface to serve on (default %(default)s; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting at most (default %(default)s)")
    p.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                   help="longest clip accepted, seconds (default %(default)s; the model hears the first 33.25 s)")
    p.add_argument("--max-file-size", default="64mb", help="largest upload (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default answer length (API and page)")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from megaflamingo.inference.demo import DemoOptions, serve

    opts = DemoOptions(model=a.model, icl_from=a.icl_from, icl_audio_root=a.icl_audio_root, rerank_clap=a.rerank_clap,
                       rerank_tokenizer=a.rerank_tokenizer, host=a.host, port=a.port, device=a.device, dtype=a.dtype,
                       config=a.config, encoder_checkpoint=a.encoder_checkpoint, encoder_from=a.encoder_from,
                       cache_dir=a.cache_dir, clip_checkpoint=a.clip_checkpoint, max_queue=a.max_queue,
                       max_seconds=a.max_seconds, max_file_size=a.max_file_size, max_new_tokens=a.max_new_tokens)
    if opts.max_queue < 1 or opts.max_seconds <= 0 or opts.max_new_tokens < 1:
        print("megaflamingo-demo: error: --max-queue, --max-seconds and --max-new-tokens must be positive",
              file=sys.stderr)
        return 2
    try:
        serve(opts)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"megaflamingo-demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
