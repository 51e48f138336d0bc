"""The `vllm-lk` command. Subcommands only parse arguments and call library functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from vllm_lk import __version__


def _toy_target(args: argparse.Namespace) -> int:
    from training.config import resolve_config
    from training.toy import ToyTargetConfig, build_toy_target, default_target_dir

    config = resolve_config(ToyTargetConfig, args)
    out = args.out or default_target_dir(config)
    metadata = build_toy_target(config, out, force=args.force)
    print(json.dumps({k: metadata[k] for k in ("path", "num_parameters", "heldout_loss", "heldout_perplexity", "seconds")}, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from server.launch import serve_with_vllm

    return serve_with_vllm(
        target=args.target, host=args.host, port=args.port,
        served_model_name=args.served_model_name, vllm_args=args.vllm_args,
    )


def _doctor(args: argparse.Namespace) -> int:
    from vllm_lk.doctor import run

    return run()


def build_parser() -> argparse.ArgumentParser:
    from training.config import add_config_args
    from training.toy import ToyTargetConfig

    parser = argparse.ArgumentParser(
        prog="vllm-lk",
        description="Exact speculative decoding for vLLM, LK-loss drafter training, and an OpenAI-compatible server.",
    )
    parser.add_argument("--version", action="version", version=f"vllm-lk {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    toy = sub.add_parser(
        "toy-target",
        help="build (or reuse) the embedded toy target: a small Llama trained on the Python stdlib",
        description="Train a byte-level BPE tokenizer and a Llama causal LM on this Python's standard "
        "library, deterministically, and save a HF directory that transformers and vLLM load. "
        "A finished build of the same config is reused at once.",
    )
    toy.add_argument("--out", type=Path, default=None, help="output directory (default: the per-user cache)")
    toy.add_argument("--force", action="store_true", help="rebuild even if OUT holds a build")
    add_config_args(toy, ToyTargetConfig)
    toy.set_defaults(func=_toy_target)

    serve = sub.add_parser(
        "serve",
        help="serve a target through an OpenAI-compatible API (default: the toy target)",
        description="Start an OpenAI-compatible server on HOST:PORT. Without --target it builds or "
        "reuses the toy target. Arguments after `--` go to vLLM unchanged.",
    )
    serve.add_argument("--target", type=Path, default=None, help="HF model directory (default: the toy target)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    serve.add_argument("--served-model-name", default=None, help="model name clients send (default: directory name)")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then any vLLM engine arguments")
    serve.set_defaults(func=_serve)

    doctor = sub.add_parser("doctor", help="check that vLLM, transformers and the vllm_lk plugin work in this environment")
    doctor.set_defaults(func=_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"vllm-lk {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
