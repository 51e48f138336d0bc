"""The adaptive policy's own cost per engine step (vllm_lk.adaptive, pure numpy, no engine):
plan, the draft passes up to the cap, lengths, the verification update and the cost update for a
batch of ``--batch`` requests, K = ``--k``, confidences not read (the cap-only default).

    .venv/bin/python benchmarks/policy_cost.py [--batch 1] [--k 4] [--steps 3000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from vllm_lk import adaptive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    policy = adaptive.Policy(max_k=args.k, kind="sequential")
    req_ids = [f"r{i}" for i in range(args.batch)]
    greedy = np.zeros(args.batch, dtype=bool)
    unknown = np.full((args.batch, args.k), np.nan)
    counts = np.full(args.batch, args.k)
    rng = np.random.default_rng(0)

    def step() -> None:
        plan = policy.plan(req_ids, greedy)
        for _ in range(plan.k):
            if not policy.add_pass(None):
                break
        policy.lengths()
        policy.confidences()
        policy.observe_verifications(req_ids, unknown, counts, rng.integers(0, args.k + 1, size=args.batch), greedy)
        policy.observe_step(args.batch, plan.k, plan.k * args.batch, 0.007, 3 * args.batch, k=plan.k)

    for _ in range(300):  # past the start-up steps
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    print(f"policy cost: {(time.perf_counter() - started) / args.steps * 1e6:.1f} us a step "
          f"(batch {args.batch}, K {args.k}, {args.steps} steps)")


if __name__ == "__main__":
    main()
