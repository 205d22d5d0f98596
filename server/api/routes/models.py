from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.deps import ReadyState
from server.api.http_errors import MODEL_RESPONSES, READY_RESPONSES
from server.api.responses import ModelCard, ModelList
from server.engine.errors import AdapterNotFound
from server.engine.registry import AdapterVersion
from server.state import Services

router = APIRouter(tags=["models"])


def load_state(v: AdapterVersion, state: Services) -> str:
    """Where the version's factors are: a compute slot, host memory, or only the store (a read of
    the engine thread's slot table from the event loop: a moment's answer, never a lock)."""
    if state.engine.slots.slot_of(v) is not None:
        return "slot"
    return state.registry.host.state(v)


@router.get("/v1/models", responses=READY_RESPONSES, response_model=ModelList, response_model_exclude_unset=True)
async def list_models(state: ReadyState) -> dict:
    base, ctx = state.resident.model_id, state.resident.max_positions
    data = [{"id": base, "object": "model", "created": 0, "owned_by": "switchboard", "root": base, "parent": None,
             "max_model_len": ctx, "dtype": str(state.resident.dtype).removeprefix("torch."),
             "quantization": state.resident.quant}]
    if state.routing and state.routing.router_names():
        data.append({"id": "auto", "object": "model", "created": 0, "owned_by": "switchboard", "root": base,
                     "parent": base, "max_model_len": ctx, "routers": state.routing.router_names(),
                     "reroute_every": state.settings.routing.reroute_every})
    routable = state.routing.routable_names() if state.routing else set()
    for name, v in sorted(state.registry.snapshot().items()):
        data.append({"id": name, "object": "model", "created": int(v.created), "owned_by": "switchboard",
                     "root": str(v.weights.path.name), "parent": base, "max_model_len": ctx, "version": v.version,
                     "rank": v.weights.rank, "target_modules": v.weights.target_modules,
                     "routable": name in routable, "load_state": load_state(v, state)})
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id:path}", responses=MODEL_RESPONSES, response_model=ModelCard,
            response_model_exclude_unset=True)
async def retrieve_model(model_id: str, request: Request, state: ReadyState) -> dict:
    """One entry of the list (OpenAI's `models.retrieve`); 404 in OpenAI's shape otherwise. The id
    is taken from the raw path: the route's pattern ends in `$`, which in Python's `re` also
    matches before a final newline, so `/v1/models/a1%0A` would otherwise be answered as `a1`."""
    model_id = request.scope["path"].removeprefix("/v1/models/")
    for entry in (await list_models(state))["data"]:
        if entry["id"] == model_id:
            return entry
    raise AdapterNotFound(f"The model {model_id!r} does not exist", param="model")
