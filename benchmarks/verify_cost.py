"""Verification and draft-sampling cost per engine step: vllm_lk vs stock vLLM 0.32 (CPU).

Times the functions the plugin replaces, on the same inputs, side by side in one process:
  verify: apply_sampling_constraints + rejection_sample (stock C++ kernels vs vllm_lk.sampling)
  draft:  the draft-token sampler (stock compute_probs_and_sample_next_token vs vllm_lk's)
Stock runs at temperature only (with top_k it crashes the engine on CPU); vllm_lk is also timed
with top-k/top-p. Drafts come from a q close to p (per-position acceptance ~0.6-0.7, printed), as
for a trained drafter. Writes JSON (--json) and prints a table.

    python benchmarks/verify_cost.py --vocab 4096 32000 --json results/verify_cost.json
    python benchmarks/verify_cost.py --vocab 128256 --batch 256 --k 5 --repeats 3 --peak-memory   # GPU-sized step

``--peak-memory`` adds, per timed function, the growth of the process's resident memory during one
call over what was resident before it (sampled every millisecond from /proc/self/statm; tensors this
large are mmap-allocated and returned on free, so each call starts from the same baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import torch


def sampling_metadata(batch: int, temperature: float, top_k: int | None, top_p: float | None, seeded: bool):
    """vLLM's SamplingMetadata for a batch at one temperature (0: all greedy)."""
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    return SamplingMetadata(
        temperature=torch.full((batch,), temperature, dtype=torch.float32),
        all_greedy=temperature == 0, all_random=temperature > 0,
        top_p=None if top_p is None else torch.full((batch,), top_p, dtype=torch.float32),
        top_k=None if top_k is None else torch.full((batch,), top_k, dtype=torch.int32),
        generators={i: torch.Generator().manual_seed(i) for i in range(batch)} if seeded else {},
        max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
        frequency_penalties=torch.zeros(batch), presence_penalties=torch.zeros(batch),
        repetition_penalties=torch.ones(batch), output_token_ids=[[] for _ in range(batch)],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors(),
    )


def median_ms(fns: dict, repeats: int) -> dict:
    """Median milliseconds of each function, calls interleaved round by round so that machine
    noise (a shared CPU) falls on every function alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * sorted(t)[len(t) // 2] for name, t in times.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_mib(fn) -> float:
    """Resident-memory growth (MiB) during one call of ``fn``, sampled every millisecond."""
    before, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_bytes()) - before if peak[0] else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 32000])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--k", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--peak-memory", action="store_true", help="also measure each function's resident-memory growth per call")
    args = parser.parse_args()

    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler as rs
    from vllm.v1.spec_decode import llm_base_proposer

    current_platform.register_triton_kernel_overrides()  # the stock CPU kernels, as in a worker
    stock = (rs.apply_sampling_constraints, rs.rejection_sample, llm_base_proposer.compute_probs_and_sample_next_token)
    from vllm_lk import patch, sampling

    torch.manual_seed(0)
    rows = []
    for vocab in args.vocab:
        for batch in args.batch:
            for k in args.k:
                n = batch * k
                target_logits = torch.randn(n, vocab) * 2
                draft_logits = torch.randn(batch, vocab)
                # a draft that is a good but imperfect guess of the target (acceptance ~0.7 per
                # position at T=0.8, as for a trained drafter), same inputs for both paths
                draft_probs = torch.softmax((target_logits + torch.randn(n, vocab)) / 0.8, -1)
                drafts = torch.multinomial(draft_probs, 1)[:, 0].to(torch.int32)
                cu = torch.arange(1, batch + 1, dtype=torch.int32) * k
                bonus = torch.randint(0, vocab, (batch, 1), dtype=torch.int64)
                plain = sampling_metadata(batch, 0.8, None, None, seeded=False)
                filtered = sampling_metadata(batch, 0.8, 50, 0.9, seeded=True)
                greedy = sampling_metadata(batch, 0.0, None, None, seeded=False)
                all_greedy = torch.ones(batch, dtype=torch.bool)
                no_draws = torch.zeros(batch, k, dtype=torch.float64)

                def verify(asc, rej, sm):
                    logits = asc(target_logits.clone(), cu, sm)
                    return rej(drafts, [k] * batch, k, cu, draft_probs, logits, bonus, sm)

                p = torch.softmax(target_logits / 0.8, -1)
                row = {"vocab": vocab, "batch": batch, "k": k,
                       "acceptance_per_position": float(torch.minimum(p, draft_probs).sum(-1).mean())}
                fns = {
                    "stock_verify_ms": lambda: verify(stock[0], stock[1], plain),
                    "lk_verify_ms": lambda: verify(patch.lk_apply_sampling_constraints, patch.lk_rejection_sample, plain),
                    "lk_verify_topk_topp_seeded_ms": lambda: verify(patch.lk_apply_sampling_constraints, patch.lk_rejection_sample, filtered),
                    # T = 0: stock, vllm_lk's greedy fast path, and the general verify() it replaced
                    "stock_verify_greedy_ms": lambda: verify(stock[0], stock[1], greedy),
                    "lk_verify_greedy_ms": lambda: verify(patch.lk_apply_sampling_constraints, patch.lk_rejection_sample, greedy),
                    "lk_verify_greedy_general_ms": lambda: sampling.verify(
                        drafts.view(batch, k), torch.full((batch,), k), None, target_logits,
                        torch.arange(n).view(batch, k), bonus[:, 0], all_greedy, no_draws, lambda needed: torch.rand(batch, dtype=torch.float64)),
                    "stock_draft_ms": lambda: stock[2](draft_logits.clone(), plain, False),
                    "lk_draft_ms": lambda: patch.draft_sample(draft_logits, plain),
                }
                row.update(median_ms(fns, args.repeats))
                if args.peak_memory:
                    row.update({name.replace("_ms", "_peak_mib"): peak_mib(fn) / 2**20 for name, fn in fns.items()})
                    row["inputs_mib"] = (target_logits.numel() + draft_probs.numel()) * 4 / 2**20
                    print("  peak MiB: " + ", ".join(f"{name} {row[name]:.0f}" for name in row if name.endswith("_peak_mib"))
                          + f" (inputs: target logits + q, {row['inputs_mib']:.0f})", flush=True)
                row["verify_ratio"] = row["lk_verify_ms"] / row["stock_verify_ms"]
                row["draft_ratio"] = row["lk_draft_ms"] / row["stock_draft_ms"]
                rows.append(row)
                print(
                    f"V={vocab:6d} B={batch:3d} K={k} a={row['acceptance_per_position']:.2f}  verify stock {row['stock_verify_ms']:7.3f} ms  "
                    f"lk {row['lk_verify_ms']:7.3f} ms ({row['verify_ratio']:.2f}x)  "
                    f"lk+topk/topp/seeds {row['lk_verify_topk_topp_seeded_ms']:7.3f} ms  |  "
                    f"T=0 stock {row['stock_verify_greedy_ms']:6.3f} lk {row['lk_verify_greedy_ms']:6.3f} "
                    f"(general path {row['lk_verify_greedy_general_ms']:6.3f}) ms  |  "
                    f"draft stock {row['stock_draft_ms']:6.3f} lk {row['lk_draft_ms']:6.3f} ({row['draft_ratio']:.2f}x)",
                    flush=True,
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
