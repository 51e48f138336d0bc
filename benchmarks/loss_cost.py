"""Loss cost: forward + backward time and peak memory of each training loss, same inputs.

Each loss runs in its own subprocess so its peak resident memory (ru_maxrss) is its own; the
eager reference (whole-batch softmaxes, autograd through torch.minimum) is timed beside the
chunked implementation. Prints a table; --json writes the numbers.

    python benchmarks/loss_cost.py --tokens 4096 --vocab 4096 32000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

KINDS = ["kl", "tv", "lk-hybrid", "lk-alpha"]


def measure(kind: str, impl: str, tokens: int, vocab: int, repeats: int) -> dict:
    import torch

    from training import losses, losses_reference

    fn = losses.draft_loss if impl == "chunked" else losses_reference.draft_loss
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(tokens, vocab, generator=gen) * 2
    draft = (target + torch.randn(tokens, vocab, generator=gen)).requires_grad_(True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats + 1):
        draft.grad = None
        start = time.perf_counter()
        loss, _, _ = fn(draft, target, kind)
        loss.backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": kind, "impl": impl, "tokens": tokens, "vocab": vocab,
            "ms": 1000 * sorted(times[1:])[len(times[1:]) // 2], "peak_extra_mib": (peak - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 32000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--one", nargs=2, metavar=("KIND", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument("--one-vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.tokens, args.one_vocab, args.repeats)))
        return
    rows = []
    for vocab in args.vocab:
        for impl in ("chunked", "eager"):
            for kind in KINDS:
                out = subprocess.run(
                    [sys.executable, __file__, "--one", kind, impl, "--one-vocab", str(vocab),
                     "--tokens", str(args.tokens), "--repeats", str(args.repeats)],
                    capture_output=True, text=True, check=True,
                )
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"V={vocab:6d} N={args.tokens} {impl:7s} {kind:9s} {row['ms']:8.1f} ms  peak +{row['peak_extra_mib']:7.1f} MiB", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
