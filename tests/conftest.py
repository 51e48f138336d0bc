"""Shared fixtures. The one tiny-model factory lives here: every test that needs a model gets it
from ``tiny_target``, built by the project's own toy-target pipeline at a tiny size."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from training.toy.target import ToyTargetConfig, build_toy_target

# Small enough to build in seconds, shaped like the real toy target where vLLM cares:
# head_dim 32 (CPU attention rejects 16) and 6 layers (three distinct EAGLE-3 aux layers).
TINY_TARGET = ToyTargetConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=6,
    num_heads=2,
    max_position_embeddings=512,
    seq_len=64,
    batch_size=8,
    steps=40,
    lr=1e-2,
    warmup_steps=5,
    tokenizer_chars=300_000,
    train_chars=400_000,
    eval_windows=8,
)


# A weaker model on the same tokenizer (the tokenizer depends only on seed, vocab and corpus
# settings): the draft for tests where draft and target must differ.
TINY_DRAFT = TINY_TARGET.model_copy(update={"num_layers": 1, "steps": 12})


@pytest.fixture(scope="session")
def tiny_draft(tmp_path_factory) -> Path:
    """Directory of a tiny draft model that shares ``tiny_target``'s tokenizer."""
    out = tmp_path_factory.mktemp("models") / "tiny-draft"
    build_toy_target(TINY_DRAFT, out)
    return out


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory) -> Path:
    """Directory of a tiny toy target (HF format), built once per test session."""
    out = tmp_path_factory.mktemp("models") / "tiny-target"
    build_toy_target(TINY_TARGET, out)
    return out


@pytest.fixture(scope="session")
def tiny_gqa_target(tiny_target, tmp_path_factory) -> Path:
    """``tiny_target``'s function with grouped-query attention: 4 query heads on 2 key/value heads."""
    from tests.heads import write_gqa_target

    return write_gqa_target(tiny_target, tmp_path_factory.mktemp("models") / "tiny-gqa-target", group=2)


@pytest.fixture(scope="session")
def tiny_eagle(tiny_target, tmp_path_factory) -> Path:
    """EAGLE-1 head for ``tiny_target`` (shares its embeddings and lm_head)."""
    from tests.heads import write_eagle

    return write_eagle(tiny_target, tmp_path_factory.mktemp("models") / "tiny-eagle")


@pytest.fixture(scope="session")
def tiny_eagle3(tiny_target, tmp_path_factory) -> Path:
    """EAGLE-3 head for ``tiny_target`` with a truncated draft vocabulary (295 of 512 tokens)."""
    from tests.heads import write_eagle3

    return write_eagle3(tiny_target, tmp_path_factory.mktemp("models") / "tiny-eagle3", list(range(5, 300)), [1, 3, 4])


@pytest.fixture(scope="session")
def tiny_medusa(tiny_target, tmp_path_factory) -> Path:
    """MEDUSA heads (3) for ``tiny_target``."""
    from tests.heads import write_medusa

    return write_medusa(tiny_target, tmp_path_factory.mktemp("models") / "tiny-medusa", num_heads=3)


@pytest.fixture(scope="session")
def tiny_mlp(tiny_target, tmp_path_factory) -> Path:
    """MLP speculator (3 stages, untied) for ``tiny_target``."""
    from tests.heads import write_mlp_speculator

    return write_mlp_speculator(tiny_target, tmp_path_factory.mktemp("models") / "tiny-mlp", n_predict=3)


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    """bin/ of the interpreter running the tests (where the `vllm-lk` script is installed)."""
    import sys

    return Path(sys.executable).parent


@pytest.fixture(scope="session")
def clean_env() -> dict[str, str]:
    """Environment for subprocesses: this one, without switches that would change behaviour."""
    env = dict(os.environ)
    env.pop("VLLM_LK_DISABLE", None)
    env.pop("VLLM_PLUGINS", None)
    env.pop("VLLM_LK_SPECULATION", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def tiny_train_data(tmp_path_factory) -> Path:
    """Training JSONL for trainer tests: stdlib source files split into a first-lines prompt and a
    completion (text records; the trainer tokenizes them with the target's tokenizer). Real
    regenerated data comes from `vllm-lk generate`, tested on its own."""
    import json

    from training.toy import corpus

    train_sources, _ = corpus.split_sources(corpus.read_sources(), TINY_TARGET.heldout_every)
    out = tmp_path_factory.mktemp("data") / "train.jsonl"
    with out.open("w") as handle:
        for source in train_sources[:96]:
            text = source.text[:1500]
            cut = text.find("\n", 40)
            if cut > 0:
                handle.write(json.dumps({"prompt": text[: cut + 1], "completion": text[cut + 1 :]}) + "\n")
    return out


@contextmanager
def one_torch_thread():
    """Tiny-tensor torch work on one intra-op thread. With 2 cores shared by several processes
    (an engine, a test, other jobs) 2 OpenMP threads spin on each other: measured 10 training
    steps in 1.9 s vs 31 s, sampling 3 s vs 81 s. vLLM engines keep their own threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_torch_thread():
    """A whole test module on one intra-op thread (see ``one_torch_thread``)."""
    with one_torch_thread():
        yield
