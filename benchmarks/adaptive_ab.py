"""Adaptive speculation against fixed K, paired in time: one drafter engine (as `bench speed`
starts it), and for each temperature and concurrency the fixed K settings and the adaptive
policies back to back, in mirrored, rotating order, so each adaptive cell has every fixed K within
seconds of it and many rounds are cheap (`bench speed` also measures no speculation and every K;
on a shared 2-core machine the speed swings as much within minutes, 2026-12-07: no speculation
151-228 tok/s within one round at T = 0, concurrency 1, as the differences this asks about).

    .venv/bin/python benchmarks/adaptive_ab.py --kind mlp [--drafter DIR] [--ks 3 4 5] \
        [--temperatures 0 1] [--concurrency 1 8] [--rounds 8] [--prompts 8] \
        [--variants '{"argmax": {"switch_margin": 0}}'] [--json FILE]

Per (T, concurrency): tokens/s of each setting per round; each adaptive policy (the default and
``--variants``) over the best fixed K of the same round (the K with the highest tokens/s among
those run beside it) and over the fixed K whose median is best; median [min-max] over rounds.
Requests in flight and requests per cell as `bench speed` (``waves``). The drafter defaults to
the default recipe's build for ``kind`` (cached; built if missing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def order(settings: list, round_index: int) -> list:
    """Rounds come in mirrored pairs (A B C D, then D C B A: linear drift falls on all alike), each
    pair rotated by one more, so over 2 x len(settings) rounds every setting runs in every position."""
    shift = (round_index // 2) % len(settings)
    rotated = settings[shift:] + settings[:shift]
    return rotated[::-1] if round_index % 2 else rotated


def summarize(cells: dict[str, dict[str, list[float]]]) -> list[dict]:
    """Per cell: median tokens/s per setting, and each adaptive policy over the same round's best
    fixed K and over the fixed K with the best median (median, min, max over rounds)."""
    rows = []
    for cell, rates in cells.items():
        fixed = {name: values for name, values in rates.items() if name.startswith("K=")}
        best = max(fixed, key=lambda name: statistics.median(fixed[name]))
        rounds = len(fixed[best])
        per_round_best = [max(values[i] for values in fixed.values()) for i in range(rounds)]
        row = {"cell": cell, "tokens_per_s": {name: statistics.median(values) for name, values in rates.items()},
               "best_fixed": best, "vs_round_best": {}, "vs_best_fixed": {}}
        for name in (n for n in rates if not n.startswith("K=")):
            for key, reference in (("vs_round_best", per_round_best), ("vs_best_fixed", fixed[best])):
                ratios = [a / b for a, b in zip(rates[name], reference)]
                row[key][name] = [statistics.median(ratios), min(ratios), max(ratios)]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| T, concurrency | tok/s by setting (median) | best fixed | policy | / best fixed K | / round's best fixed K |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        rates = ", ".join(f"{name} {value:.0f}" for name, value in r["tokens_per_s"].items())
        for name in r["vs_best_fixed"]:
            a, b = r["vs_best_fixed"][name], r["vs_round_best"][name]
            lines.append(f"| {r['cell']} | {rates} | {r['best_fixed']} | {name} | {a[0]:.2f} [{a[1]:.2f}–{a[2]:.2f}] | "
                         f"{b[0]:.2f} [{b[1]:.2f}–{b[2]:.2f}] |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="mlp")
    parser.add_argument("--drafter", type=Path, default=None)
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 4, 5])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--variants", type=json.loads, default={},
                        help='more adaptive policies beside the default: JSON label -> policy settings, e.g. \'{"argmax": {"switch_margin": 0}}\'')
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from training.bench.speed import SpeedConfig, drafter_dirs, policy_settings, run_cell, set_mode, start_engine
    from training.generate import EngineFields, prepare_prompts, resolve_target

    config = SpeedConfig(drafters=[args.kind], drafter_dirs={args.kind: args.drafter} if args.drafter else {}, ks=args.ks,
                         temperatures=args.temperatures, concurrency=args.concurrency, prompts=args.prompts,
                         adaptive_variants=args.variants)
    target = resolve_target(None)
    drafter = drafter_dirs(config, target)[args.kind]
    _, prompts = prepare_prompts(f"builtin:code:heldout:{config.prompts}:{config.seed}", target,
                                 EngineFields(max_model_len=config.max_model_len), config.max_tokens)
    llm = start_engine(config, target, args.kind, drafter)
    settings = [f"K={k}" for k in args.ks] + ["adaptive"] + [f"adaptive:{label}" for label in args.variants]
    cells: dict[str, dict[str, list[float]]] = {}
    started = time.perf_counter()
    try:
        for label in (None, *args.variants):  # caches, and each policy's start-up measurement
            set_mode(llm, "adaptive", None, policy_settings(config, label))
            for temperature in args.temperatures:
                for concurrency in args.concurrency:
                    run_cell(llm, prompts, temperature, concurrency, config)
        for round_index in range(args.rounds):
            for temperature in args.temperatures:
                for concurrency in args.concurrency:
                    cell = cells.setdefault(f"T={temperature:g}, c={concurrency}", {name: [] for name in settings})
                    for name in order(settings, round_index):
                        if name.startswith("adaptive"):
                            set_mode(llm, "adaptive", None, policy_settings(config, name.partition(":")[2] or None))
                        else:
                            set_mode(llm, "fixed", int(name.removeprefix("K=")))
                        result = run_cell(llm, prompts, temperature, concurrency, config)
                        cell[name].append(result["tokens"] / result["seconds"])
            print(f"round {round_index + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s)", flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()
    rows = summarize(cells)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"drafter": str(drafter), "json": str(args.json)},
                                         "cells": cells, "rows": rows,
                                         "seconds": time.perf_counter() - started}, indent=2) + "\n")


if __name__ == "__main__":
    main()
