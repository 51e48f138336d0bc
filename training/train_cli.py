"""`vllm-lk train`'s arguments and what it runs, shared by the `vllm-lk` command and by
``python -m training`` (the entry torchrun starts: ``torchrun --nproc-per-node N -m training
--target T --data D --out RUN``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(train: argparse.ArgumentParser) -> None:
    from training.config import add_config_args
    from training.train_config import TrainConfig

    train.description = (
        "Distil a drafter (EAGLE-3, MEDUSA, MLP speculator or an independent draft model) from "
        "a frozen target on a JSONL file from `vllm-lk generate`. Single process, or data parallel under "
        "`torchrun --nproc-per-node N -m training ...` (the same arguments). Writes checkpoints, config.yaml, "
        "metrics.jsonl, tensorboard/, result.json and the exported drafter/ (with lk_metadata.json).")
    train.add_argument("--target", type=Path, required=True,
                       help="the target's HF model directory, or its Hugging Face id ORG/NAME[@REVISION] in the local HF cache")
    train.add_argument("--data", type=Path, required=True, help="training JSONL (from `vllm-lk generate`)")
    train.add_argument("--out", type=Path, required=True, help="run directory")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    train.add_argument("--device", default="cpu", help="torch device (default: cpu; `cuda` under torchrun uses cuda:LOCAL_RANK)")
    add_config_args(train, TrainConfig)


def run(args: argparse.Namespace) -> int:
    from training.config import resolve_config
    from training.train_config import TrainConfig
    from training.trainer import TrainingDiverged, train
    from vllm_lk.hub import resolve_model_path

    config = resolve_config(TrainConfig, args)
    target = resolve_model_path(args.target, kind="target")  # an id: its cached snapshot (offline, so no rank downloads)
    try:
        result = train(config, target, args.data, args.out, resume=args.resume, device=args.device)
    except TrainingDiverged as err:
        print(f"vllm-lk train: stopped: {err}", file=sys.stderr)
        return 3
    if result:
        keys = ("drafter_dir", "offline_alpha", "predicted_tau", "train_tokens_per_s", "seconds")
        print(json.dumps({k: result[k] for k in keys}, indent=2))
    return 0
