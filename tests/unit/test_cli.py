import subprocess

import pytest

from server.cli import build_parser, main


def test_help_lists_every_subcommand(venv_bin):
    proc = subprocess.run([str(venv_bin / "vllm-lk"), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for command in ("toy-target", "serve", "doctor"):
        assert command in proc.stdout


def test_toy_target_flags_come_from_the_config_model():
    help_text = build_parser()._subparsers._group_actions[0].choices["toy-target"].format_help()
    for flag in ("--vocab-size", "--num-layers", "--steps", "--seed", "--config", "--out", "--force"):
        assert flag in help_text


def test_bad_config_value_is_a_clear_error(capsys):
    with pytest.raises(SystemExit, match="head_dim"):
        main(["toy-target", "--hidden-size", "64", "--num-heads", "4"])


def test_serve_refuses_a_directory_that_is_not_a_model(tmp_path, capsys):
    assert main(["serve", "--target", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
