"""Bearer API keys for /v1/*, tokenize and inspection (health, ready and metrics stay open).

Routes declare that they need a key with the `require_api_key` dependency (which also puts the bearer
scheme in the OpenAPI schema); guards.ApiKeyGate enforces the same check on those routes before their
body is read, so a client without a key learns nothing about body validation and cannot hold a slow body.
"""

from __future__ import annotations

import secrets

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from service.errors import APIError

_bearer = HTTPBearer(auto_error=False, description="one of the server's --api-key values, when any are set")


def key_error(offered: str | None, keys: list[str]) -> APIError | None:
    """The 401 for a request that offered this bearer token (None: no bearer token), or None if it may pass."""
    if not keys:
        return None
    if offered is None:
        return APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})
    # compare_digest against every key: no early exit that would leak which prefix matched
    if not any([secrets.compare_digest(offered.encode(), key.encode()) for key in keys]):
        return APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, else None."""
    scheme, token = get_authorization_scheme_param(authorization)  # what HTTPBearer reads
    return token if scheme.lower() == "bearer" and token else None


async def require_api_key(request: Request,
                          credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """401 unless the server has no keys or the request carries one of them."""
    error = key_error(credentials.credentials if credentials is not None else None,
                      request.app.state.kvserve.settings.api_keys)
    if error is not None:
        raise error
