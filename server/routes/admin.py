"""The admin routes, only when the server has an admin key (``--admin-key`` or
``VLLM_LK_ADMIN_KEY``): ``POST /admin/drafter`` swaps the served drafter live, ``GET
/admin/drafter`` shows what is served and how the last swap went.

The admin key is not the API key (every client holds that one): a missing key is a 401, a wrong
one a 403, and every admin call is written to the log with its caller and outcome.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials

from server.auth import bearer, check_key
from server.errors import APIError
from server.routes.common import server_state
from server.schemas import DrafterSwapRequest, ErrorResponse

logger = logging.getLogger("server.audit")


def _caller(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "unknown"


async def require_admin_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    expected = server_state(request).admin_key
    if credentials is None:
        logger.warning("admin: %s %s from %s refused: no key", request.method, request.url.path, _caller(request))
        raise APIError(401, "missing admin key: send 'Authorization: Bearer ADMIN_KEY'", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if not check_key(expected, credentials.credentials):
        logger.warning("admin: %s %s from %s refused: wrong key", request.method, request.url.path, _caller(request))
        raise APIError(403, "this key may not use the admin routes", code="forbidden")


ADMIN_ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "the drafter directory is refused (the message names the problem); the served drafter is unchanged",
    401: "missing admin key", 403: "wrong admin key", 409: "another swap is running",
    503: "the engine is not ready"}.items()}

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin_key)], tags=["admin"])


def _served(request: Request) -> dict:
    state = server_state(request)
    return {"drafter": state.spec.drafter, "identity": state.drafter_identity, "method": state.spec.method,
            "num_speculative_tokens": state.spec.num_speculative_tokens, "swaps": state.swaps}


@router.post("/drafter", responses=ADMIN_ERRORS, summary="Swap the served drafter (in place, or with a new engine)")
async def swap_drafter(body: DrafterSwapRequest, request: Request) -> dict:
    caller = _caller(request)
    logger.info("admin: drafter swap to %s (mode %s) requested by %s", body.path, body.mode, caller)
    try:
        record = await request.app.state.swapper.swap(body.path, body.mode, body.method, body.num_speculative_tokens)
    except APIError as err:
        logger.warning("admin: drafter swap to %s by %s refused (%d): %s", body.path, caller, err.status, err.message)
        raise
    logger.info("admin: drafter swap to %s by %s done: %s", body.path, caller, record["how"])
    return {"swap": record, "served": _served(request)}


@router.get("/drafter", responses=ADMIN_ERRORS, summary="The served drafter and the state of the last swap")
async def drafter_status(request: Request) -> dict:
    return {"served": _served(request), "swap": server_state(request).swap_status}
