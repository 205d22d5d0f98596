from __future__ import annotations

from fastapi import APIRouter

from server.api_errors import READY_RESPONSES
from server.deps import ReadyState

router = APIRouter(tags=["models"])


@router.get("/v1/models", responses=READY_RESPONSES)
async def list_models(state: ReadyState) -> dict:
    base = state.resident.model_id
    data = [{"id": base, "object": "model", "created": 0, "owned_by": "switchboard", "root": base, "parent": None}]
    if state.routing and state.routing.router_names():
        data.append({"id": "auto", "object": "model", "created": 0, "owned_by": "switchboard", "root": base,
                     "parent": base, "routers": state.routing.router_names()})
    routable = state.routing.routable_names() if state.routing else set()
    for name, v in sorted(state.registry.snapshot().items()):
        data.append({"id": name, "object": "model", "created": int(v.created), "owned_by": "switchboard",
                     "root": str(v.weights.path.name), "parent": base, "version": v.version,
                     "rank": v.weights.rank, "target_modules": v.weights.target_modules,
                     "routable": name in routable})
    return {"object": "list", "data": data}
