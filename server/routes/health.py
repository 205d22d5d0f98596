from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from server.deps import State

router = APIRouter(tags=["health"])


@router.api_route("/health", methods=["GET", "HEAD"])
async def health() -> dict:
    return {"status": "ok"}


@router.api_route("/ready", methods=["GET", "HEAD"])
async def ready(state: State) -> JSONResponse:
    if not state.ready or state.services is None:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ready", "model": state.services.resident.model_id,
                         "adapters": len(state.registry.names())})


@router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")
