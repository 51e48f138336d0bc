"""What vLLM-CPU's C++ RMSNorm kernels (vllm_lk.cpu_kernels) change: decode speed without
speculation and with EAGLE-3, the norms native (``VLLM_LK_CPU_KERNELS=0``, the old path) or on the
C++ kernels, side by side.

Each round is one child process per setting, in ABBA order (off, on, on, off, ...) so that a shared
machine's drift falls on both; a child starts a no-speculation engine and an EAGLE-3 engine (fixed
K, async scheduling off, as `bench speed`) and decodes the same held-out code prompts at each
temperature (concurrency 1, ``ignore_eos``). Per child: tokens/s of each, EAGLE-3's τ, speedup,
and c = (τ / speedup − 1) / K (the cost of one drafted token relative to a decode step).

    .venv/bin/python benchmarks/cpu_norm_cost.py --drafter DIR [--rounds 2] [--k 4] [--prompts 4] \
        [--json benchmarks/results/cpu_norm_cost.json]
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
    """Runs in its own process with VLLM_LK_CPU_KERNELS set by the parent."""
    from training.bench.speed import SpeedConfig, run_cell, start_engine
    from training.generate import EngineFields, prepare_prompts, resolve_target

    config = SpeedConfig(drafters=["eagle3"], ks=[spec["k"]], prompts=spec["prompts"], concurrency=[1])
    target = resolve_target(None)
    _, prompts = prepare_prompts(f"builtin:code:heldout:{config.prompts}:{config.seed}", target,
                                 EngineFields(max_model_len=config.max_model_len), config.max_tokens)
    engines = {"none": start_engine(config, target, None, None),
               "eagle3": start_engine(config, target, "eagle3", Path(spec["drafter"]))}
    result = {}
    for llm in engines.values():
        run_cell(llm, prompts[:2], 0.0, 1, config)  # warm-up
    for temperature in spec["temperatures"]:
        for name, llm in engines.items():
            cell = run_cell(llm, prompts, temperature, 1, config)
            result[f"{name}@{temperature}"] = {
                "tokens_per_s": cell["tokens"] / cell["seconds"],
                # as bench speed: tokens per verification step (the prefill's token is not one)
                "tau": 1 + cell["accepted"] / cell["steps"] if cell["steps"] else None,
            }
    return result


def summarize(runs: list[dict], k: int, temperatures: list[float]) -> dict:
    """Median [min, max] per setting of tokens/s, speedup and c; and the on/off ratio per pair."""
    out = {}
    for temperature in temperatures:
        for kernels in ("off", "on"):
            mine = [r["cells"] for r in runs if r["kernels"] == kernels]
            none = [c[f"none@{temperature}"]["tokens_per_s"] for c in mine]
            spec = [c[f"eagle3@{temperature}"]["tokens_per_s"] for c in mine]
            tau = [c[f"eagle3@{temperature}"]["tau"] for c in mine]
            speedup = [s / n for s, n in zip(spec, none)]
            cost = [(t / s - 1) / k for t, s in zip(tau, speedup)]
            out[f"T={temperature} kernels {kernels}"] = {
                name: [statistics.median(v), min(v), max(v)]
                for name, v in (("none_tokens_per_s", none), ("eagle3_tokens_per_s", spec),
                                ("tau", tau), ("speedup", speedup), ("c", cost))
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafter", type=Path, required=True, help="an exported EAGLE-3 drafter of the toy target")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each: off, on, on, off)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    spec = {"drafter": str(args.drafter), "k": args.k, "prompts": args.prompts, "temperatures": args.temperatures}
    runs = []
    for _ in range(args.rounds):
        for kernels in ("off", "on", "on", "off"):
            env = dict(os.environ, VLLM_LK_CPU_KERNELS="1" if kernels == "on" else "0")
            done = subprocess.run([sys.executable, __file__, "--drafter", str(args.drafter), "--child", json.dumps(spec)],
                                  env=env, capture_output=True, text=True, check=True)
            line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
            runs.append({"kernels": kernels, "cells": json.loads(line[len("RESULT "):])})
            print(kernels, json.dumps(runs[-1]["cells"]), flush=True)
    report = {"spec": spec, "runs": runs, "summary": summarize(runs, args.k, args.temperatures)}
    for name, row in report["summary"].items():
        print(name, {k: f"{v[0]:.3f} [{v[1]:.3f}-{v[2]:.3f}]" for k, v in row.items()})
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
