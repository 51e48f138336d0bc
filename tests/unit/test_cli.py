import subprocess
import sys

import pytest

from server.cli import build_parser, main


def test_help_lists_every_subcommand(venv_bin):
    proc = subprocess.run([str(venv_bin / "vllm-lk"), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    commands = build_parser()._subparsers._group_actions[0].choices
    assert len(commands) >= 8
    for command in commands:
        assert f"\n    {command} " in proc.stdout, command


def test_documented_help_is_the_real_help():
    """Every `$ vllm-lk ... --help` block in README.md and docs/ is what the parser prints
    (refresh them with `python -m tests.help_blocks`)."""
    from tests.help_blocks import blocks, documents, real_help

    found = 0
    for path in documents():
        for args, documented in blocks(path.read_text()):
            found += 1
            assert documented == real_help(args), f"{path.name}: `vllm-lk {' '.join(args)} --help` is stale"
    assert found >= 1


def test_toy_target_flags_come_from_the_config_model():
    help_text = build_parser()._subparsers._group_actions[0].choices["toy-target"].format_help()
    for flag in ("--vocab-size", "--num-layers", "--steps", "--seed", "--config", "--out", "--force"):
        assert flag in help_text


def test_bad_config_value_is_a_clear_error(capsys):
    assert main(["toy-target", "--hidden-size", "64", "--num-heads", "4"]) == 2
    assert "head_dim" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only the user's mistakes (vllm_lk.errors.UserError) become a one-line exit 2."""
    import server.cli

    def broken(args):
        raise ValueError("a bug, not the user's input")

    parser = server.cli.build_parser()
    monkeypatch.setattr(server.cli, "build_parser", lambda only=None: parser)
    parser._subparsers._group_actions[0].choices["doctor"].set_defaults(func=broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["doctor"])


def test_serve_refuses_a_directory_that_is_not_a_model(tmp_path, capsys):
    assert main(["serve", "--target", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_serving_a_given_drafter_imports_neither_trainer_nor_benchmarks(tmp_path):
    """A command builds only its own arguments: `vllm-lk serve --target T --drafter D` reaches
    the server without importing the trainer, the drafters' training code or the benchmarks."""
    code = (
        "import sys, server.runner\n"
        "server.runner.serve = lambda config: print('SERVE', config.drafter) or 0\n"
        "from server.cli import main\n"
        f"assert main(['serve', '--target', {str(tmp_path)!r}, '--drafter', {str(tmp_path)!r}]) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.startswith(('training.trainer', 'training.drafters', "
        "'training.losses', 'training.bench', 'training.toy')))\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SERVE" in proc.stdout and "HEAVY []" in proc.stdout, proc.stdout
