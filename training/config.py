"""One source of truth for run configuration: frozen pydantic models.

Every config is a frozen :class:`pydantic.BaseModel` whose fields carry a description. The same
model gives the defaults, the YAML schema and the command-line flags, so there is no second config
with different defaults. Precedence: field default < ``--config FILE.yaml`` < ``--field value``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from vllm_lk.errors import InvalidInput

C = TypeVar("C", bound=BaseModel)


class FrozenConfig(BaseModel):
    """Base for every run config: immutable, no unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def digest(self) -> str:
        """sha256 of the canonical JSON form; equal configs give equal digests."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_args(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """Add ``--config FILE.yaml`` and one ``--field-name VALUE`` flag per field of ``model``.

    Flags default to ``None`` so that only what the user typed overrides the YAML/defaults.
    """
    parser.add_argument("--config", type=Path, default=None, help="YAML file with config values")
    group = parser.add_argument_group(f"{model.__name__} (defaults shown; YAML keys are the same names)")
    for name, field in model.model_fields.items():
        annotation = field.annotation
        origin = typing.get_origin(annotation)
        kwargs: dict[str, Any] = {"default": None, "dest": name}
        if annotation is bool:
            kwargs["type"] = _parse_bool
            kwargs["metavar"] = "BOOL"
        elif origin is typing.Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif annotation in (int, float, str, Path):
            kwargs["type"] = annotation
        elif _optional_text(annotation):  # a path or id as typed: YAML would turn "2024" into an int, "a: b" into a mapping
            kwargs["type"] = next(t for t in typing.get_args(annotation) if t is not type(None))
        else:  # lists, optionals and other shapes: parsed as YAML, validated by pydantic
            kwargs["type"] = yaml.safe_load
        default = field.get_default(call_default_factory=True)
        kwargs["help"] = f"{field.description or ''} (default: {default})"
        group.add_argument(_flag(name), **kwargs)


def _optional_text(annotation) -> bool:
    """``str | None`` or ``Path | None``."""
    args = typing.get_args(annotation)
    return len(args) == 2 and type(None) in args and any(t in (str, Path) for t in args)


def resolve_config(model: type[C], args: argparse.Namespace) -> C:
    """Build ``model`` from defaults, the YAML file in ``args.config`` and the CLI overrides."""
    values: dict[str, Any] = {}
    config_path: Path | None = getattr(args, "config", None)
    if config_path is not None:
        loaded = yaml.safe_load(Path(config_path).read_text())
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise InvalidInput(f"{config_path}: expected a mapping of config keys, got {type(loaded).__name__}")
        values.update(loaded)
    for name in model.model_fields:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    try:
        return model(**values)
    except ValidationError as err:
        source = f" (from {config_path} and the command line)" if config_path else ""
        raise InvalidInput(f"invalid {model.__name__}{source}:\n{err}") from None
