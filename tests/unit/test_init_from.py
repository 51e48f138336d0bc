"""`vllm-lk train --init-from DIR`: the checkpoint fixes the architecture (unset TrainConfig fields
take its values, contradicting ones are refused naming both), the run starts from its weights with
any loss, the resolved config and the export's lk_metadata record it, a mismatched checkpoint is
refused before training, and a resumed run takes its weights from its own checkpoint."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from tests.heads import write_eagle3_public, write_medusa_original, write_mlp_speculator
from training import trainer
from training.checkpoint import latest_checkpoint, load_checkpoint
from training.formats import detect, resolve_init_from
from training.formats import load_checkpoint as read_drafter
from training.target import load_target
from training.train_config import TrainConfig
from vllm_lk.errors import InvalidInput, MissingInput

QUICK = dict(steps=3, batch_size=4, seq_len=96, warmup_steps=0, checkpoint_every=3, log_every=1, eval_sequences=4)
DRAFT_IDS = list(range(5, 300))


@pytest.fixture(scope="module")
def heads(tiny_target, tmp_path_factory):
    """Public-layout checkpoints for the tiny target: EAGLE-3 (speculators), MEDUSA (the authors'), MLP (fms-extras)."""
    root = tmp_path_factory.mktemp("init")
    return {
        "eagle3": write_eagle3_public(tiny_target, root / "eagle3", "speculators", DRAFT_IDS, [1, 3, 4]),
        "medusa": write_medusa_original(tiny_target, root / "medusa", num_heads=3, num_layers=2),
        "mlp": write_mlp_speculator(tiny_target, root / "mlp", n_predict=4, tie_weights=True),
    }


def test_unset_fields_take_the_checkpoints_architecture(heads):
    medusa = resolve_init_from(TrainConfig(init_from=str(heads["medusa"])))
    assert (medusa.drafter, medusa.num_heads, medusa.medusa_num_layers, medusa.draft_vocab_size) == ("medusa", 3, 2, None)
    assert medusa.resolved_eta() == 10.0 and medusa.init_from == str(heads["medusa"].resolve())
    mlp = resolve_init_from(TrainConfig(init_from=str(heads["mlp"]), drafter="mlp"))
    assert (mlp.num_heads, mlp.mlp_inner_dim, mlp.mlp_tie_weights) == (4, 64, True)
    eagle = resolve_init_from(TrainConfig(init_from=str(heads["eagle3"])))
    assert (eagle.drafter, eagle.draft_vocab_size, eagle.aux_layers, eagle.num_heads) == ("eagle3", 295, [1, 3, 4], 3)
    assert resolve_init_from(eagle) == eagle  # idempotent: a resumed run resolves to the saved config


def test_init_from_takes_a_hugging_face_id_from_the_local_cache(heads, tmp_path, monkeypatch):
    """ORG/NAME[@REV] resolves to its snapshot in the local HF cache (offline); the resolved config
    records the snapshot directory; an id that is not cached is refused naming the cache."""
    from tests.hf_cache import add_to_hf_cache

    cache = tmp_path / "hub"
    snapshot = add_to_hf_cache(cache, "lk-tests/medusa-head", heads["medusa"], refs=("main", "v2"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_init_from(TrainConfig(init_from="lk-tests/medusa-head@v2"))
    assert resolved.init_from == str(snapshot.resolve()) and resolved.drafter == "medusa"
    assert resolve_init_from(resolved) == resolved
    with pytest.raises(MissingInput, match=f"lk-tests/nothing.*{cache}"):
        resolve_init_from(TrainConfig(init_from="lk-tests/nothing"))


def test_a_contradicting_field_is_refused_naming_both_values(heads):
    with pytest.raises(InvalidInput, match=r"num_heads: the config asks for 5, but --init-from .* has 3"):
        resolve_init_from(TrainConfig(init_from=str(heads["medusa"]), num_heads=5))
    with pytest.raises(InvalidInput, match=r"drafter: the config asks for 'mlp', but .*\(eagle3-speculators\) has 'eagle3'"):
        resolve_init_from(TrainConfig(init_from=str(heads["eagle3"]), drafter="mlp"))
    with pytest.raises(InvalidInput, match=r"draft_vocab_size: the config asks for 100, but .* has 295"):
        resolve_init_from(TrainConfig(init_from=str(heads["eagle3"]), draft_vocab_size=100))
    # EAGLE-3's TTT steps are a training choice, not architecture: the config's wins
    assert resolve_init_from(TrainConfig(init_from=str(heads["eagle3"]), num_heads=5)).num_heads == 5
    with pytest.raises(InvalidInput, match="export_format speculators applies to eagle3"):
        resolve_init_from(TrainConfig(init_from=str(heads["mlp"]), export_format="speculators"))
    with pytest.raises(ValueError, match="export_format speculators applies to eagle3"):
        TrainConfig(drafter="medusa", export_format="speculators")


def test_the_flags_come_from_the_schema():
    from training.config import resolve_config
    from training.train_cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--target", "t", "--data", "d", "--out", "o", "--init-from", "/ckpt/eagle", "--export-format", "speculators"])
    config = resolve_config(TrainConfig, args)
    assert (config.init_from, config.export_format) == ("/ckpt/eagle", "speculators")
    assert TrainConfig().export_format == "original" and TrainConfig().init_from is None  # today's behaviour by default


@pytest.fixture(scope="module")
def eagle_run(heads, tiny_target, tiny_train_data, tmp_path_factory):
    """3 KL steps from the speculators EAGLE-3 head at a learning rate too small to move it, exported
    in the speculators layout: the export must then be the checkpoint's weights."""
    out = tmp_path_factory.mktemp("runs") / "eagle"
    config = TrainConfig(init_from=str(heads["eagle3"]), loss="kl", lr=1e-9, export_format="speculators", **QUICK)
    return out, trainer.train(config, tiny_target, tiny_train_data, out)


def test_training_starts_from_the_checkpoint_and_records_it(eagle_run, heads, tiny_target):
    out, result = eagle_run
    model, _ = load_target(tiny_target)
    start, exported = read_drafter(heads["eagle3"], model), read_drafter(out / "drafter", model)
    assert detect(out / "drafter").layout == "eagle3-speculators"
    for name, tensor in start.state_dict().items():  # lr 1e-9: Adam moves each weight by ~3e-9
        torch.testing.assert_close(exported.state_dict()[name], tensor, atol=1e-6, rtol=0)
    metadata = json.loads((out / "drafter" / "lk_metadata.json").read_text())
    assert metadata["train_config"]["init_from"] == str(heads["eagle3"].resolve()) and metadata["export_format"] == "speculators"
    assert metadata["train_config"]["drafter"] == "eagle3" and metadata["train_config"]["aux_layers"] == [1, 3, 4]
    saved = (out / "config.yaml").read_text()
    assert f"init_from: {heads['eagle3'].resolve()}" in saved and "drafter: eagle3" in saved
    assert result["offline_alpha"] and all(0 < a < 1 for a in result["offline_alpha"])


def test_a_resumed_run_takes_its_own_checkpoint_not_init_from(eagle_run, heads, tiny_target, tiny_train_data, tmp_path):
    """init_from may move (it then gives only the architecture); the weights are the run's."""
    out, _ = eagle_run
    moved = shutil.copytree(heads["eagle3"], tmp_path / "moved")
    config = TrainConfig(init_from=str(moved), loss="kl", lr=1e-9, export_format="speculators", **QUICK)
    trainer.train(config, tiny_target, tiny_train_data, out, resume=True)
    model, _ = load_target(tiny_target)
    saved = load_checkpoint(latest_checkpoint(out))["drafter"]
    for name, tensor in read_drafter(out / "drafter", model).state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    with pytest.raises(InvalidInput, match="differs from the checkpoint's in loss"):
        trainer.train(config.model_copy(update={"loss": "lk-hybrid"}), tiny_target, tiny_train_data, out, resume=True)


def test_an_original_medusa_head_trains_with_lk_hybrid_and_exports_in_vllms_layout(heads, tiny_target, tiny_train_data, tmp_path):
    config = TrainConfig(init_from=str(heads["medusa"]), loss="lk-hybrid", lr=1e-2, **QUICK)
    result = trainer.train(config, tiny_target, tiny_train_data, tmp_path / "run")
    model, _ = load_target(tiny_target)
    start, exported = read_drafter(heads["medusa"], model), read_drafter(tmp_path / "run" / "drafter", model)
    assert detect(tmp_path / "run" / "drafter").layout == "medusa-vllm" and exported.fc_bias
    exported_config = json.loads((tmp_path / "run" / "drafter" / "config.json").read_text())
    assert exported_config["medusa_fc_bias"] is True and exported_config["num_hidden_layers"] == 2
    assert any(not torch.equal(exported.state_dict()[k], v) for k, v in start.state_dict().items())  # it trained
    assert len(result["offline_alpha"]) == 3


def test_a_checkpoint_for_another_target_is_refused_before_training(tiny_target, tiny_train_data, tmp_path):
    bad = write_eagle3_public(tiny_target, tmp_path / "big", "specforge", sizes={"hidden_size": 128, "intermediate_size": 256})
    with pytest.raises(InvalidInput, match=r"fc\.weight: checkpoint \[128, 384\], target needs \[64, 192\]"):
        trainer.train(TrainConfig(init_from=str(bad), **QUICK), tiny_target, tiny_train_data, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written: no checkpoints, no metrics
