"""GET /health (liveness), GET /ready (readiness) and GET /version, without authentication.

Liveness stays 200 while the engine is still loading (a long load is not a hang, and an
orchestrator that restarted it would never let it finish); it turns 503 only once the engine has
failed. Readiness is 200 only while requests can be served: engine up, not draining.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.errors import APIError, error_response
from server.routes.common import server_state
from server.schemas import ErrorResponse

router = APIRouter()


@router.get("/health", summary="Liveness", responses={503: {"model": ErrorResponse, "description": "engine failed"}})
async def health(request: Request):
    state = server_state(request)
    if state.engine_dead:
        return error_response(APIError(503, "the engine has failed", code="engine_dead"))
    return JSONResponse({"status": "ok"})


@router.get("/ready", summary="Readiness",
            responses={503: {"model": ErrorResponse, "description": "starting, draining, or engine failed"}})
async def ready(request: Request):
    state = server_state(request)
    try:
        state.require_ready()
    except APIError as err:
        return error_response(err)
    body = {"status": "ready", "model": state.model_name}
    if state.drafter_build is not None:
        body["drafter_build"] = state.drafter_build  # serving without speculation until it is swapped in
    return JSONResponse(body)


@router.get("/version", summary="vLLM's version (as vLLM's server reports it) and vllm-lk's")
async def version():
    import vllm

    from vllm_lk import __version__

    return JSONResponse({"version": vllm.__version__, "vllm_lk": __version__})
