"""Peak memory and tokens/s of one training step at Llama-3.1-8B shapes, scaled to this machine.

The target is a random Llama with Llama-3.1-8B's vocabulary (128256), width (hidden 4096,
intermediate 14336, 32 heads / 8 kv heads, head_dim 128, llama3 rope) and 2 decoder layers
instead of 32 (4 for EAGLE-3, which fuses three distinct aux layers), built by this script. Each drafter is trained by the trainer's own step
(``training.trainer._train_step``: frozen-target forward, drafter forward, loss, backward, clip,
AdamW) on random token sequences (batch 1, every row after the first quarter trained) at
T = 512, 1024, 2048, in two versions:

- ``new``: the trainer as it is (bf16 target, target and draft logits computed per chunk inside
  the losses, EAGLE-3 TTT attention through SDPA);
- ``baseline``: the step as issue 14 found it: the target's [B, T, V] and every head's [N, Vd]
  logits materialised, EAGLE-3 attention with [B, h, T, T] fp32 scores (``ttt_attention_eager``),
  everything else equal. The target is bf16 in both: the old trainer's fp32 target (2 more bytes
  per target parameter, 3.8 GB here) would not leave the baseline room in 24 GiB;
- ``checkpointed`` (``--checkpointed``): ``new`` with ``--activation-checkpointing true``;
- ``full-vocab-target`` (``--full-vocab-target``): ``new`` with the target side of a truncated draft
  vocabulary computed over the whole vocabulary in the loss's forward and backward (the path before
  ``training.losses.restrict_to_draft_vocab``; LK-hybrid and KL, for the time side by side).

Drafter sizes are scaled to a 24 GiB machine (fp32 AdamW state is 16 bytes a parameter): EAGLE-3
and MEDUSA with a 32000-token draft vocabulary (what public Llama-3 EAGLE-3 heads use), the MLP
speculator tied (fms-extras tie_weights) with inner width 1024, the draft model 1024 wide with 1
layer; 3 heads / TTT steps / stages. The drafter computes under bf16 autocast in both versions.

Peak memory is the process's peak resident set (VmHWM, reset through /proc/self/clear_refs
before each measured step, after malloc_trim) in MiB: weights, optimizer state and the step's
temporaries, what an OOM killer sees. ``step_mib`` is the part above the resident set before
the step. Each (drafter, version, vocabulary) runs in its own process, lengths ascending; a fit
peak = a + b T per series gives b, the memory one more token of sequence costs. Run at 128256
and at 32000 target tokens, b shows whether the slope still grows with the vocabulary.

    python benchmarks/train_memory.py --json benchmarks/results/train_memory.json

Threads are pinned (``--threads``, default 2) and reported; tokens/s on shared CPUs moves by
~10 %: compare losses measured in the same process (LK-hybrid and KL steps alternate).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

LLAMA_8B = {
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 2, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}
# the shapes the test runs at (same code paths, seconds instead of minutes)
TINY = {**LLAMA_8B, "vocab_size": 3000, "hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "num_hidden_layers": 4}
DRAFTERS = {
    "eagle3": {"draft_vocab_size": 32000},
    "medusa": {"draft_vocab_size": 32000},
    "mlp": {"mlp_inner_dim": 1024, "mlp_tie_weights": True},
    "draft-model": {"draft_hidden_size": 1024},
}
VERSIONS = {
    "new": {"target_dtype": "bf16"},
    "baseline": {"target_dtype": "bf16", "materialise_target_logits": True, "materialise_draft_logits": True},
    "checkpointed": {"target_dtype": "bf16", "activation_checkpointing": True},
    "full-vocab-target": {"target_dtype": "bf16"},
}
MIB = 1 << 20


def memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Give freed heap back to the OS, reset the peak resident set to the current one; returns it (KiB)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return memory_kib("VmRSS")


def build_target(shape: dict, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    return model.eval().requires_grad_(False)


def random_examples(count: int, length: int, vocab: int, seed: int):
    import torch

    from training.data import Example

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (count, length), generator=gen)
    return [Example(line=i, token_ids=tuple(row.tolist()), response_start=length // 4) for i, row in enumerate(ids)]


def worker(case: dict) -> None:
    """One (drafter, version, vocabulary): every length ascending, every loss alternating; one
    JSON row per (length, loss) on stdout."""
    import torch

    from training.drafters import build_drafter, eagle3
    from training.parallel import Dist
    from training.train_config import TrainConfig
    from training.trainer import _train_step, autocast_dtype, make_optimizer, target_dtype
    from training.vocab import token_frequencies

    torch.set_num_threads(case["threads"])
    version = VERSIONS[case["version"]]
    if case["version"] == "baseline":  # the [B, h, T, T] fp32-score attention the trainer had
        eagle3.ttt_attention = eagle3.ttt_attention_eager
    if case["version"] == "full-vocab-target":  # what the trainer's multi_head_loss call then defaults to
        from training import losses

        losses.multi_head_loss.__kwdefaults__["restrict_target"] = False
    shape = {**(TINY if case["tiny"] else LLAMA_8B), "vocab_size": case["vocab"]}
    if case["drafter"] == "eagle3":  # three distinct aux layers need four decoder layers (ids 1, 2, 3)
        shape["num_hidden_layers"] = max(shape["num_hidden_layers"], 4)
    options = {k: v for k, v in DRAFTERS[case["drafter"]].items() if not (case["tiny"] and k != "mlp_tie_weights")}
    device = torch.device("cpu")
    config = TrainConfig(drafter=case["drafter"], loss=case["losses"][0], num_heads=3, batch_size=case["batch_size"],
                         seq_len=max(case["seq_lens"]), precision="bf16", warmup_steps=0, **options, **version)
    target = build_target(shape, target_dtype(config.target_dtype, device))
    data = {t: random_examples(case["batch_size"], t, shape["vocab_size"], seed=t) for t in case["seq_lens"]}
    counts = token_frequencies((e.token_ids for e in data[max(data)]), shape["vocab_size"])
    torch.manual_seed(0)
    drafter = build_drafter(config, target, counts)
    drafter.set_activation_checkpointing(config.activation_checkpointing)  # as trainer._train does
    optimizer = make_optimizer(drafter, config)
    params = sum(p.numel() for p in drafter.parameters() if p.requires_grad)
    precision = autocast_dtype(config.precision, device)
    for seq_len in sorted(case["seq_lens"]):
        measured = {loss: [] for loss in case["losses"]}
        for step in range(1 + case["steps"]):  # step 0 warms up (first AdamW state, kernels)
            for loss in case["losses"][step % len(case["losses"]):] + case["losses"][: step % len(case["losses"])]:
                cfg = config.model_copy(update={"loss": loss, "seq_len": seq_len})
                before = reset_peak()
                record = _train_step(step, drafter, target, optimizer, data[seq_len], cfg, Dist(), 0, precision, device)
                peak = memory_kib("VmHWM")
                if step:
                    measured[loss].append((peak, before, record["seconds"], record["tokens"]))
        for loss, runs in measured.items():
            row = {
                "drafter": case["drafter"], "version": case["version"], "loss": loss, "vocab_size": shape["vocab_size"],
                "seq_len": seq_len, "batch_size": case["batch_size"],
                "peak_mib": max(r[0] for r in runs) / 1024, "step_mib": max(r[0] - r[1] for r in runs) / 1024,
                "tokens_per_s": statistics.median(r[3] / r[2] for r in runs), "seconds": [r[2] for r in runs],
                "trainable_params": params, "target_layers": shape["num_hidden_layers"], "threads": case["threads"],
            }
            print(json.dumps(row), flush=True)
            print(f"{case['drafter']}/{case['version']}/{shape['vocab_size']} T={seq_len} {loss}: "
                  f"peak {row['peak_mib']:.0f} MiB, {row['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)


def fit(rows: list[dict]) -> dict:
    """Least-squares peak = a + b T over one series' lengths (MiB, MiB per token)."""
    xs, ys = [r["seq_len"] for r in rows], [r["peak_mib"] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"a_mib": my - b * mx, "b_mib_per_token": b}


def cases(args) -> list[dict]:
    """Per drafter: new (LK-hybrid and KL alternating: the time ratio), baseline and the smaller
    vocabularies (one measured step each: memory is the point there)."""
    common = {"seq_lens": args.seq_lens, "batch_size": args.batch_size, "threads": args.threads, "tiny": args.tiny}
    big = (TINY if args.tiny else LLAMA_8B)["vocab_size"]
    out = []
    for drafter in args.drafters:
        out.append({**common, "drafter": drafter, "version": "new", "vocab": big, "losses": ["lk-hybrid", "kl"], "steps": args.steps})
        out.append({**common, "drafter": drafter, "version": "baseline", "vocab": big, "losses": ["lk-hybrid"], "steps": 1})
        if args.checkpointed:
            out.append({**common, "drafter": drafter, "version": "checkpointed", "vocab": big, "losses": ["lk-hybrid"], "steps": 1})
        if args.full_vocab_target and drafter in ("eagle3", "medusa"):  # the truncated draft vocabularies
            out.append({**common, "drafter": drafter, "version": "full-vocab-target", "vocab": big, "losses": ["lk-hybrid", "kl"],
                        "steps": args.steps})
        for vocab in args.small_vocab:
            out.append({**common, "drafter": drafter, "version": "new", "vocab": vocab, "losses": ["lk-hybrid"], "steps": 1})
    return out


def case_key(row_or_case: dict) -> tuple:
    return (row_or_case["drafter"], row_or_case["version"], row_or_case.get("vocab", row_or_case.get("vocab_size")))


def run_case(case: dict, rows_file: Path) -> None:
    """One worker process; each row it prints is appended to ``rows_file`` at once (a killed run
    keeps its finished lengths; a rerun redoes only unfinished cases)."""
    with subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(case)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as worker_process:
        for line in worker_process.stdout:
            if line.startswith("{"):
                with rows_file.open("a") as handle:
                    handle.write(line)
        error = worker_process.stderr.read()
    if worker_process.returncode:
        raise SystemExit(f"{case['drafter']}/{case['version']}/{case['vocab']} failed:\n{error[-4000:]}")


def summarise(rows: list[dict]) -> tuple[list[dict], str]:
    series: dict[tuple, list[dict]] = {}
    for row in rows:
        series.setdefault((row["drafter"], row["version"], row["loss"], row["vocab_size"]), []).append(row)
    fits = [{"drafter": d, "version": v, "loss": loss, "vocab_size": vocab, **fit(rs)}
            for (d, v, loss, vocab), rs in series.items() if len(rs) > 1]
    lines = ["| drafter | version | loss | vocab | T | peak MiB | step MiB | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['drafter']} | {r['version']} | {r['loss']} | {r['vocab_size']} | {r['seq_len']} | {r['peak_mib']:.0f} | "
              f"{r['step_mib']:.0f} | {r['tokens_per_s']:.0f} |" for r in rows]
    lines += ["", "| drafter | version | loss | vocab | a MiB | b MiB/token |", "|---|---|---|---|---|---|"]
    lines += [f"| {f['drafter']} | {f['version']} | {f['loss']} | {f['vocab_size']} | {f['a_mib']:.0f} | {f['b_mib_per_token']:.3f} |"
              for f in fits]
    return fits, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafters", nargs="+", default=list(DRAFTERS), choices=list(DRAFTERS))
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[512, 1024, 2048])
    parser.add_argument("--small-vocab", nargs="*", type=int, default=[32000], help="extra target vocabularies (new version) for the slope's V term")
    parser.add_argument("--checkpointed", action="store_true", help="also the new version with --activation-checkpointing")
    parser.add_argument("--full-vocab-target", action="store_true", help="also EAGLE-3 and MEDUSA with the loss's full-vocabulary target side")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="measured steps per length and loss (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the test's): same code paths, seconds")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    from tqdm.auto import tqdm

    started = time.time()
    rows_file = (args.json or Path("train_memory.json")).with_suffix(".rows.jsonl")
    rows_file.parent.mkdir(parents=True, exist_ok=True)

    def finished() -> list[dict]:
        return [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.is_file() else []

    wanted = cases(args)
    for case in tqdm(wanted, desc="train memory", unit="case"):
        done = [r for r in finished() if case_key(r) == case_key(case)]
        if len(done) == len(case["seq_lens"]) * len(case["losses"]):
            continue  # from an earlier, interrupted run
        if done:  # partly done: redo the case whole (its lengths share one process)
            rows_file.write_text("".join(json.dumps(r) + "\n" for r in finished() if case_key(r) != case_key(case)))
        run_case(case, rows_file)
    keys = {case_key(c) for c in wanted}
    rows = [r for r in finished() if case_key(r) in keys]
    fits, table = summarise(rows)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"shape": TINY if args.tiny else LLAMA_8B, "drafters": {d: DRAFTERS[d] for d in args.drafters}, "versions": VERSIONS,
                "threads": args.threads, "seconds": time.time() - started}
        args.json.write_text(json.dumps({"config": meta, "rows": rows, "fits": fits}, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
