"""Annotated dependencies: the app state, readiness, and the admin bearer token.

They are `async def` although nothing in them awaits: FastAPI runs a plain `def` dependency in
its thread pool, one hop to a worker thread and back per dependency and request (two for every
admin route), for a few attribute reads. On the event loop they cost microseconds."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from server.api.http_errors import AuthError, Forbidden
from server.engine.errors import Unavailable
from server.state import AppState, Services, app_state


async def get_state(request: Request) -> AppState:
    return app_state(request.app)


async def get_services(request: Request) -> Services:
    state = app_state(request.app)
    if not state.ready or state.services is None:
        raise Unavailable("the model is still loading")
    return state.services


async def require_admin(request: Request) -> None:
    token = app_state(request.app).settings.server.admin_token
    if not token:
        raise Forbidden("the admin API is disabled: start the server with --admin-token (SWITCHBOARD_ADMIN_TOKEN)")
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise AuthError("admin routes need `Authorization: Bearer <admin token>`")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Forbidden("invalid admin token")


State = Annotated[AppState, Depends(get_state)]
ReadyState = Annotated[Services, Depends(get_services)]
Admin = Annotated[None, Depends(require_admin)]
