"""The `vllm-lk` command. Subcommands only parse arguments and call library functions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from vllm_lk import __version__
from vllm_lk.errors import UserError


def _toy_target(args: argparse.Namespace) -> int:
    from training.config import resolve_config
    from training.toy.target import ToyTargetConfig, build_toy_target, default_target_dir

    config = resolve_config(ToyTargetConfig, args)
    out = args.out or default_target_dir(config)
    metadata = build_toy_target(config, out, force=args.force)
    print(json.dumps({k: metadata[k] for k in ("path", "num_parameters", "heldout_loss", "heldout_perplexity", "seconds")}, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from server.config import ServerConfig
    from server.engine import engine_args_from_cli
    from server.runner import serve
    from training.config import resolve_config

    if args.no_default_drafter:
        args.default_drafter = False
    config = resolve_config(ServerConfig, args)
    passthrough = engine_args_from_cli(args.vllm_args)
    if passthrough:  # `-- vLLM flags` win over the YAML's engine_args
        config = ServerConfig(**{**config.model_dump(), "engine_args": {**config.engine_args, **passthrough}})
    return serve(config)


def _generate(args: argparse.Namespace) -> int:
    from training.config import resolve_config
    from training.generate import GenerateConfig, generate

    config = resolve_config(GenerateConfig, args)
    if args.endpoint:
        from training.generate_endpoint import generate_via_endpoint

        api_key = args.api_key or os.environ.get("VLLM_LK_ENDPOINT_API_KEY")
        summary = generate_via_endpoint(config, args.out, args.endpoint, api_key, args.concurrency, args.served_model)
    else:
        summary = generate(config, args.out)
    print(json.dumps(summary))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from training.config import resolve_config
    from training.evaluate import EvalConfig, evaluate_pair, save_result, summary_line

    result = evaluate_pair(resolve_config(EvalConfig, args))
    save_result(result, args.json)
    print(summary_line(result))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from vllm_lk.doctor import run

    return run()


def _export(args: argparse.Namespace) -> int:
    from training.trainer import export_run

    result = export_run(args.run, args.out, device=args.device)
    print(json.dumps({k: result[k] for k in ("drafter_dir", "steps", "offline_alpha", "predicted_tau")}, indent=2))
    return 0


def _bench_reproduce(args: argparse.Namespace) -> int:
    from training.bench.reproduce import ReproduceConfig, load_config, reproduce, summary

    overrides = {name: getattr(args, name, None) for name in ReproduceConfig.model_fields}
    report = reproduce(load_config(args.quick, args.config, **overrides), args.out)
    print(summary(report))
    return 0


def _preset_config(model, args: argparse.Namespace):
    """The bench's config from flags and --config; with --quick, the quick preset under what was set."""
    from training.config import resolve_config

    config = resolve_config(model, args)
    if args.quick:
        config = model.quick(**{k: v for k, v in config.model_dump().items() if k in config.model_fields_set})
    return config


def _bench_speed(args: argparse.Namespace) -> int:
    from training.bench.speed import SpeedConfig, bench_speed, markdown

    print(markdown(bench_speed(_preset_config(SpeedConfig, args), json_path=args.json)))
    return 0


def _bench_adapt(args: argparse.Namespace) -> int:
    from training.bench.adapt import AdaptBenchConfig, bench_adapt, markdown

    print(markdown(bench_adapt(_preset_config(AdaptBenchConfig, args), args.out, json_path=args.json)))
    return 0


def _populate_bench(bench: argparse.ArgumentParser) -> None:
    from training.bench.adapt import AdaptBenchConfig
    from training.bench.reproduce import ReproduceConfig
    from training.bench.speed import SpeedConfig
    from training.config import add_config_args

    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    rep = bench_sub.add_parser(
        "reproduce",
        help="KL vs TV vs LK losses, end to end: generate, train every drafter x loss, serve, measure tau",
        description="Regenerate training data with the target (default: the toy target), train each drafter with "
        "each loss on it, serve every pair in vLLM with the plugin on held-out code and docstring prompts at each "
        "temperature, compare served tau with the offline prediction, measure the best pair's decode throughput "
        "with and without speculation, and write OUT/reproduction.json, reproduction.md and reproduction.png. "
        "A rerun resumes (finished trainings and evaluations are reused). Precedence: preset (full, or --quick) "
        "< --config FILE.yaml < flags.",
    )
    rep.add_argument("--quick", action="store_true", help="the small preset (2 drafters x 2 losses; <= 10 min on 2 cores)")
    rep.add_argument("--out", type=Path, default=Path("results"), help="output directory (default: results)")
    add_config_args(rep, ReproduceConfig)
    rep.set_defaults(func=_bench_reproduce)

    speed = bench_sub.add_parser(
        "speed",
        help="tokens/s with and without speculation: each drafter x fixed K / adaptive x T x concurrency",
        description="Measure decode speed without speculation and with each drafter (built with the default "
        "drafter's recipe if missing; cached) at each fixed K and adaptively, at each temperature and concurrency, "
        "in interleaved rounds on one set of held-out code prompts. Prints a markdown table; --json FILE also "
        "writes FILE (rows: drafter, mode, K, temperature, concurrency, tokens_per_s, speedup, tau, ...), FILE.md "
        "and FILE.png.",
    )
    speed.add_argument("--quick", action="store_true", help="2 drafters (mlp, eagle3), K 1/3/5, 4 prompts: <= 15 min once drafters are cached")
    speed.add_argument("--json", type=Path, default=None, help="write the report here (and .md / .png beside it)")
    add_config_args(speed, SpeedConfig)
    speed.set_defaults(func=_bench_speed)

    ad = bench_sub.add_parser(
        "adapt",
        help="the closed loop on shifted traffic: served tau before and after each capture -> LK fine-tune -> swap round",
        description="Serve a drafter trained on code prompts only (built and cached, or --drafter) with capture on, "
        "send docstring -> function chat traffic it never saw, and alternate measured periods with `vllm-lk adapt` "
        "rounds (fine-tune on the captured traffic, swap live when the predicted tau improves). Reports served tau "
        "per period from the server's own counters (with standard errors), each round's seconds and the failed "
        "requests; writes OUT/adapt.json and adapt.md (or --json FILE and FILE.md).",
    )
    ad.add_argument("--quick", action="store_true", help="96 requests per period, 150 fine-tuning steps: <= 15 min once the start drafter is cached")
    ad.add_argument("--out", type=Path, default=Path("results/bench-adapt"), help="work directory (capture, rounds, server log); must be new")
    ad.add_argument("--json", type=Path, default=None, help="write the report here (and .md beside it; default OUT/adapt.json)")
    add_config_args(ad, AdaptBenchConfig)
    ad.set_defaults(func=_bench_adapt)


def _populate_train(train: argparse.ArgumentParser) -> None:
    from training.train_cli import add_arguments, run

    add_arguments(train)
    train.set_defaults(func=run)


def _populate_export(export: argparse.ArgumentParser) -> None:
    export.description = ("Re-export a run's latest checkpoint (e.g. one that stopped early) with held-out alpha and "
                          "LK metadata. `vllm-lk train` already exports when it finishes.")
    export.add_argument("--run", type=Path, required=True, help="run directory of `vllm-lk train`")
    export.add_argument("--out", type=Path, default=None, help="drafter directory to write (default: RUN/drafter)")
    export.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    export.set_defaults(func=_export)


def _populate_serve(serve: argparse.ArgumentParser) -> None:
    serve.description = (
        "Start the OpenAI-compatible server (FastAPI + uvicorn over vLLM's AsyncLLM) on HOST:PORT: "
        "/v1/completions, /v1/chat/completions, /v1/models, /health, /ready, /metrics, /dashboard. Without "
        "--target it builds or reuses the toy target; without --drafter, the default LK-trained drafter. "
        "Precedence: defaults < --config FILE.yaml (keys: the fields of server.config.ServerConfig) < flags. "
        "Arguments after `--` are vLLM engine arguments (e.g. --max-model-len, --tensor-parallel-size).")
    serve.add_argument("--config", type=Path, default=None, help="YAML file of ServerConfig fields")
    serve.add_argument("--target", type=Path, default=None,
                       help="HF model directory, or a Hugging Face id ORG/NAME[@REVISION] in the local HF cache "
                       "(default: the toy target)")
    serve.add_argument("--drafter", type=Path, default=None,
                       help="drafter directory or Hugging Face id in the local HF cache (default: the default LK drafter)")
    serve.add_argument("--no-default-drafter", action="store_true", help="without --drafter, serve without speculation")
    serve.add_argument("--method", default=None, help="vLLM speculative method (default: from the drafter's LK metadata)")
    serve.add_argument("--num-speculative-tokens", dest="num_speculative_tokens", type=int, default=None,
                       help="K drafts per step (default: the drafter's trained K, else 3)")
    serve.add_argument("--speculation", choices=["adaptive", "fixed"], default=None,
                       help="fixed (default): K drafts every step; adaptive: draft and verify per step only what is "
                       "expected to pay, up to K (docs/speed.md)")
    serve.add_argument("--host", default=None, help="interface to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="TCP port (default: 8000)")
    keys = serve.add_mutually_exclusive_group()
    keys.add_argument("--api-key", dest="api_key", default=None, help="require 'Authorization: Bearer KEY'")
    keys.add_argument("--api-key-file", dest="api_key_file", type=Path, default=None, help="file holding the API key")
    serve.add_argument("--admin-key", dest="admin_key", default=None,
                       help="key of the admin routes (POST /admin/drafter swaps the drafter live); default: "
                       "$VLLM_LK_ADMIN_KEY; without either there are no admin routes")
    serve.add_argument("--swap-strategy", dest="swap_strategy", choices=["beside", "restart"], default=None,
                       help="a swap to a drafter of another shape: beside (default; a new engine next to the old) "
                       "or restart (drain, stop, start: for when memory holds one engine)")
    serve.add_argument("--capture", dest="capture_dir", type=Path, default=None,
                       help="store served requests (PROMPTS AND COMPLETIONS) as rotating 0600 JSONL in DIR for retraining")
    serve.add_argument("--capture-rate", dest="capture_rate", type=float, default=None,
                       help="share of requests captured (default: 1)")
    serve.add_argument("--capture-max-mib", dest="capture_max_mib", type=float, default=None,
                       help="size cap of the capture directory in MiB (default: 256)")
    serve.add_argument("--served-model-name", dest="served_model_name", default=None,
                       help="model id clients send (default: the target's Hugging Face id, else its directory name)")
    serve.add_argument("--max-queue", dest="max_queue", type=int, default=None,
                       help="requests admitted at once; more get 429 (default: 256)")
    serve.add_argument("--drain-timeout-s", dest="drain_timeout_s", type=float, default=None,
                       help="seconds in-flight requests may finish on shutdown (default: 30)")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then any vLLM engine arguments")
    serve.set_defaults(func=_serve)


def _populate_toy_target(toy: argparse.ArgumentParser) -> None:
    from training.config import add_config_args
    from training.toy.target import ToyTargetConfig

    toy.description = ("Train a byte-level BPE tokenizer and a Llama causal LM on this Python's standard "
                       "library, deterministically, and save a HF directory that transformers and vLLM load. "
                       "A finished build of the same config is reused at once.")
    toy.add_argument("--out", type=Path, default=None, help="output directory (default: the per-user cache)")
    toy.add_argument("--force", action="store_true", help="rebuild even if OUT holds a build")
    add_config_args(toy, ToyTargetConfig)
    toy.set_defaults(func=_toy_target)


def _populate_generate(gen: argparse.ArgumentParser) -> None:
    from training.config import add_config_args
    from training.generate import GenerateConfig

    gen.description = ("Sample the target's own responses to prompts (JSONL {prompt}/{messages}, or "
                       "--prompts builtin:KIND:SPLIT:COUNT[:SEED] drawn from the toy corpus: KIND code|docstring, "
                       "SPLIT train|heldout). Writes one line per record {id, prompt|messages, completion, "
                       "prompt_token_ids, completion_token_ids, finish_reason}; a rerun skips ids already in OUT.")
    gen.add_argument("--out", type=Path, required=True, help="output JSONL (appended to; settings kept in OUT.config.json)")
    gen.add_argument("--endpoint", default=None,
                     help="generate through this running OpenAI-compatible server (ours or vLLM's), e.g. "
                     "http://127.0.0.1:8000, instead of starting an engine; --target still names the served model's "
                     "directory (its tokenizer)")
    gen.add_argument("--api-key", dest="api_key", default=None,
                     help="the endpoint's API key (default: $VLLM_LK_ENDPOINT_API_KEY; never written to OUT.config.json)")
    gen.add_argument("--concurrency", type=int, default=8, help="requests in flight to the endpoint (default: 8)")
    gen.add_argument("--served-model", dest="served_model", default=None,
                     help="model id to request (default: the first the endpoint lists)")
    add_config_args(gen, GenerateConfig)
    gen.set_defaults(func=_generate)


def _populate_eval(ev: argparse.ArgumentParser) -> None:
    from training.config import add_config_args
    from training.evaluate import EvalConfig

    ev.description = ("Generate with speculative decoding, record per-position acceptance and tau = 1 + "
                      "accepted/steps, then predict both offline from the drafter's alpha on the same sequences.")
    ev.add_argument("--json", type=Path, required=True, help="where to write the result JSON")
    add_config_args(ev, EvalConfig)
    ev.set_defaults(func=_eval)


def _adapt(args: argparse.Namespace) -> int:
    from training.adapt import AdaptConfig, Endpoint, adapt, summary_line
    from training.config import resolve_config

    config = resolve_config(AdaptConfig, args)
    endpoint = None
    if args.endpoint:
        admin_key = args.admin_key or os.environ.get("VLLM_LK_ADMIN_KEY")
        if not admin_key:
            raise UserError("--endpoint needs the server's admin key: --admin-key KEY or $VLLM_LK_ADMIN_KEY")
        endpoint = Endpoint(args.endpoint, admin_key)
    for record in adapt(config, args.out, endpoint):
        print(f"round {record['round']}: {summary_line(record)}")
    return 0


def _populate_adapt(ad: argparse.ArgumentParser) -> None:
    from training.adapt import AdaptConfig
    from training.config import add_config_args

    ad.description = ("Fine-tune the served drafter with LK on the traffic the server captured (`vllm-lk serve "
                      "--capture DIR`), compare offline alpha on held-out captured records, and swap it into the "
                      "server (POST /admin/drafter) when the predicted tau improves by the margin. Resumable: rerun "
                      "with the same --out. Writes OUT/round-N/record.json and OUT/rounds.jsonl.")
    ad.add_argument("--out", type=Path, required=True, help="work directory (rounds, fine-tunes, records)")
    ad.add_argument("--endpoint", default=None, help="the serving server (e.g. http://127.0.0.1:8000): where to swap")
    ad.add_argument("--admin-key", dest="admin_key", default=None, help="its admin key (default: $VLLM_LK_ADMIN_KEY)")
    add_config_args(ad, AdaptConfig)
    ad.set_defaults(func=_adapt)


def _populate_doctor(doctor: argparse.ArgumentParser) -> None:
    doctor.set_defaults(func=_doctor)


# Every command: its one-line help, and what adds its arguments. A command's arguments (and the
# config models they come from) are built only when that command runs, so `vllm-lk serve` imports
# neither the trainer nor the benchmarks.
COMMANDS = {
    "toy-target": ("build (or reuse) the embedded toy target: a small Llama trained on the Python stdlib", _populate_toy_target),
    "serve": ("serve a target (default: the toy target with its LK drafter) through an OpenAI-compatible API", _populate_serve),
    "generate": ("regenerate responses with the target in vLLM (resumable JSONL for drafter training)", _populate_generate),
    "train": ("train a draft head for a target with KL, TV or an LK loss, and export it for vLLM", _populate_train),
    "export": ("export the latest checkpoint of a training run as a vLLM drafter directory", _populate_export),
    "eval": ("serve target + drafter in vLLM: measured acceptance and tau beside the offline prediction", _populate_eval),
    "adapt": ("fine-tune the served drafter on captured traffic with LK, swap it in when it predicts better", _populate_adapt),
    "bench": ("benchmarks that reproduce published results with this pipeline", _populate_bench),
    "doctor": ("check that vLLM, transformers and the vllm_lk plugin work in this environment", _populate_doctor),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `vllm-lk` parser; ``only``: add the arguments of that command alone (None: of all)."""
    parser = argparse.ArgumentParser(
        prog="vllm-lk",
        description="Exact speculative decoding for vLLM, LK-loss drafter training, and an OpenAI-compatible server.",
    )
    parser.add_argument("--version", action="version", version=f"vllm-lk {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, populate) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if only is None or only == name:
            populate(command)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The command named in ``argv`` (the first word that is one), or None (e.g. ``--help``)."""
    return next((word for word in argv if word in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_command_in(argv) or "")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UserError as err:  # the user's input: one line, no traceback (anything else keeps its traceback)
        print(f"vllm-lk {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
