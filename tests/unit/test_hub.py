"""--target / --drafter given as Hugging Face ids: resolved in a local HF cache the test builds
(tests/hf_cache.py), never over the network."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.hf_cache import add_to_hf_cache, fake_model
from vllm_lk.errors import InvalidInput, MissingInput, UserError
from vllm_lk.hub import hub_cache_dir, resolve_model, resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An offline HF cache holding org/name (commit COMMIT, refs main and v1) and a legacy
    one-word id; the network is cut, so any attempt to go online fails the test."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("resolution went to the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    add_to_hf_cache(cache, "org/name", fake_model(tmp_path / "src" / "name", hidden_size=64), refs=("main", "v1"), commit=COMMIT)
    add_to_hf_cache(cache, "gpt2", fake_model(tmp_path / "src" / "gpt2"))
    return cache


def test_the_cache_we_build_is_what_huggingface_hub_reads(hf_cache):
    from huggingface_hub import scan_cache_dir

    repos = {repo.repo_id: repo for repo in scan_cache_dir(hf_cache).repos}
    assert set(repos) == {"org/name", "gpt2"}
    (revision,) = repos["org/name"].revisions
    assert revision.commit_hash == COMMIT and revision.refs == {"main", "v1"}
    assert {f.file_name for f in revision.files} == {"config.json", "tokenizer.json"}


def test_an_id_resolves_to_its_cached_snapshot(hf_cache):
    snapshot = hf_cache / "models--org--name" / "snapshots" / COMMIT
    source = resolve_model("org/name")
    assert source.path == snapshot and source.repo_id == "org/name" and source.revision is None
    assert json.loads((source.path / "config.json").read_text())["hidden_size"] == 64  # symlink to the blob
    for revision in ("v1", "main", COMMIT):  # a tag, a branch, a full commit hash
        assert resolve_model(f"org/name@{revision}") == (snapshot, "org/name", revision)
    assert resolve_model_path("gpt2", kind="drafter").parent.parent.name == "models--gpt2"


def test_offline_mode_off_still_never_goes_online(hf_cache, monkeypatch):
    """Resolution is local-files-only whatever HF_HUB_OFFLINE says (the fixture cuts the network)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model("org/name").repo_id == "org/name"
    with pytest.raises(MissingInput, match="nor in the Hugging Face cache"):
        resolve_model("org/elsewhere")


def test_an_id_that_is_not_cached_says_where_it_looked_and_how_to_fetch_it(hf_cache):
    with pytest.raises(MissingInput) as missing:
        resolve_model("org/missing", kind="drafter")
    message = str(missing.value)
    assert isinstance(missing.value, UserError)
    assert f"drafter 'org/missing' is neither a local directory nor in the Hugging Face cache at {hf_cache}" in message
    assert "`hf download org/missing`" in message and "pass a model directory" in message
    with pytest.raises(MissingInput, match=r"'org/name@nope'.*`hf download org/name --revision nope`"):
        resolve_model("org/name@nope")
    with pytest.raises(MissingInput, match="nor in the Hugging Face cache"):  # offline, a short hash resolves to nothing
        resolve_model("org/name@0123456")


def test_a_snapshot_without_config_json_is_refused(hf_cache, tmp_path):
    readme_only = tmp_path / "readme-only"
    readme_only.mkdir()
    (readme_only / "README.md").write_text("a model card")
    add_to_hf_cache(hf_cache, "org/card", readme_only)
    with pytest.raises(MissingInput, match="has no config.json"):
        resolve_model("org/card")


def test_a_local_directory_wins_over_a_cached_id(hf_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = fake_model(tmp_path / "org" / "name")
    assert resolve_model("org/name") == (local.relative_to(tmp_path), None, None)
    assert resolve_model(local).path == local


def test_a_value_shaped_like_a_path_is_never_looked_up(hf_cache, monkeypatch, tmp_path):
    import huggingface_hub

    def lookup(*args, **kwargs):
        raise AssertionError("a path was looked up in the hub cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lookup)
    for value in ("./name", "../name", str(tmp_path / "nothing"), "~/no-such-model-dir", "models/org/name", "has space"):
        with pytest.raises(MissingInput, match=re.escape(f"target '{value}': no such directory") + "$"):
            resolve_model(value)
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(InvalidInput, match="is a file"):
        resolve_model(tmp_path / "weights.bin")


def test_a_malformed_id_is_invalid_input(hf_cache):
    with pytest.raises(InvalidInput, match="not a valid Hugging Face id"):
        resolve_model("org/na--me")


@pytest.mark.parametrize("env", [
    {"HF_HUB_CACHE": "/x/hub-cache"},
    {"HUGGINGFACE_HUB_CACHE": "/x/legacy", "HF_HOME": "/x/home"},
    {"HF_HOME": "~/hf-home"},
    {"XDG_CACHE_HOME": "/x/xdg"},
    {},
])
def test_cache_dir_follows_huggingface_hub(env):
    """hub_cache_dir() reads the environment when called; huggingface_hub reads it at import.
    In a fresh interpreter both must name the same directory."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")}
    code = ("from huggingface_hub import constants; from vllm_lk.hub import hub_cache_dir; "
            "print(constants.HF_HUB_CACHE); print(hub_cache_dir())")
    proc = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    theirs, ours = proc.stdout.split()
    assert theirs == ours


def test_hub_cache_dir_is_read_when_called(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    assert hub_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
