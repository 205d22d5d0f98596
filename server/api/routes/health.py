from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from server.api.deps import State
from server.api.responses import Health, Loading, Ready

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", response_model=Ready, responses={503: {"model": Loading, "description": "the model is still loading"}})
async def ready(state: State) -> JSONResponse:
    if not state.ready or state.services is None:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ready", "model": state.services.resident.model_id,
                         "adapters": len(state.registry.names())})


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(state: State) -> Response:
    return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")
