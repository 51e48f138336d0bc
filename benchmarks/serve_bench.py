"""Our server against vLLM's own OpenAI server: same engine configuration, same load, one run.

Both servers are started (ours: `vllm-lk serve`; vLLM's: ``python -m
vllm.entrypoints.openai.api_server``, as `vllm serve` is on a GPU build) over the same target,
drafter and engine flags, and vLLM's serving benchmark (``vllm.benchmarks.serve``, what `vllm
bench serve` runs) drives each with the random dataset through the streaming completions API, in
alternating rounds so that drift in a shared machine's load hits both alike. Reported: request
throughput and median TPOT of each, and the ratios (ours / vLLM for throughput, vLLM / ours for
TPOT: 1.0 = parity, above = ours faster).

    .venv/bin/python benchmarks/serve_bench.py --target DIR --drafter DIR [--rounds 3] \
        [--json benchmarks/results/serve_bench.json] [-- --max-model-len 512 ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.launch import vllm_command  # noqa: E402
from vllm_lk.engine_defaults import on_gpu  # noqa: E402

logger = logging.getLogger("serve_bench")
NAME = "bench"
KEYS = ("request_throughput", "output_throughput", "median_tpot_ms", "mean_tpot_ms", "median_ttft_ms",
        "median_itl_ms", "completed", "failed", "spec_decode_acceptance_length", "spec_decode_acceptance_rate")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; log tail:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def run_benchmark(base_url: str, target: Path, args: argparse.Namespace, seed: int) -> dict:
    """One run of vLLM's serving benchmark (in this process) against ``base_url``."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    bench_args = parser.parse_args([
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
        "--model", str(target), "--served-model-name", NAME, "--tokenizer", str(target),
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
        "--max-concurrency", str(args.max_concurrency), "--request-rate", "inf", "--ignore-eos",
        "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm",
    ])
    result = main(bench_args)
    return {key: result.get(key) for key in KEYS}


def cpu_seconds(proc: subprocess.Popen) -> dict[str, float]:
    """CPU time of a server: its front-end process, and its children (engine core, workers)."""
    import psutil

    front = psutil.Process(proc.pid)
    children = 0.0
    for child in front.children(recursive=True):
        try:
            times = child.cpu_times()
            children += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    times = front.cpu_times()
    return {"front_end": times.user + times.system, "engine": children}


def engine_flags(args: argparse.Namespace) -> list[str]:
    return [a for a in args.engine_args if a != "--"]


def server_commands(args: argparse.Namespace, ports: dict[str, int]) -> dict[str, list[str]]:
    spec = {"method": args.method, "model": str(args.drafter), "num_speculative_tokens": args.k}
    ours = [sys.executable, "-m", "server.cli", "serve", "--target", str(args.target), "--port", str(ports["ours"]),
            "--served-model-name", NAME]
    theirs_extra = [*engine_flags(args), "--disable-uvicorn-access-log", *shlex.split(args.vllm_only_args)]
    if args.drafter:
        ours += ["--drafter", str(args.drafter), "--method", args.method, "--num-speculative-tokens", str(args.k)]
        theirs_extra += ["--speculative-config", json.dumps(spec)]
    else:
        ours += ["--no-default-drafter"]
    ours += ["--", *engine_flags(args)]
    theirs = vllm_command(args.target, "127.0.0.1", ports["vllm"], NAME, theirs_extra, on_gpu=on_gpu())
    return {"ours": ours, "vllm": theirs}


def summarize(runs: dict[str, list[dict]]) -> dict:
    med = {name: {key: statistics.median(r[key] for r in rs if r.get(key) is not None)
                  for key in ("request_throughput", "output_throughput", "median_tpot_ms", "median_ttft_ms")}
           for name, rs in runs.items()}
    paired = [  # round by round: the two runs of a round saw the most similar machine load
        {"request_throughput_ratio": o["request_throughput"] / v["request_throughput"],
         "median_tpot_ratio": v["median_tpot_ms"] / o["median_tpot_ms"]}
        for o, v in zip(runs["ours"], runs["vllm"])
    ]
    return {
        "median_of_rounds": med,
        "per_round_ratios": paired,
        "request_throughput_ratio": med["ours"]["request_throughput"] / med["vllm"]["request_throughput"],
        "median_tpot_ratio": med["vllm"]["median_tpot_ms"] / med["ours"]["median_tpot_ms"],
        "failed_requests": {name: sum(r.get("failed") or 0 for r in rs) for name, rs in runs.items()},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, required=True, help="HF target directory")
    parser.add_argument("--drafter", type=Path, default=None, help="drafter directory (omit: no speculation)")
    parser.add_argument("--method", default="draft_model", help="vLLM speculative method")
    parser.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per server")
    parser.add_argument("--vllm-only-args", default="", help="extra flags for vLLM's server only (e.g. to test a hypothesis)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/serve_bench.json")
    parser.add_argument("engine_args", nargs=argparse.REMAINDER, help="-- then vLLM engine flags for both servers")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    ports = {"ours": free_port(), "vllm": free_port()}
    commands = server_commands(args, ports)
    log_dir = Path(tempfile.mkdtemp(prefix="serve_bench-"))
    logs = {name: log_dir / f"{name}.log" for name in commands}
    logger.info("server logs in %s", log_dir)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    procs = {}
    try:
        for name, command in commands.items():  # one at a time: two engines starting at once thrash 2 cores
            logger.info("starting %s: %s", name, " ".join(command))
            procs[name] = start(command, logs[name])
            wait_ready(procs[name], f"http://127.0.0.1:{ports[name]}/{'ready' if name == 'ours' else 'health'}", logs[name])
        runs: dict[str, list[dict]] = {"ours": [], "vllm": []}
        for name in commands:  # warm-up, not recorded
            run_benchmark(f"http://127.0.0.1:{ports[name]}", args.target, _warmup(args), seed=99)
        for round_index in range(args.rounds):
            order = ["ours", "vllm"] if round_index % 2 == 0 else ["vllm", "ours"]
            for name in order:
                before = cpu_seconds(procs[name])
                result = run_benchmark(f"http://127.0.0.1:{ports[name]}", args.target, args, seed=round_index)
                after = cpu_seconds(procs[name])
                result["cpu_seconds"] = {key: after[key] - before[key] for key in after}
                logger.info("round %d %s: %s", round_index, name, result)
                runs[name].append(result)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    report = {
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "commands": commands, "runs": runs, **summarize(runs),
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("request throughput ratio %.3f, median TPOT ratio %.3f -> %s",
                report["request_throughput_ratio"], report["median_tpot_ratio"], args.json)
    return report


def _warmup(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "num_prompts": max(args.max_concurrency, 8), "output_len": 16})


if __name__ == "__main__":
    main()
