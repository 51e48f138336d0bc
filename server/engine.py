"""Building the vLLM engine the server runs on, and describing its speculative setup.

The server talks to vLLM's ``AsyncLLM`` directly (no HTTP hop, no second process of our own), so
everything vLLM can do — tensor/pipeline/data parallelism, any dtype, memory share, context length
— is one engine argument away. Two arguments are always ours: the speculative config built from
the server config, and ``per_request_spec_decode_metrics="detailed"``, which makes every streamed
output carry its request's per-step (drafted, accepted) record (the vllm_lk plugin passes it on
while the request runs), the source of all per-request acceptance numbers the server reports.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from server.config import ServerConfig
from vllm_lk import engine_defaults
from vllm_lk.errors import InvalidInput, MissingInput
from vllm_lk.speculation import MODE_ENV

logger = logging.getLogger(__name__)

DEFAULT_METHOD = "draft_model"
DEFAULT_K = 3
# What makes vLLM start on a CPU-only machine: float32 (bf16 CPU kernels need AVX512-BF16), no
# CUDA graphs, and a share of host memory that leaves room for other processes.


class SpecSetup(BaseModel):
    """The speculative configuration actually served, with the drafter's LK metadata."""

    model_config = ConfigDict(frozen=True)

    drafter: str | None = Field(None, description="drafter directory, None when serving without speculation")
    method: str | None = Field(None, description="vLLM speculative method")
    num_speculative_tokens: int = Field(0, description="K (0 without speculation)")
    lk_metadata: dict[str, Any] | None = Field(None, description="the drafter's lk_metadata.json, if it has one")

    @property
    def loss(self) -> str:
        return str((self.lk_metadata or {}).get("loss", "unknown" if self.drafter else "none"))


def resolve_spec(config: ServerConfig) -> SpecSetup:
    """Method and K from the config, else from the drafter's LK metadata (what it was trained for)."""
    if config.drafter is None:
        return SpecSetup()
    return drafter_spec(config.drafter, config.method, config.num_speculative_tokens)


def drafter_spec(drafter: str | Path, method: str | None = None, k: int | None = None,
                 fallback_k: int | None = None) -> SpecSetup:
    """The setup that serves ``drafter`` (a drafter directory or a training run holding one in
    ``drafter/``): ``method`` and ``k`` when given, else its LK metadata's, else ``fallback_k`` / the defaults."""
    from vllm_lk.checkpoint import read_lk_metadata

    drafter = Path(drafter)
    if not (drafter / "config.json").is_file() and (drafter / "drafter" / "config.json").is_file():
        logger.info("%s is a training run directory: serving its exported drafter %s", drafter, drafter / "drafter")
        drafter = drafter / "drafter"  # `vllm-lk train --out RUN_DIR` exports to RUN_DIR/drafter
    if not (drafter / "config.json").is_file():
        raise MissingInput(f"{drafter} is not a drafter directory (no config.json, and no {drafter / 'drafter'} either)")
    metadata = read_lk_metadata(drafter)
    method = method or (metadata or {}).get("vllm_method") or DEFAULT_METHOD
    k = k or _trained_k(metadata) or fallback_k or DEFAULT_K
    return SpecSetup(drafter=str(drafter.resolve()), method=method, num_speculative_tokens=k, lk_metadata=metadata)


def _trained_k(metadata: dict | None) -> int | None:
    if not metadata:
        return None
    for key in ("num_speculative_tokens", "num_heads"):
        if isinstance(metadata.get(key), int):
            return metadata[key]
    return None


def engine_kwargs(config: ServerConfig, spec: SpecSetup) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments: vllm_lk.engine_defaults (CPU) < the user's engine_args < ours."""
    if config.target is None:
        raise ValueError("target is not resolved")
    kwargs: dict[str, Any] = engine_defaults.platform_defaults()
    kwargs.update(config.engine_args)
    kwargs["model"] = str(config.target)
    kwargs["served_model_name"] = config.model_name()
    if spec.drafter is not None:  # vLLM refuses it without speculation
        kwargs["per_request_spec_decode_metrics"] = "detailed"
    kwargs.setdefault("disable_log_stats", False)  # vLLM's vllm:* Prometheus metrics need stat logging
    if spec.drafter is not None and config.speculation == "adaptive":
        kwargs.setdefault("async_scheduling", False)  # a per-step K needs it (vllm_lk.speculation)
    if spec.drafter is not None:
        kwargs["speculative_config"] = {
            "method": spec.method, "model": spec.drafter, "num_speculative_tokens": spec.num_speculative_tokens,
        }
    return kwargs


def build_engine(config: ServerConfig, spec: SpecSetup):
    """Start vLLM's AsyncLLM (20-40 s for a small model on CPU): spawns the engine-core process."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs = engine_kwargs(config, spec)
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise InvalidInput(f"unknown vLLM engine arguments: {', '.join(unknown)}")
    logger.info("starting vLLM engine: %s", kwargs)
    # the engine-core process reads it when its model runner starts (vllm_lk.speculation); set
    # only while the engine starts, so this process's later engines and children are not changed
    previous = os.environ.get(MODE_ENV)
    os.environ[MODE_ENV] = config.speculation
    try:
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs), usage_context=UsageContext.OPENAI_API_SERVER)
    finally:
        if previous is None:
            os.environ.pop(MODE_ENV, None)
        else:
            os.environ[MODE_ENV] = previous


def engine_args_from_cli(argv: list[str]) -> dict[str, Any]:
    """vLLM engine flags (``--max-model-len 512 --tensor-parallel-size 2 ...``) parsed by vLLM's own
    parser, reduced to the ones that differ from vLLM's defaults, so they can sit in a config."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = [a for a in argv if a != "--"]
    if not argv:
        return {}
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm-lk serve --"))
    defaults = vars(parser.parse_args([]))
    parsed = vars(parser.parse_args(argv))
    return {key: value for key, value in parsed.items() if defaults.get(key) != value}
