"""Two engine environments side by side on CPU: decode speed without speculation and with a
drafter, under setting A and setting B (environment variables of the engine processes), e.g.
vLLM-CPU's C++ RMSNorm kernels off / on (``VLLM_LK_CPU_KERNELS=0`` / ``=1``), or Intel's OpenMP
runtime preloaded (``LD_PRELOAD=.venv/lib/libiomp5.so``) against torch's bundled GNU OpenMP.

Each round is one child process per setting, in ABBA order (A, B, B, A, ...) so that a shared
machine's drift falls on both; a child starts a no-speculation engine and a drafter engine (fixed
K, async scheduling off, as `bench speed`) and decodes the same held-out code prompts at each
temperature and concurrency (``ignore_eos``). Per child: tokens/s of each, the drafter's τ (as
`bench speed`: 1 + accepted / verification steps), speedup, and c = (τ / speedup − 1) / K (the
cost of one drafted token relative to a decode step).

    .venv/bin/python benchmarks/cpu_ab.py --kind eagle3 --drafter DIR --a VLLM_LK_CPU_KERNELS=0 \
        --b VLLM_LK_CPU_KERNELS=1 [--rounds 2] [--k 4] [--prompts 4] [--concurrency 1 8] [--json FILE]

An empty setting (``--a ''``) is the environment as it is. ``LD_PRELOAD`` given here replaces
what `vllm-lk` would choose for its engines (vllm_lk.engine_env).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(spec: dict) -> dict:
    """Runs in its own process with the setting's environment, set by the parent."""
    from training.bench.speed import SpeedConfig, run_cell, start_engine
    from training.generate import EngineFields, prepare_prompts, resolve_target

    config = SpeedConfig(drafters=[spec["kind"]], ks=[spec["k"]], prompts=spec["prompts"], concurrency=spec["concurrency"])
    target = resolve_target(None)
    _, prompts = prepare_prompts(f"builtin:code:heldout:{config.prompts}:{config.seed}", target,
                                 EngineFields(max_model_len=config.max_model_len), config.max_tokens)
    engines = {"none": start_engine(config, target, None, None),
               "spec": start_engine(config, target, spec["kind"], Path(spec["drafter"]))}
    result = {}
    for llm in engines.values():
        run_cell(llm, prompts[:2], 0.0, 1, config)  # warm-up
    for temperature in spec["temperatures"]:
        for concurrency in spec["concurrency"]:
            for name, llm in engines.items():
                cell = run_cell(llm, prompts, temperature, concurrency, config)
                result[f"{name}@{temperature}@{concurrency}"] = {
                    "tokens_per_s": cell["tokens"] / cell["seconds"],
                    "tau": 1 + cell["accepted"] / cell["steps"] if cell["steps"] else None,
                }
    return result


def summarize(runs: list[dict], spec: dict) -> dict:
    """Median [min, max] per setting and cell of tokens/s, speedup and c."""
    out = {}
    for temperature in spec["temperatures"]:
        for concurrency in spec["concurrency"]:
            cell = f"{temperature}@{concurrency}"
            for setting in ("A", "B"):
                mine = [r["cells"] for r in runs if r["setting"] == setting]
                none = [c[f"none@{cell}"]["tokens_per_s"] for c in mine]
                fast = [c[f"spec@{cell}"]["tokens_per_s"] for c in mine]
                tau = [c[f"spec@{cell}"]["tau"] for c in mine]
                speedup = [s / n for s, n in zip(fast, none)]
                cost = [(t / s - 1) / spec["k"] for t, s in zip(tau, speedup)]
                out[f"T={temperature} conc={concurrency} {setting} ({spec[setting] or 'as is'})"] = {
                    name: [statistics.median(v), min(v), max(v)]
                    for name, v in (("none_tokens_per_s", none), (f"{spec['kind']}_tokens_per_s", fast),
                                    ("tau", tau), ("speedup", speedup), ("c", cost))
                }
    return out


def environment(setting: str) -> dict[str, str]:
    env = dict(os.environ)
    for item in filter(None, setting.split()):
        name, _, value = item.partition("=")
        env[name] = value
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="eagle3", help="the drafter's kind (bench speed's names)")
    parser.add_argument("--drafter", type=Path, required=True, help="an exported drafter of the toy target")
    parser.add_argument("--a", default="", help="setting A: NAME=VALUE ... for the engine processes")
    parser.add_argument("--b", default="", help="setting B")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each: A, B, B, A)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    spec = {"kind": args.kind, "drafter": str(args.drafter), "k": args.k, "prompts": args.prompts,
            "temperatures": args.temperatures, "concurrency": args.concurrency, "A": args.a, "B": args.b}
    runs = []
    for _ in range(args.rounds):
        for setting in ("A", "B", "B", "A"):
            done = subprocess.run([sys.executable, __file__, "--drafter", str(args.drafter), "--child", json.dumps(spec)],
                                  env=environment(spec[setting]), capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"setting {setting} ({spec[setting]!r}) failed:\n{done.stderr[-3000:]}")
            line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
            runs.append({"setting": setting, "cells": json.loads(line[len("RESULT "):])})
            print(setting, json.dumps(runs[-1]["cells"]), flush=True)
    report = {"spec": spec, "runs": runs, "summary": summarize(runs, spec)}
    for name, row in report["summary"].items():
        print(name, {k: f"{v[0]:.3f} [{v[1]:.3f}-{v[2]:.3f}]" for k, v in row.items()})
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
