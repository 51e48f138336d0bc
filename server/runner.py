"""Run the server: resolve the embedded defaults, build the app, serve it with uvicorn.

Without a target this serves the toy target (built on first use, cached); without a drafter, the
default LK-trained drafter for the toy target from ``training.toy.default_drafter`` (built on
first use in the background while the target already serves, then swapped in; cached). Any other target without a drafter is served without speculation (the default
drafter's recipe is for the toy target only), as it is when ``default_drafter`` is off.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from pathlib import Path

from server.config import ServerConfig
from vllm_lk.errors import MissingInput
from vllm_lk.hub import resolve_model, resolve_model_path

logger = logging.getLogger(__name__)


def _resolve_given(config: ServerConfig) -> dict:
    """Local directories for a target and drafter given as directories or Hugging Face ids (found in
    the local HF cache: vLLM is handed the snapshot directory and never goes online). A target
    given by id is served under that id, as `vllm serve ID` would, not its snapshot's commit hash."""
    updates: dict = {}
    if config.target is not None:
        source = resolve_model(config.target, kind="target")
        updates["target"] = source.path
        if source.repo_id and not config.served_model_name:
            updates["served_model_name"] = source.repo_id
    if config.drafter is not None:
        updates["drafter"] = resolve_model_path(config.drafter, kind="drafter")
    return updates


def resolve_defaults(config: ServerConfig) -> ServerConfig:
    """Fill in target and drafter (resolving Hugging Face ids, building the embedded defaults if needed)."""
    return _resolve(config, serve_first=False)[0]


def _resolve(config: ServerConfig, serve_first: bool) -> tuple[ServerConfig, Path | None]:
    """:func:`resolve_defaults`; with ``serve_first`` a default drafter that is not built yet is
    not built here: the config serves without it and the target it is for is returned (the
    server builds it in the background, server.drafter_build)."""
    updates = _resolve_given(config)
    target = updates.get("target", config.target)
    pending = None
    if target is None:
        from training.toy.target import SERVED_NAME, ToyTargetConfig, build_toy_target

        target = Path(build_toy_target(ToyTargetConfig())["path"])
        updates["target"] = target
        if not config.served_model_name:
            updates["served_model_name"] = SERVED_NAME
    if not (Path(target) / "config.json").is_file():
        raise MissingInput(f"{target} is not a HF model directory (no config.json)")
    if config.drafter is None and config.default_drafter:
        try:
            from training.toy import default_drafter
            from training.toy.target import METADATA_FILE
        except ImportError:
            logger.warning("no default drafter available (training.toy.default_drafter missing): serving without speculation")
            return (config.model_copy(update=updates) if updates else config), None
        if not (Path(target) / METADATA_FILE).is_file():
            # the default drafter is trained on stdlib prompts, on this machine's CPU: right for the toy
            # target, wrong for a served model (hours in fp32, and the wrong data)
            logger.warning(
                "no --drafter for %s: serving without speculation. Train one for the traffic you serve "
                "(docs/training.md: `vllm-lk generate` then `vllm-lk train`, on the GPU) and pass --drafter RUN_DIR",
                target)
        else:
            cached = default_drafter.cached_default_drafter(Path(target)) if serve_first else None
            if serve_first and cached is None:
                pending = Path(target)
            else:
                updates["drafter"] = cached or Path(default_drafter.ensure_default_drafter(Path(target)))
            if config.num_speculative_tokens is None:
                updates["num_speculative_tokens"] = getattr(default_drafter, "SERVED_K", None)
    return (config.model_copy(update=updates) if updates else config), pending


async def _watch(server, state) -> None:
    """Stop serving when the engine fails (at start or later): a dead engine cannot recover, and an
    exit lets a supervisor restart the process."""
    while not server.should_exit:
        if state.engine_dead:
            logger.error("engine failed: shutting the server down")
            server.should_exit = True
        await asyncio.sleep(0.5)


async def _serve(server, state) -> int:
    watcher = asyncio.create_task(_watch(server, state))
    try:
        await server.serve()
    finally:
        watcher.cancel()
    return 1 if state.engine_dead else 0


def serve(config: ServerConfig) -> int:
    """Serve until SIGINT/SIGTERM (then drain); returns the process exit status."""
    import uvicorn

    from server.app import create_app
    from server.engine import build_engine, resolve_spec

    config, pending = _resolve(config, serve_first=True)
    spec = resolve_spec(config)
    build = None
    if pending is not None:
        from server.drafter_build import DefaultDrafterBuild

        build = DefaultDrafterBuild(pending, num_speculative_tokens=config.num_speculative_tokens)
    app = create_app(config, partial(build_engine, config, spec), spec=spec, drafter_build=build)
    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.log_level, access_log=config.access_log,
        timeout_graceful_shutdown=config.drain_timeout_s,
    )
    server = uvicorn.Server(uv_config)
    logger.info("serving %s (drafter %s) on http://%s:%d/v1", config.target, spec.drafter or "none",
                config.host, config.port)
    with asyncio.Runner(loop_factory=uv_config.get_loop_factory()) as runner:
        return runner.run(_serve(server, app.state.server))
