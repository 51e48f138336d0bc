"""Train-step cost of each loss, per drafter, side by side in one process.

For every drafter kind, one drafter per loss is built from the same seed; each timed round runs
one full optimizer step (frozen-target forward, drafter forward, loss, backward, AdamW) for every
loss on the same batch, in rotating order, so machine noise hits all losses alike. Reports the
median step time, the ratio to KL and training tokens/s. Default target: the embedded toy target
(built on first use); batches are stdlib source windows tokenized by the target's tokenizer.

    python benchmarks/train_step.py --json benchmarks/results/train_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from training.data import Example, collate
from training.drafters import build_drafter
from training.target import load_target, run_target
from training.toy import corpus
from training.train_config import TrainConfig
from training.trainer import drafter_losses, make_optimizer
from training.vocab import token_frequencies

LOSSES = ["kl", "lk-hybrid", "lk-alpha"]
DRAFTERS = ["eagle3", "medusa", "mlp", "draft-model"]


def batches(tokenizer, batch_size: int, seq_len: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Windows of stdlib sources: the first quarter is prompt, the rest is trained."""
    sources, _ = corpus.split_sources(corpus.read_sources(), 20)
    examples = []
    for source in sources:
        ids = tokenizer(source.text, add_special_tokens=False)["input_ids"][:seq_len]
        if len(ids) == seq_len:
            examples.append(Example(line=len(examples), token_ids=tuple(ids), response_start=seq_len // 4))
        if len(examples) == batch_size * count:
            break
    return [collate(examples[i : i + batch_size], seq_len, 0) for i in range(0, len(examples), batch_size)]


def bench_drafter(kind: str, target_model, data, args) -> list[dict]:
    runs = {}
    vocab = args.draft_vocab if kind in ("eagle3", "medusa") else None
    counts = token_frequencies((ids[m].tolist() for ids, m in data), target_model.config.vocab_size)
    for loss in args.losses:
        config = TrainConfig(drafter=kind, loss=loss, num_heads=args.heads, batch_size=args.batch_size, seq_len=args.seq_len, draft_vocab_size=vocab)
        torch.manual_seed(0)
        drafter = build_drafter(config, target_model, counts)
        runs[loss] = (config, drafter, make_optimizer(drafter, config), [])
    for rnd in range(args.rounds + 1):
        ids, mask = data[rnd % len(data)]
        order = args.losses[rnd % len(args.losses):] + args.losses[: rnd % len(args.losses)]
        for loss in order:
            config, drafter, optimizer, times = runs[loss]
            start = time.perf_counter()
            value, _, _ = drafter_losses(drafter, run_target(target_model, ids, mask, drafter.hidden_layers), config, None)
            value.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if rnd:  # round 0 warms up
                times.append(time.perf_counter() - start)
    kl_ms = 1000 * statistics.median(runs["kl"][3]) if "kl" in runs else None
    rows = []
    for loss, (_, drafter, _, times) in runs.items():
        ms = 1000 * statistics.median(times)
        rows.append({
            "drafter": kind, "loss": loss, "ms_per_step": ms, "vs_kl": ms / kl_ms if kl_ms else None,
            "tokens_per_s": args.batch_size * args.seq_len / (ms / 1000),
            "trainable_params": sum(p.numel() for p in drafter.parameters() if p.requires_grad),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=None, help="target directory (default: the toy target)")
    parser.add_argument("--drafters", nargs="+", default=DRAFTERS, choices=DRAFTERS)
    parser.add_argument("--losses", nargs="+", default=LOSSES)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--draft-vocab", type=int, default=None, help="EAGLE-3 and MEDUSA draft vocabulary size")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.target is None:
        from training.toy.target import ToyTargetConfig, build_toy_target

        args.target = Path(build_toy_target(ToyTargetConfig())["path"])
    target_model, tokenizer = load_target(args.target)
    data = batches(tokenizer, args.batch_size, args.seq_len, count=4)
    rows = [row for kind in args.drafters for row in bench_drafter(kind, target_model, data, args)]
    print(f"{'drafter':<12} {'loss':<10} {'ms/step':>9} {'vs KL':>7} {'tokens/s':>9} {'params':>10}")
    for r in rows:
        print(f"{r['drafter']:<12} {r['loss']:<10} {r['ms_per_step']:>9.1f} {r['vs_kl']:>7.3f} {r['tokens_per_s']:>9.0f} {r['trainable_params']:>10,}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"target": str(args.target), "batch_size": args.batch_size, "seq_len": args.seq_len, "heads": args.heads, "rounds": args.rounds, "threads": torch.get_num_threads()}
        args.json.write_text(json.dumps({"config": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
