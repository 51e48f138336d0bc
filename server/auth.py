"""Bearer-key authentication.

One shared key, as the OpenAI API uses: ``Authorization: Bearer KEY``. The comparison is
constant-time (``hmac.compare_digest`` on bytes), so response timing does not reveal how much of a
guessed key was right. Liveness and readiness stay open for orchestrators; /metrics and the
dashboard are open unless ``open_metrics`` is off. Declared through FastAPI's ``HTTPBearer`` so
the OpenAPI document states the scheme (clients and the schema fuzzer read it from there).
"""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import APIError

bearer = HTTPBearer(auto_error=False, description="the server's API key (when it has one)")


def check_key(expected: str | None, presented: str | None) -> bool:
    """True when no key is configured, or ``presented`` equals it (constant time)."""
    if expected is None:
        return True
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


async def require_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    """FastAPI dependency for the protected routes."""
    expected = request.app.state.server.api_key
    if expected is None:
        return
    if credentials is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if not check_key(expected, credentials.credentials):
        raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def require_key_unless_open(request: Request,
                                  credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    """For /metrics and /dashboard: open when ``open_metrics`` is on, else like :func:`require_key`."""
    if request.app.state.server.config.open_metrics:
        return
    await require_key(request, credentials)
