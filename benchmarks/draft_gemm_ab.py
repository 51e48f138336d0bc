"""A KV drafter's CPU GEMMs in bf16 against fp32 (vllm_lk.cpu_draft), paired in one engine.

`benchmarks/cpu_ab.py` compares the two settings across processes, where this machine's decode
speed moved by up to 2x between processes (its no-speculation engine: 100-189 tok/s in one run).
Here one in-process engine keeps both GEMM copies of every drafter layer (this benchmark's own
dispatch, not the plugin's: the plugin keeps only one) and switches between them at runtime, so
the two settings alternate within seconds (ABBA rounds) on the same engine, KV cache and prompts.
Reports the drafter engine's tokens/s per setting and the per-round ratio bf16 / fp32; with τ
unchanged that ratio is (1 + K c_fp32) / (1 + K c_bf16).

    .venv/bin/python benchmarks/draft_gemm_ab.py --drafter DIR [--kind eagle3] [--k 4] [--rounds 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
KINDS = ("eagle3", "draft-model")  # bench speed's names of the KV drafters it builds


def keep_both_copies(state: dict) -> None:
    """Make each KV drafter layer hold an fp32 and a bf16 GEMM; ``state["bf16"]`` picks one."""
    import torch
    from vllm.model_executor.layers import utils

    from vllm_lk import cpu_draft

    plugin_dispatch = utils.dispatch_cpu_unquantized_gemm  # the plugin's (packs drafters as bf16)
    vllm_dispatch = plugin_dispatch.__wrapped__

    def dispatch(layer, remove_weight):
        if not cpu_draft._loading or layer.weight.dim() != 2:
            return vllm_dispatch(layer, remove_weight)
        fp32 = torch.nn.Module()
        fp32.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        vllm_dispatch(fp32, remove_weight=False)
        plugin_dispatch(layer, remove_weight)
        bf16_linear = layer.cpu_linear
        layer.cpu_linear = lambda x, w, b: bf16_linear(x, w, b) if state["bf16"] else fp32.cpu_linear(x, fp32.weight, b)

    utils.dispatch_cpu_unquantized_gemm = dispatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafter", type=Path, required=True, help="an exported KV drafter of the toy target")
    parser.add_argument("--kind", default="eagle3", choices=KINDS)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8, help="ABBA rounds (each: both settings at each temperature)")
    parser.add_argument("--prompts", type=int, default=4, help="held-out code prompts x 128 tokens per cell")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.pop("VLLM_LK_CPU_BF16_HEADS", None)
    from vllm_lk import cpu_draft
    from vllm_lk.plugin import register

    register()
    if not cpu_draft.enabled():
        raise SystemExit("bf16 draft GEMMs do not apply here (a CPU with AVX512-BF16 is needed)")
    state = {"bf16": True}
    keep_both_copies(state)
    from training.bench.speed import SpeedConfig, run_cell, start_engine
    from training.generate import EngineFields, prepare_prompts, resolve_target

    config = SpeedConfig(drafters=[args.kind], ks=[args.k], prompts=args.prompts, concurrency=[1])
    target = resolve_target(None)
    _, prompts = prepare_prompts(f"builtin:code:heldout:{args.prompts}:0", target,
                                 EngineFields(max_model_len=config.max_model_len), config.max_tokens)
    llm = start_engine(config, target, args.kind, args.drafter)  # in this process (see above)
    temperatures = (0.0, 1.0)
    for temperature in temperatures:  # warm-up
        run_cell(llm, prompts[:2], temperature, 1, config)
    cells: dict[str, list[float]] = {}
    taus: dict[str, list[float]] = {}
    started = time.perf_counter()
    for r in range(args.rounds):
        for setting in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
            state["bf16"] = setting == "bf16"
            for temperature in temperatures:
                cell = run_cell(llm, prompts, temperature, 1, config)
                cells.setdefault(f"{setting}@{temperature}", []).append(cell["tokens"] / cell["seconds"])
                taus.setdefault(f"{setting}@{temperature}", []).append(1 + cell["accepted"] / max(cell["steps"], 1))
    summary = {}
    for temperature in temperatures:
        fp32, bf16 = cells[f"fp32@{temperature}"], cells[f"bf16@{temperature}"]
        ratios = [b / a for a, b in zip(fp32, bf16)]
        summary[f"T={temperature}"] = {
            "fp32_tokens_per_s": statistics.median(fp32), "bf16_tokens_per_s": statistics.median(bf16),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "rounds_bf16_faster": sum(x > 1 for x in ratios),
            "tau_fp32": statistics.median(taus[f"fp32@{temperature}"]), "tau_bf16": statistics.median(taus[f"bf16@{temperature}"]),
        }
        print(f"T={temperature}: fp32 {summary[f'T={temperature}']['fp32_tokens_per_s']:.0f} tok/s, bf16 "
              f"{summary[f'T={temperature}']['bf16_tokens_per_s']:.0f} tok/s; bf16/fp32 per round "
              f"{statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}], faster in "
              f"{sum(x > 1 for x in ratios)}/{len(ratios)} rounds")
    if args.json:
        report = {"drafter": str(args.drafter), "kind": args.kind, "k": args.k, "rounds": args.rounds,
                  "prompts": args.prompts, "max_tokens": config.max_tokens, "concurrency": 1, "summary": summary, "cells": cells,
                  "seconds": time.perf_counter() - started}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
