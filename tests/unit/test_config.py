import argparse
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field, ValidationError

from training.config import FrozenConfig, add_config_args, resolve_config
from vllm_lk.errors import UserError


class Demo(FrozenConfig):
    steps: int = Field(10, description="steps")
    lr: float = Field(0.1, description="learning rate")
    loss: Literal["kl", "tv"] = Field("kl", description="loss")
    shuffle: bool = Field(True, description="shuffle")
    data: Path | None = Field(None, description="data file")
    init_from: str | None = Field(None, description="a directory or a hub id")
    vocab: int | None = Field(64, description="optional number")


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_args(parser, Demo)
    return resolve_config(Demo, parser.parse_args(argv))


def test_defaults_then_yaml_then_cli(tmp_path):
    assert parse([]) == Demo()
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 20\nlr: 0.5\n")
    cfg = parse(["--config", str(cfg_file), "--lr", "0.25", "--shuffle", "false", "--loss", "tv"])
    assert (cfg.steps, cfg.lr, cfg.shuffle, cfg.loss) == (20, 0.25, False, "tv")


def test_optional_path_field_parses():
    assert parse(["--data", "x.jsonl"]).data == Path("x.jsonl")


def test_optional_text_is_taken_as_typed_and_optional_numbers_as_yaml():
    """A path or id flag is the text given (YAML would read "2024" as an int, "on" as true, "a: b"
    as a mapping); an optional number is still parsed as YAML."""
    for text in ("2024", "on", "runs/a: b", "org/name@v1"):
        assert parse(["--init-from", text]).init_from == text
    assert parse(["--data", "null"]).data == Path("null")
    assert parse(["--vocab", "32"]).vocab == 32


def test_bad_values_are_reported_with_the_source(tmp_path):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("steps: many\n")
    with pytest.raises(UserError, match="bad.yaml"):
        parse(["--config", str(cfg_file)])
    cfg_file.write_text("no_such_key: 1\n")
    with pytest.raises(UserError, match="no_such_key"):
        parse(["--config", str(cfg_file)])
    with pytest.raises(SystemExit):  # argparse rejects a choice outside the Literal
        parse(["--loss", "mse"])


def test_configs_are_frozen_and_digest_tracks_values():
    cfg = Demo()
    with pytest.raises(ValidationError):
        cfg.steps = 3
    assert cfg.digest() == Demo().digest()
    assert cfg.digest() != Demo(steps=11).digest()
