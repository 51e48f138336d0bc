import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_TARGET
from training.toy import target as toy
from training.toy.target import ToyTargetConfig, build_toy_target


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    cfg = ToyTargetConfig(steps=100, warmup_steps=10, lr=1.0)
    lrs = [toy.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert toy.lr_at(100, cfg) == pytest.approx(0.1)


def test_windows_are_shifted_pairs_and_heldout_is_deterministic():
    stream = np.arange(1000, dtype=np.int32)
    batch = toy.sample_windows(stream, 16, 4, np.random.default_rng(0))
    assert batch.shape == (4, 17)
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(4, 16, dtype=torch.int64))
    assert torch.equal(toy.heldout_windows(stream, 16, 5), toy.heldout_windows(stream, 16, 5))
    with pytest.raises(ValueError, match="fewer than one window"):
        toy.heldout_windows(stream[:10], 16, 5)


def test_config_rejects_head_dim_below_32():
    with pytest.raises(ValueError, match="head_dim"):
        ToyTargetConfig(hidden_size=64, num_heads=4)


def test_tiny_build_is_a_complete_hf_directory(tiny_target):
    names = {p.name for p in tiny_target.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "toy_target.json"} <= names
    meta = json.loads((tiny_target / "toy_target.json").read_text())
    assert meta["config_digest"] == TINY_TARGET.digest()
    assert meta["heldout_perplexity"] == pytest.approx(math.exp(meta["heldout_loss"]))
    # 40 steps must beat the uniform guess ln(512) = 6.24 nats by a clear margin
    assert meta["heldout_loss"] < math.log(TINY_TARGET.vocab_size) - 1.0
    config = json.loads((tiny_target / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] >= 32


def test_tiny_build_loads_in_transformers_and_generates(tiny_target):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_target)
    model = AutoModelForCausalLM.from_pretrained(tiny_target)
    prompt = tokenizer("def main(", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert tokenizer(chat, add_special_tokens=False)["input_ids"][-2:] == tokenizer("<|assistant|>\n", add_special_tokens=False)["input_ids"]


def test_second_build_returns_cached_metadata_without_training(tiny_target, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached toy target")

    monkeypatch.setattr(toy, "_build_into", fail)
    assert build_toy_target(TINY_TARGET, tiny_target)["config_digest"] == TINY_TARGET.digest()


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--force"):
        build_toy_target(TINY_TARGET, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "user data"
    other = TINY_TARGET.model_copy(update={"steps": 1})
    assert other.digest() != TINY_TARGET.digest()


def test_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy, "_train", interrupt)
    out = tmp_path / "target"
    with pytest.raises(KeyboardInterrupt):
        build_toy_target(TINY_TARGET, out)
    assert list(tmp_path.iterdir()) == []


def test_same_seed_gives_identical_weights(tmp_path):
    cfg = TINY_TARGET.model_copy(update={"steps": 5})
    build_toy_target(cfg, tmp_path / "a")
    build_toy_target(cfg, tmp_path / "b")
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
