"""Bearer API keys for /v1/*, tokenize and inspection (health, ready and metrics stay open)."""

from __future__ import annotations

import secrets

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import APIError

_bearer = HTTPBearer(auto_error=False, description="one of the server's --api-key values, when any are set")


async def require_api_key(request: Request,
                          credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """401 unless the server has no keys or the request carries one of them."""
    keys: list[str] = request.app.state.kvserve.settings.api_keys
    if not keys:
        return
    if credentials is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    offered = credentials.credentials.encode()
    # compare_digest against every key: no early exit that would leak which prefix matched
    if not any([secrets.compare_digest(offered, key.encode()) for key in keys]):
        raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
