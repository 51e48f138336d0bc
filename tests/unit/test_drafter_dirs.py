"""server.drafters: what a drafter directory must be before /admin/drafter hands it to an engine,
and when two drafters can be swapped in place. Safetensors files are written with the real
library and then damaged the ways a crashed export or a cut copy damages them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from server.config import ServerConfig
from server.drafters import check_drafter_dir, in_place_refusal
from vllm_lk.checkpoint import FORMAT
from vllm_lk.errors import InvalidInput, MissingInput

CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 1, "_name_or_path": "x"}


def drafter(path, config=None, tensors=None, metadata=None):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or CONFIG))
    save_file(tensors or {"w": torch.ones(4, 8), "b": torch.zeros(8)}, str(path / "model.safetensors"))
    if metadata is not None:
        (path / "lk_metadata.json").write_text(json.dumps(metadata))
    return path


def test_a_whole_directory_is_read_with_its_layout_and_identity(tmp_path):
    checked = check_drafter_dir(drafter(tmp_path / "d", metadata={"format": FORMAT, "loss": "lk-hybrid"}))
    assert checked.tensors == {"w": ("F32", (4, 8)), "b": ("F32", (8,))}
    assert checked.metadata["loss"] == "lk-hybrid" and len(checked.identity) == 12
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "d", run / "drafter")
    assert check_drafter_dir(run).path == (run / "drafter").resolve()  # a training run directory
    copy = shutil.copytree(tmp_path / "d", tmp_path / "copy")
    save_file({"w": torch.full((4, 8), 2.0), "b": torch.zeros(8)}, str(copy / "model.safetensors"))
    assert check_drafter_dir(copy).identity != checked.identity  # other weights: another identity


@pytest.mark.parametrize("damage,error,words", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-7]), InvalidInput,
     "truncated"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x01\x02"), InvalidInput, "no header"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}"), InvalidInput, "truncated or not a safetensors"),
    (lambda d: (d / "config.json").write_text("{"), InvalidInput, "not valid JSON"),
    (lambda d: (d / "config.json").write_text("[1]"), InvalidInput, "not a JSON object"),
    (lambda d: (d / "config.json").unlink(), MissingInput, "no config.json"),
    (lambda d: (d / "model.safetensors").unlink(), MissingInput, "no weights"),
    (lambda d: (d / "lk_metadata.json").write_text('{"format": "other"}'), InvalidInput, "unknown format"),
    (lambda d: (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-2.safetensors"}})),
     MissingInput, "model-2.safetensors"),
])
def test_a_damaged_directory_is_refused_naming_the_problem(tmp_path, damage, error, words):
    path = drafter(tmp_path / "d")
    damage(path)
    with pytest.raises(error, match=words) as caught:
        check_drafter_dir(path)
    assert str(path) in str(caught.value)


def test_in_place_needs_the_same_method_architecture_and_shapes(tmp_path):
    served = check_drafter_dir(drafter(tmp_path / "a"))
    renamed = check_drafter_dir(drafter(tmp_path / "b", config={**CONFIG, "_name_or_path": "y", "torch_dtype": "float32"}))
    assert in_place_refusal(served, renamed, "draft_model", "draft_model") is None
    assert "another method" in in_place_refusal(served, renamed, "draft_model", "eagle3")
    deeper = check_drafter_dir(drafter(tmp_path / "c", config={**CONFIG, "num_hidden_layers": 2}))
    assert "num_hidden_layers" in in_place_refusal(served, deeper, "draft_model", "draft_model")
    wider = check_drafter_dir(drafter(tmp_path / "d", tensors={"w": torch.ones(4, 9), "b": torch.zeros(8)}))
    assert "other tensors (w)" in in_place_refusal(served, wider, "draft_model", "draft_model")
    assert "no drafter" in in_place_refusal(None, served, None, "draft_model")


def test_the_admin_key_comes_from_config_or_environment_and_is_not_the_api_key(monkeypatch):
    monkeypatch.delenv("VLLM_LK_ADMIN_KEY", raising=False)
    assert ServerConfig(target="t").resolved_admin_key() is None
    monkeypatch.setenv("VLLM_LK_ADMIN_KEY", "from-env")
    assert ServerConfig(target="t").resolved_admin_key() == "from-env"
    assert ServerConfig(target="t", admin_key="given").resolved_admin_key() == "given"
    with pytest.raises(InvalidInput, match="must differ"):
        ServerConfig(target="t", api_key="same", admin_key="same").resolved_admin_key()
