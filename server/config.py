"""The server's one configuration schema.

A frozen pydantic model is the single source of truth: the same fields are the YAML keys of
``vllm-lk serve --config FILE.yaml``, the ``--field-name`` flags, and what the app reads at run
time, so there is no second set of defaults to drift. Engine arguments pass through to vLLM
unchanged (``engine_args``), so parallelism, context length, dtype and memory are vLLM's own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vllm_lk.errors import InvalidInput

ADMIN_KEY_ENV = "VLLM_LK_ADMIN_KEY"


class ServerConfig(BaseModel):
    """Everything `vllm-lk serve` and :func:`server.app.create_app` need."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: Path | None = Field(None, description="HF directory of the target model, or a Hugging Face id ORG/NAME[@REVISION] "
                                 "found in the local HF cache (None: the embedded toy target)")
    drafter: Path | None = Field(
        None, description="drafter directory (an export of `vllm-lk train` or any vLLM draft) or its Hugging Face id in "
        "the local HF cache; None: no speculation, "
        "or the default LK drafter when the CLI resolves defaults")
    method: str | None = Field(
        None, description="vLLM speculative method (draft_model, eagle, eagle3, medusa, mlp_speculator); "
        "None: the drafter's lk_metadata.json vllm_method, else draft_model")
    num_speculative_tokens: int | None = Field(
        None, ge=1, le=16, description="K, drafts per verification step (None: the drafter's trained K, else 3)")
    speculation: Literal["adaptive", "fixed"] = Field(
        "fixed", description="fixed: K drafts every step; adaptive: each step drafts and verifies only what is "
        "expected to pay (up to K per request, none when speculation would not pay; vllm_lk.adaptive). Fixed is "
        "the default until adaptive measures at least as fast (docs/speed.md)")
    default_drafter: bool = Field(
        True, description="when drafter is None, serve the default LK drafter for the target "
        "(training.toy.default_drafter: built on first use, then cached); false: serve without speculation")
    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    api_key: str | None = Field(None, description="Bearer key clients must send (None: no authentication)")
    api_key_file: Path | None = Field(None, description="file whose first line is the API key (instead of --api-key)")
    admin_key: str | None = Field(
        None, description="Bearer key of the admin routes (POST /admin/drafter); None: the environment's "
        "VLLM_LK_ADMIN_KEY, and without either the server has no admin routes. Must differ from api_key")
    swap_strategy: Literal["beside", "restart"] = Field(
        "beside", description="a drafter swap that needs a new engine: beside (start it next to the serving one, "
        "switch traffic, drain the old; needs memory for both) or restart (drain, stop, start the new one; requests "
        "arriving meanwhile wait for it)")
    capture_dir: Path | None = Field(
        None, description="capture served requests (prompts and completions: they are stored on disk, 0600) to "
        "rotating JSONL in this directory, for `vllm-lk adapt` / `vllm-lk train --data`; None: no capture")
    capture_rate: float = Field(1.0, gt=0, le=1, description="share of requests captured (sampled per request)")
    capture_max_mib: float = Field(256.0, gt=0, description="most MiB the capture directory holds (oldest files deleted)")
    served_model_name: str | None = Field(
        None, description="model id clients send (default: the target's Hugging Face id when given as one, else its directory name)")
    open_metrics: bool = Field(True, description="serve /metrics and /dashboard without the API key")
    max_queue: int = Field(
        256, ge=1, description="most requests admitted at once (running + waiting in the engine); "
        "one more is refused with 429 and Retry-After instead of piling up")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with a 429")
    request_timeout_s: float = Field(600.0, gt=0, description="a request still generating after this long is aborted")
    drain_timeout_s: float = Field(30.0, ge=0, description="on shutdown, how long in-flight requests may finish before they are aborted")
    window_s: float = Field(60.0, gt=0, description="length of the rolling window behind the vllm_lk_window_* gauges")
    dashboard_horizon_s: float = Field(900.0, gt=0, description="how far back /dashboard/data reaches")
    dashboard_bucket_s: float = Field(5.0, gt=0, description="time resolution of /dashboard/data")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="vLLM AsyncEngineArgs overrides (tensor_parallel_size, max_model_len, dtype, "
        "gpu_memory_utilization, ...); they win over the CPU defaults")
    log_level: str = Field("info", description="uvicorn log level")
    access_log: bool = Field(False, description="uvicorn access log (one line per request)")

    @model_validator(mode="after")
    def _one_key_source(self) -> ServerConfig:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("give api_key or api_key_file, not both")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        if self.admin_key is not None and not self.admin_key:
            raise ValueError("admin_key must not be empty")
        for key in ("model", "speculative_config", "per_request_spec_decode_metrics", "served_model_name"):
            if key in self.engine_args:
                raise ValueError(f"engine_args may not set {key!r}: it is set from the server config")
        return self

    def resolved_api_key(self) -> str | None:
        """The key from ``api_key`` or the first line of ``api_key_file``; a file keeps the key out
        of the process list and shell history."""
        if self.api_key_file is None:
            return self.api_key
        lines = Path(self.api_key_file).read_text().splitlines()
        key = lines[0].strip() if lines else ""
        if not key:
            raise InvalidInput(f"{self.api_key_file}: empty API key file")
        return key

    def resolved_admin_key(self) -> str | None:
        """``admin_key``, else the environment's ``VLLM_LK_ADMIN_KEY`` (None: no admin routes)."""
        key = self.admin_key if self.admin_key is not None else os.environ.get(ADMIN_KEY_ENV) or None
        if key is not None and key == self.resolved_api_key():
            raise InvalidInput("the admin key must differ from the API key: every client holds the API key")
        return key

    def model_name(self) -> str:
        """The id clients use in ``model``."""
        if self.served_model_name:
            return self.served_model_name
        if self.target is None:
            raise ValueError("target is not resolved")
        return Path(self.target).resolve().name
