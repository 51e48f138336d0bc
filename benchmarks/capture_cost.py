"""What traffic capture (`vllm-lk serve --capture DIR`) costs in throughput.

One engine, two apps over it on 127.0.0.1 (uvicorn, one event loop): one with capture on (every
request, a temporary directory), one without. Streaming clients drive them in alternating rounds
(off, on, off, on, ...) so that drift on a shared machine hits both alike; reported per pair of
rounds is tokens/s with capture over tokens/s without, with the median and range over pairs.

    .venv/bin/python benchmarks/capture_cost.py [--target DIR] [--drafter DIR] [--rounds 6] [--seconds 15] \
        [--clients 8] [--json benchmarks/results/capture_cost.json]

Without --target: the toy target with its default drafter (both from the cache; built if missing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["def main(", "import os\n", "class Stack:\n    ", "# read a file\n", "for i in range(", "with open("]


def start_app(loop, app) -> str:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    asyncio.run_coroutine_threadsafe(server.serve(sockets=[sock]), loop)
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def load(base: str, model: str, clients: int, seconds: float, seed: int) -> dict:
    """Clients streaming completions without pause for ``seconds``; tokens/s and failures."""
    deadline = time.monotonic() + seconds
    totals = {"tokens": 0, "requests": 0, "failed": 0}

    async def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            while time.monotonic() < deadline:
                body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(32, 96),
                        "temperature": 1.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                try:
                    async with http.stream("POST", "/v1/completions", json=body) as response:
                        usage = None
                        async for line in response.aiter_lines():
                            if line.startswith("data: {"):
                                usage = json.loads(line[6:]).get("usage") or usage
                    totals["tokens"] += usage["completion_tokens"]
                    totals["requests"] += 1
                except Exception:  # noqa: BLE001 - counted
                    totals["failed"] += 1

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    totals["tokens_per_s"] = totals["tokens"] / (time.monotonic() - started)
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, default=None)
    parser.add_argument("--drafter", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=6, help="rounds per setting (alternating)")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per round")
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from server.app import create_app
    from server.config import ServerConfig
    from server.engine import build_engine, resolve_spec
    from server.runner import resolve_defaults

    base_config = resolve_defaults(ServerConfig(target=args.target, drafter=args.drafter, served_model_name="bench"))
    spec = resolve_spec(base_config)
    engine = build_engine(base_config, spec)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as capture_dir:
        captured = base_config.model_copy(update={"capture_dir": Path(capture_dir)})
        bases = {"off": start_app(loop, create_app(base_config, engine, spec=spec)),
                 "on": start_app(loop, create_app(captured, engine, spec=spec))}
        asyncio.run(load(bases["off"], "bench", args.clients, 5.0, seed=99))  # warm-up
        rounds = []
        for index in range(args.rounds):
            for setting in (("off", "on") if index % 2 == 0 else ("on", "off")):  # ABBA: neither always goes first
                result = asyncio.run(load(bases[setting], "bench", args.clients, args.seconds, seed=index))
                rounds.append({"round": index, "capture": setting, **result})
                print(f"round {index} capture {setting:3}: {result['tokens_per_s']:.1f} tok/s, "
                      f"{result['requests']} requests, {result['failed']} failed", flush=True)
        captured_bytes = sum(f.stat().st_size for f in Path(capture_dir).glob("*.jsonl"))
    engine.shutdown()
    by_round = {(r["round"], r["capture"]): r["tokens_per_s"] for r in rounds}
    ratios = [by_round[(i, "on")] / by_round[(i, "off")] for i in range(args.rounds)]
    summary = {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
               "ratios": ratios, "failed": sum(r["failed"] for r in rounds), "captured_bytes": captured_bytes}
    record = {"rounds": rounds, "summary": summary, "target": str(base_config.target), "drafter": spec.drafter,
              "clients": args.clients, "seconds": args.seconds, "machine": platform.platform()}
    print(f"capture on / off tokens/s: median {summary['ratio_median']:.3f} "
          f"[{summary['ratio_min']:.3f}-{summary['ratio_max']:.3f}] over {len(ratios)} pairs; "
          f"{summary['failed']} failed requests; {captured_bytes / 2**20:.1f} MiB captured")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
