"""`vllm-lk train`: distil a drafter from a frozen target with KL, TV or an LK loss.

One process, or data parallel under ``torchrun --nproc-per-node N`` (gloo on CPU, nccl on CUDA):
every rank runs the frozen target and the drafter on its share of each global batch; gradients are
all-reduced so that the update equals the single-process one (each rank's loss is scaled by its
share of the batch's trained rows). The data order is a pure function of (seed, step), so a resumed
run sees exactly the batches an uninterrupted one would.

A run directory holds: ``config.yaml`` (the resolved TrainConfig), ``metrics.jsonl`` (one JSON
object per logged step), ``tensorboard/`` (the same scalars), ``checkpoints/`` (atomic, see
training.checkpoint), ``drafter/`` (the export vLLM loads, with lk_metadata.json) and
``result.json`` (held-out alpha per head, predicted tau, timings).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm.auto import tqdm

from training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_text_atomic
from training.data import Example, collate, read_examples
from training.drafters import build_drafter
from training.drafters.base import TargetOutputs, as_logits
from training.evaluate import predict
from training.export import export_drafter, file_sha256
from training.formats import load_for_training, resolve_init_from
from training.losses import multi_head_loss
from training.parallel import (
    all_reduce,
    check_target_sharding,
    close_distributed,
    full_state,
    init_distributed,
    load_full_state,
    norm_value,
    shard,
    shard_target,
    sync_gradients,
)
from training.target import load_target, run_target
from training.target_cache import TargetCache
from training.train_config import TrainConfig
from training.vocab import token_frequencies
from vllm_lk.errors import InvalidInput

logger = logging.getLogger(__name__)

# Fields a resumed run may change: they do not alter the optimisation trajectory up to the
# checkpoint (more steps continue the same schedule only if steps is unchanged; see _check_resume).
RUN_FILE = "run.json"  # where the target and data of a run live, for `vllm-lk export`
RESUMABLE_CHANGES = {"checkpoint_every", "keep_checkpoints", "log_every", "grad_accum", "materialise_target_logits",
                     "materialise_draft_logits", "activation_checkpointing", "fsdp_target",
                     # a resumed run's weights are its checkpoint's, never init_from's (which then gives
                     # only the architecture: a moved copy of the same checkpoint resumes the same run)
                     "init_from"}


class TrainingDiverged(RuntimeError):
    """The loss or gradients became NaN/inf; the last good checkpoint is kept."""


def split_examples(examples: list[Example], eval_count: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): ``eval_count`` examples chosen by a seeded permutation are never trained on."""
    if eval_count >= len(examples):
        raise InvalidInput(f"eval_sequences={eval_count} leaves no training data ({len(examples)} examples)")
    order = np.random.default_rng(seed).permutation(len(examples))
    held = set(order[:eval_count].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> list[int]:
    """The global batch of ``step``: consecutive slices of one seeded permutation per epoch."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_examples)
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)
        indices.append(int(order[offset]))
    return indices


def lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and (device.type == "cuda" or torch.backends.mkldnn.is_available())):
        return torch.bfloat16
    return None


def make_optimizer(drafter, config: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in drafter.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def drafter_losses(drafter, target: TargetOutputs, config: TrainConfig, precision) -> tuple[torch.Tensor, list[float], int]:
    """(loss, mean alpha per head at the first temperature, trained rows of head 1) of one batch."""
    ids = target.input_ids
    with torch.autocast(ids.device.type, dtype=precision or torch.float32, enabled=precision is not None):
        pairs = drafter(target)
        if config.materialise_draft_logits:
            pairs = [(as_logits(draft), target_side) for draft, target_side in pairs]
    loss, alphas = multi_head_loss(
        [d for d, _ in pairs], [t for _, t in pairs], config.loss,
        gamma=config.gamma, temperatures=tuple(config.temperatures), eta=config.resolved_eta(),
        lambda_per_token=config.lambda_per_token, draft_ids=drafter.draft_ids,
    )
    return loss, alphas, int(pairs[0][0].shape[0])


@torch.no_grad()
def heldout_alpha(drafter, target_model, examples: list[Example], config: TrainConfig, pad_id: int, device) -> list[float]:
    """Mean alpha per head over held-out examples (rows weighted equally), at the first temperature."""
    drafter.eval()
    totals, rows = None, 0
    for start in range(0, len(examples), config.batch_size):
        ids, mask = collate(examples[start : start + config.batch_size], config.seq_len, pad_id)
        target = run_target(target_model, ids.to(device), mask.to(device), drafter.hidden_layers,
                            materialise_logits=config.materialise_target_logits)
        _, alphas, n = drafter_losses(drafter, target, config, None)
        if n == 0:
            continue
        weighted = [a * n for a in alphas]
        totals = weighted if totals is None else [t + w for t, w in zip(totals, weighted)]
        rows += n
    drafter.train()
    return [t / rows for t in totals] if rows else []


def _check_resume(saved: dict, config: TrainConfig) -> None:
    ours = config.model_dump(mode="json")
    # a field the checkpoint predates counts as its default (what that run used)
    defaults = {k: f.default for k, f in TrainConfig.model_fields.items()}
    changed = sorted(k for k in ours if ours[k] != saved.get(k, defaults.get(k)) and k not in RESUMABLE_CHANGES)
    if changed:
        raise InvalidInput(
            f"cannot resume: the config differs from the checkpoint's in {', '.join(changed)} "
            "(a resumed run must be the same run; start a new --out for a new one)"
        )


class MetricsLog:
    """metrics.jsonl (append, flushed per line) and TensorBoard scalars, on rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.handle = (run_dir / "metrics.jsonl").open("a")
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["step"])
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    self.writer.add_scalar(f"{key}/head{i + 1}", item, record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.handle.close()
            self.writer.close()


TARGET_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def target_dtype(name: str, device: torch.device) -> torch.dtype:
    """The frozen target's dtype: half the memory of fp32 in bf16 on GPUs (``auto``)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return TARGET_DTYPES[name]


def _prepare(config: TrainConfig, target_dir: Path, data_path: Path, device):
    target_model, tokenizer = load_target(target_dir, dtype=target_dtype(config.target_dtype, device))
    target_model.to(device)
    vocab_size = target_model.config.vocab_size
    examples = read_examples(data_path, vocab_size, tokenizer)
    train_set, eval_set = split_examples(examples, config.eval_sequences, config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    counts = token_frequencies((e.token_ids[e.response_start :] for e in train_set), vocab_size)
    torch.manual_seed(config.seed)
    if config.init_from is not None:  # its architecture and weights, checked against the target
        drafter = load_for_training(config, target_model).to(device)
    else:
        drafter = build_drafter(config, target_model, counts).to(device)
    return target_model, drafter, train_set, eval_set, pad_id


def train(config: TrainConfig, target_dir: str | Path, data_path: str | Path, out: str | Path, *, resume: bool = False, device: str = "cpu") -> dict:
    """Train, checkpoint, export; returns the result record (also written to ``out/result.json``)."""
    config = resolve_init_from(config)  # the checkpoint's architecture, before anything is saved or compared
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per torchrun rank
    ctx = init_distributed(device, config.fsdp)
    finished = False
    try:
        result = _train(config, ctx, device, Path(out), Path(target_dir), Path(data_path), resume)
        finished = True
        return result
    finally:
        close_distributed(ctx, finished)


def _train(config: TrainConfig, ctx, device, run_dir: Path, target_dir: Path, data_path: Path, resume: bool) -> dict:
    if not resume and latest_checkpoint(run_dir) is not None:
        raise InvalidInput(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose a new --out")
    check_target_sharding(config, ctx)
    started = time.time()
    target_model, drafter, train_set, eval_set, pad_id = _prepare(config, target_dir, data_path, device)
    drafter.set_activation_checkpointing(config.activation_checkpointing)
    target_sharded = config.fsdp_target and shard_target(target_model, ctx, device)
    plain = shard(drafter, ctx, device)
    optimizer = make_optimizer(drafter, config)
    step = 0
    if resume and (checkpoint := latest_checkpoint(run_dir)) is not None:
        state = load_checkpoint(checkpoint)
        _check_resume(state["config"], config)
        load_full_state(drafter, optimizer, state["drafter"], state["optimizer"], ctx)
        step = state["step"]
        logger.info("resuming %s from %s (step %d)", run_dir, checkpoint.name, step)
    if ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        sources = {"target": str(target_dir.resolve()), "data": str(data_path.resolve())}
        write_text_atomic(run_dir / RUN_FILE, json.dumps(sources, indent=2) + "\n")
    log = MetricsLog(run_dir, ctx.main)
    precision = autocast_dtype(config.precision, device)
    cache = None
    if config.cache_target:
        weights = sorted(target_dir.glob("*.safetensors"))
        key = {
            "data_sha256": file_sha256(data_path), "seq_len": config.seq_len, "seed": config.seed, "eval_sequences": config.eval_sequences,
            "target": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in weights],
        }
        cache = TargetCache(run_dir / f"target-cache-rank{ctx.rank}", target_model, drafter.hidden_layers, key, precision)
    progress = tqdm(total=config.steps, initial=step, desc=f"train {config.drafter}/{config.loss}", unit="step", disable=not ctx.main)
    last_good = step
    timing = {"tokens": 0, "seconds": 0.0}
    try:
        while step < config.steps:
            record = _train_step(step, drafter, target_model, optimizer, train_set, config, ctx, pad_id, precision, device, cache)
            if not record["finite"]:
                raise TrainingDiverged(
                    f"non-finite loss or gradient at step {step + 1}; stopped without applying it. "
                    f"The last good checkpoint (step {last_good}) is kept in {run_dir / 'checkpoints'}"
                )
            step += 1
            timing["tokens"] += record["tokens"]
            timing["seconds"] += record["seconds"]
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", alpha1=f"{record['alpha'][0]:.3f}")
            if step % config.log_every == 0 or step == config.steps:
                log.write({k: v for k, v in record.items() if k != "finite"})
            if step % config.checkpoint_every == 0 or step == config.steps:
                model_state, optimizer_state = full_state(drafter, optimizer, ctx)
                if ctx.main:
                    state = {"step": step, "drafter": model_state, "optimizer": optimizer_state, "config": config.model_dump(mode="json")}
                    save_checkpoint(run_dir, step, state, config.keep_checkpoints)
                last_good = step
                if ctx.world > 1:
                    dist.barrier()
    except TrainingDiverged as err:
        log.write({"step": step + 1, "error": str(err)})
        logger.error("%s", err)
        raise
    finally:
        progress.close()
        log.close()
    # a sharded target's forwards are collectives: every rank evaluates the same held-out set
    # together (and gets the same alphas); otherwise rank 0 alone does, in _finish
    alphas = heldout_alpha(drafter, target_model, eval_set, config, pad_id, device) if target_sharded else None
    if ctx.sharded:  # rank 0 evaluates and exports an unsharded copy holding the final weights
        model_state, _ = full_state(drafter, optimizer, ctx)
        if ctx.main:
            plain.load_state_dict(model_state)
            drafter = plain
    if not ctx.main:
        return {}
    return _finish(config, drafter, target_model, (train_set, eval_set), (run_dir, run_dir / "drafter"), (target_dir, data_path), pad_id,
                   device, timing, started, alphas)


def _train_step(step, drafter, target_model, optimizer, train_set, config, ctx, pad_id, precision, device, cache=None) -> dict:
    """One optimizer step on this rank's share of the global batch, in ``config.grad_accum``
    micro-batches; returns its global metrics."""
    began = time.perf_counter()
    indices = batch_indices(step, len(train_set), config.batch_size, config.seed)[ctx.rank :: ctx.world]
    lr = lr_at(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # [rows, loss * rows, alpha_k * rows..., tokens, non-finite micro-batches]: summed over micro-batches, then ranks
    local = None
    chunks = [c for c in (indices[i :: config.grad_accum] for i in range(config.grad_accum)) if c]
    for chunk in chunks:
        ids, mask = collate([train_set[i] for i in chunk], config.seq_len, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        if cache is not None:
            target = cache.outputs(chunk, [train_set[i] for i in chunk], ids, mask, config.seq_len, pad_id)
        else:
            target = run_target(target_model, ids, mask, drafter.hidden_layers, precision, config.materialise_target_logits)
        loss, alphas, rows = drafter_losses(drafter, target, config, precision)
        if rows:
            (loss * rows).backward()  # the sum over this micro-batch's rows; scaled to the mean below
        part = torch.tensor([rows, float(loss.detach()) * rows if rows else 0.0, *[a * rows if rows else 0.0 for a in alphas], ids.numel(),
                             float(bool(rows) and not bool(torch.isfinite(loss)))], dtype=torch.float64)
        local = part if local is None else local + part
        del target, loss
    stats = all_reduce(local, ctx)
    global_rows = max(stats[0].item(), 1.0)
    params = [p for p in drafter.parameters() if p.grad is not None]
    # each rank holds the gradient of its rows' sum; x world / global rows, averaged over ranks
    # (sync_gradients, or FSDP's reduce-scatter), is the gradient of the global per-row mean:
    # what one process with the whole batch in one pass computes
    for p in params:
        p.grad.mul_(ctx.world / global_rows)
    sync_gradients(params, ctx)
    grad_norm = norm_value(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
    finite = stats[-1].item() == 0 and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - began
    count = len(stats) - 4
    return {
        "step": step + 1,
        "loss": stats[1].item() / global_rows,
        "alpha": [stats[2 + k].item() / global_rows for k in range(count)],
        "lr": lr,
        "grad_norm": grad_norm,
        "rows": int(stats[0].item()),
        "tokens": int(stats[2 + count].item()),
        "seconds": seconds,
        "tokens_per_s": stats[2 + count].item() / seconds,
        "finite": finite,
    }


def _finish(config, drafter, target_model, splits, dirs, sources, pad_id, device, timing, started, alphas=None) -> dict:
    """Held-out alpha (unless given), export with LK metadata, result.json and a one-line summary."""
    (train_set, eval_set), (run_dir, drafter_dir), (target_dir, data_path) = splits, dirs, sources
    if alphas is None:
        alphas = heldout_alpha(drafter, target_model, eval_set, config, pad_id, device)
    metadata = {
        "num_speculative_tokens": config.num_heads,
        "loss": config.loss,
        "eta": config.resolved_eta(),
        "gamma": config.gamma,
        "temperatures": list(config.temperatures),
        "lambda_per_token": config.lambda_per_token,
        "data": {"path": str(data_path.resolve()), "sha256": file_sha256(data_path), "train_examples": len(train_set), "heldout_examples": len(eval_set)},
        "offline_alpha": alphas,
        "offline_temperature": config.temperatures[0],
        "predicted_tau": predict(alphas, config.num_heads)["tau"] if alphas else None,
        "steps": config.steps,
        "train_config": config.model_dump(mode="json"),
    }
    drafter_dir = export_drafter(drafter, drafter_dir, target_dir=target_dir, metadata=metadata)
    result = {
        **metadata,
        "run_dir": str(run_dir.resolve()),
        "drafter_dir": str(drafter_dir.resolve()),
        "train_tokens_per_s": timing["tokens"] / timing["seconds"] if timing["seconds"] else None,
        "seconds": time.time() - started,
    }
    write_text_atomic(run_dir / "result.json", json.dumps(result, indent=2) + "\n")
    shown = " ".join(f"{a:.3f}" for a in alphas)
    logger.info(
        "trained %s with %s for %d steps: held-out alpha per head %s, predicted tau %.3f at K=%d; drafter in %s",
        config.drafter, config.loss, config.steps, shown, result["predicted_tau"] or float("nan"), config.num_heads, drafter_dir,
    )
    return result


def export_run(run_dir: str | Path, out: str | Path | None = None, device: str = "cpu") -> dict:
    """Export the latest checkpoint of ``run_dir`` (e.g. of a run that stopped early), with
    held-out alpha and LK metadata, to ``out`` (default: ``run_dir/drafter``)."""
    run_dir = Path(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise InvalidInput(f"{run_dir}: no checkpoint to export")
    state = load_checkpoint(checkpoint)
    config = TrainConfig(**state["config"]).model_copy(update={"steps": state["step"]})
    sources = json.loads((run_dir / RUN_FILE).read_text())
    target_dir, data_path = Path(sources["target"]), Path(sources["data"])
    target_model, drafter, train_set, eval_set, pad_id = _prepare(config, target_dir, data_path, torch.device(device))
    drafter.load_state_dict(state["drafter"])
    drafter_dir = Path(out) if out is not None else run_dir / "drafter"
    no_timing = {"tokens": 0, "seconds": 0.0}
    return _finish(config, drafter, target_model, (train_set, eval_set), (run_dir, drafter_dir), (target_dir, data_path), pad_id, device, no_timing, time.time())
