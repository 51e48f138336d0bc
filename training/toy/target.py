"""The embedded toy target: a small Llama trained here, offline, on the Python standard library.

No pretrained LM can be downloaded on the machines this project targets, and acceptance rates on a
random-weights model mean nothing. So ``vllm-lk toy-target`` builds one, deterministically from a
seed: a byte-level BPE tokenizer, then a Llama-architecture causal LM trained on stdlib sources
(plus chat-formatted docstring -> function examples so chat requests get on-topic code), saved as a
standard HF directory that transformers and vLLM load.

A build goes to a temporary sibling directory and is renamed into place when complete, so an
interrupted build never leaves a directory that looks finished. A finished directory whose recorded
config digest matches is returned at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from training.config import FrozenConfig
from training.toy import corpus as corpus_lib
from training.toy import tokenizer as tok_lib
from vllm_lk.errors import ExistingOutput, InvalidInput, MissingInput

logger = logging.getLogger(__name__)

METADATA_FILE = "toy_target.json"
SERVED_NAME = "vllm-lk-toy"


class ToyTargetConfig(FrozenConfig):
    """Everything that determines the toy target; its digest names the cached build."""

    seed: int = Field(0, description="seed for file order, batch sampling and weight init")
    vocab_size: int = Field(4096, ge=262, description="BPE vocabulary size incl. 5 special tokens")
    hidden_size: int = Field(256, description="model width")
    intermediate_size: int = Field(768, description="MLP width")
    num_layers: int = Field(6, ge=1, description="decoder layers (>= 6 leaves EAGLE-3 three distinct aux layers)")
    num_heads: int = Field(4, ge=1, description="attention heads; head_dim = hidden_size / num_heads must be >= 32 for vLLM CPU")
    max_position_embeddings: int = Field(2048, description="longest context vLLM will serve")
    seq_len: int = Field(256, ge=8, description="training window in tokens")
    batch_size: int = Field(16, ge=1, description="windows per optimizer step")
    steps: int = Field(700, ge=1, description="optimizer steps")
    lr: float = Field(3e-3, gt=0, description="peak AdamW learning rate")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps before cosine decay to lr/10")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only)")
    heldout_every: int = Field(20, ge=2, description="one stdlib file in N is held out from training")
    tokenizer_chars: int = Field(8_000_000, ge=1000, description="characters of training text the BPE is learned on")
    train_chars: int = Field(10_000_000, ge=1000, description="characters of training text tokenized for LM training")
    chat_fraction: float = Field(0.15, ge=0, lt=1, description="share of train_chars given to docstring->code chat examples")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="matmul precision while training (weights stay fp32); auto = bf16 autocast where the "
        "CPU has native bf16 (AVX512-BF16/AMX: ~1.7x faster here), else fp32",
    )
    eval_windows: int = Field(64, ge=1, description="held-out windows the reported loss is averaged over")
    corpus_dir: Path | None = Field(None, description="directory of .py files to train on (default: this Python's stdlib)")

    @model_validator(mode="after")
    def _check_heads(self) -> ToyTargetConfig:
        if self.hidden_size % self.num_heads:
            raise InvalidInput("hidden_size must be divisible by num_heads")
        if self.hidden_size // self.num_heads < 32:
            raise InvalidInput("head_dim = hidden_size / num_heads must be >= 32 (vLLM CPU attention rejects 16)")
        return self


def default_cache_dir() -> Path:
    """Per-user cache: $VLLM_LK_CACHE, else $XDG_CACHE_HOME/vllm-lk, else ~/.cache/vllm-lk."""
    if os.environ.get("VLLM_LK_CACHE"):
        return Path(os.environ["VLLM_LK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vllm-lk"


def default_target_dir(config: ToyTargetConfig) -> Path:
    return default_cache_dir() / f"toy-target-{config.digest()[:12]}"


def read_metadata(out: Path) -> dict | None:
    path = Path(out) / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------------------------
# data


def _take_chars(texts, budget: int) -> list[str]:
    taken, used = [], 0
    for text in texts:
        if used >= budget:
            break
        taken.append(text)
        used += len(text)
    return taken


def _chat_examples(sources, tokenizer, budget: int) -> list[str]:
    """Chat-formatted docstring -> function documents, up to ``budget`` characters."""
    docs, used = [], 0
    for source in sources:
        for doc, code in corpus_lib.docstring_examples(source.text):
            messages = [{"role": "user", "content": doc}, {"role": "assistant", "content": code}]
            docs.append(tokenizer.apply_chat_template(messages, tokenize=False))
            used += len(docs[-1])
            if used >= budget:
                return docs
    return docs


def _encode_stream(tokenizer, docs: list[str], desc: str) -> np.ndarray:
    """Token ids of all ``docs``, each preceded by <|endoftext|>, as one int32 array."""
    eos = tokenizer.convert_tokens_to_ids(tok_lib.EOS_TOKEN)
    pieces = []
    for start in tqdm(range(0, len(docs), 256), desc=desc, unit="batch", leave=False):
        for ids in tokenizer(docs[start : start + 256], add_special_tokens=False, verbose=False)["input_ids"]:
            pieces.append(np.asarray([eos, *ids], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


# ----------------------------------------------------------------------------------------------
# model and training


def llama_config(config: ToyTargetConfig, tokenizer):
    from transformers import LlamaConfig

    eos = tokenizer.convert_tokens_to_ids(tok_lib.EOS_TOKEN)
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        head_dim=config.hidden_size // config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=[eos, tokenizer.convert_tokens_to_ids(tok_lib.END_OF_TURN)],
        pad_token_id=eos,
        torch_dtype="float32",
    )


def lr_at(step: int, config: ToyTargetConfig) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``lr / 10``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def sample_windows(stream: np.ndarray, seq_len: int, batch: int, rng: np.random.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` tokens: inputs and shifted labels."""
    starts = rng.integers(0, len(stream) - seq_len - 1, size=batch)
    return torch.from_numpy(np.stack([stream[s : s + seq_len + 1] for s in starts]).astype(np.int64))


def heldout_windows(stream: np.ndarray, seq_len: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced windows over the held-out stream (deterministic)."""
    if len(stream) < seq_len + 1:
        raise InvalidInput(f"held-out text has {len(stream)} tokens, fewer than one window of {seq_len + 1}")
    starts = np.linspace(0, len(stream) - seq_len - 1, num=count).astype(np.int64)
    return torch.from_numpy(np.stack([stream[s : s + seq_len + 1] for s in starts]).astype(np.int64))


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16" if torch.cpu._is_avx512_bf16_supported() else "fp32"


def lm_loss(model, windows: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Mean next-token cross-entropy (nats) over windows ``(B, T+1)``; the loss itself in fp32."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(input_ids=windows[:, :-1]).logits  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten())


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int) -> float:
    """Held-out loss in full fp32 (the precision vLLM serves the model in)."""
    model.eval()
    total = 0.0
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch]
        total += lm_loss(model, chunk).item() * len(chunk)
    model.train()
    return total / len(windows)


def _train(model, config: ToyTargetConfig, train_stream: np.ndarray, precision: str) -> list[float]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    rng = np.random.default_rng(config.seed)
    losses = []
    bar = tqdm(range(config.steps), desc="toy target: training", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss = lm_loss(model, sample_windows(train_stream, config.seq_len, config.batch_size, rng), precision)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"toy target training diverged at step {step} (loss {loss.item()})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


# ----------------------------------------------------------------------------------------------
# the build


def build_toy_target(config: ToyTargetConfig, out: Path | None = None, force: bool = False) -> dict:
    """Build the toy target into ``out`` (default: the per-user cache) and return its metadata.

    Returns at once if ``out`` already holds a finished build of the same config. Refuses to
    overwrite a directory holding something else unless ``force``.
    """
    out = Path(out) if out is not None else default_target_dir(config)
    existing = read_metadata(out)
    if existing is not None and existing.get("config_digest") == config.digest() and not force:
        logger.info("toy target: cached at %s", out)
        return existing
    if out.exists() and any(out.iterdir()) and not force:
        raise ExistingOutput(
            f"{out} exists and does not hold a toy target built from this config; "
            "pass --force to replace it or choose another --out"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        metadata = _build_into(config, tmp)
        metadata["path"] = str(out)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metadata


def _build_into(config: ToyTargetConfig, out: Path) -> dict:
    from transformers import GenerationConfig, LlamaForCausalLM

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    sources = corpus_lib.read_sources(config.corpus_dir)
    if not sources:
        raise MissingInput(f"no readable .py files under {config.corpus_dir or corpus_lib.stdlib_root()}")
    train, heldout = corpus_lib.split_sources(sources, config.heldout_every)
    if not heldout:
        raise InvalidInput(f"no held-out files: corpus has {len(sources)} files, heldout_every={config.heldout_every}")
    order = np.random.default_rng(config.seed).permutation(len(train))
    train = [train[i] for i in order]
    logger.info("toy target: corpus %d train / %d held-out files", len(train), len(heldout))

    bpe = tok_lib.train_bpe(_take_chars((s.text for s in train), config.tokenizer_chars), config.vocab_size)
    tokenizer = tok_lib.wrap(bpe, config.max_position_embeddings)
    if len(tokenizer) != config.vocab_size:
        raise InvalidInput(f"corpus too small: BPE reached {len(tokenizer)} tokens, asked for {config.vocab_size}")

    chat_budget = int(config.train_chars * config.chat_fraction)
    docs = _take_chars((s.text for s in train), config.train_chars - chat_budget)
    docs += _chat_examples(train, tokenizer, chat_budget)
    # Interleave chat examples with raw files so no training window is all of one kind.
    docs = [docs[i] for i in np.random.default_rng(config.seed + 1).permutation(len(docs))]
    train_stream = _encode_stream(tokenizer, docs, "toy target: tokenizing")
    heldout_stream = _encode_stream(tokenizer, [s.text for s in heldout], "toy target: tokenizing held-out")
    data_seconds = time.perf_counter() - started

    model = LlamaForCausalLM(llama_config(config, tokenizer)).float()
    num_params = sum(p.numel() for p in model.parameters())
    eval_set = heldout_windows(heldout_stream, config.seq_len, config.eval_windows)
    train_started = time.perf_counter()
    precision = resolve_precision(config.precision)
    losses = _train(model, config, train_stream, precision)
    train_seconds = time.perf_counter() - train_started
    heldout_loss = evaluate(model, eval_set, config.batch_size)

    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    eos_ids = model.config.eos_token_id
    GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=eos_ids, pad_token_id=eos_ids[0]).save_pretrained(out)
    metadata = {
        "kind": "vllm-lk toy target",
        "config": config.model_dump(mode="json"),
        "config_digest": config.digest(),
        "num_parameters": num_params,
        "heldout_loss": heldout_loss,
        "heldout_perplexity": math.exp(heldout_loss),
        "final_train_loss": float(np.mean(losses[-10:])),
        "train_tokens_seen": config.steps * config.batch_size * config.seq_len,
        "train_stream_tokens": int(len(train_stream)),
        "heldout_stream_tokens": int(len(heldout_stream)),
        "corpus": {
            "root": str(config.corpus_dir or corpus_lib.stdlib_root()),
            "python": platform.python_version(),
            "train_files": len(train),
            "heldout_files": len(heldout),
            "fingerprint": corpus_lib.fingerprint(sources),
        },
        "seconds": {
            "data": round(data_seconds, 1),
            "train": round(train_seconds, 1),
            "total": round(time.perf_counter() - started, 1),
        },
        "torch_threads": torch.get_num_threads(),
        "train_precision": precision,
    }
    logger.info(
        "toy target: %.2fM params, held-out loss %.3f nats (perplexity %.1f), %.0f s",
        num_params / 1e6, heldout_loss, math.exp(heldout_loss), metadata["seconds"]["total"],
    )
    return metadata
