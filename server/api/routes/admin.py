"""Admin routes (bearer token): adapters, routers, store rescan, and vLLM's LoRA aliases."""

from __future__ import annotations

from fastapi import APIRouter

from router_core.centroid import fit_centroids
from server.api.deps import Admin, ReadyState
from server.api.http_errors import ADMIN_RESPONSES
from server.api.responses import (
    AdapterList,
    AdapterLoaded,
    AdapterUnloaded,
    ReloadReport,
    RouterList,
    RouterLoaded,
    RouterUnloaded,
    VLLMAdapterLoaded,
    VLLMAdapterUnloaded,
)
from server.api.schemas import LoadAdapterRequest, RouterLoadRequest, VLLMLoadRequest, VLLMUnloadRequest
from server.engine.adapter_weights import AdapterWeights
from server.engine.errors import InvalidRequest
from server.engine.registry import AdapterVersion
from server.serving import validation
from server.state import Services
from server.store.adapters import SAVE, AdapterService
from server.store.example_centroids import form_of as example_form

router = APIRouter(tags=["admin"])


def describe(v: AdapterVersion, state: Services) -> dict:
    w = v.weights
    slot = state.engine.slots.slot_of(v) if state.engine else None
    return {
        "name": v.name, "version": v.version, "path": w.path.name, "rank": w.rank, "alpha": w.alpha,
        "scale": w.scale, "target_modules": w.target_modules, "pinned": v.pinned, "resident": slot is not None,
        "load_state": "slot" if slot is not None else state.registry.host.state(v),
        "in_flight": v.refcount, "bytes": w.nbytes, "centroids": None if w.centroids is None else list(w.centroids.shape),
        "centroid_embedder": w.centroid_embedder, "meta": {k: w.meta[k] for k in ("description", "domain", "version") if k in w.meta},
    }


def _centroids_from(examples: list[str] | None, k: int, state: Services):
    """A `prepare` hook: embed `examples` with the active embedder and save the centroid beside the adapter."""
    if not examples:
        return None
    if any(not isinstance(t, str) or not t.strip() for t in examples):
        raise InvalidRequest("examples must be non-empty strings", param="examples")
    limit = state.settings.server.max_prompt_chars
    for text in examples:
        validation.check_text(text, "examples")
        if len(text) > limit:
            raise validation.PayloadTooLarge(f"an example has {len(text)} characters; the limit is {limit}", param="examples")

    async def prepare(weights: AdapterWeights) -> str:
        emb = await state.routing.embed_examples(examples, state.engine_call)  # [n, d]
        centroid = fit_centroids(emb.float().cpu(), k=k)  # [min(k, n), d] unit rows (the mean when k == 1)
        weights.centroids, weights.centroid_embedder = centroid.cpu(), state.routing.embedder_id
        weights.example_form = await example_form(state.routing, weights.name, examples)
        return SAVE  # with the registration, all or nothing (AdapterService.derived_path says where)

    return prepare


async def _load(state: Services, name: str, path: str, examples=None, k: int = 1, pinned=False,
                replace=True) -> dict:
    adapters: AdapterService = state.adapters
    new, old = await adapters.load(name, path, pinned=pinned, replace=replace,
                                   prepare=_centroids_from(examples, k, state))
    return {"status": "replaced" if old else "loaded", "adapter": describe(new, state),
            "replaced_version": old.version if old else None}


@router.get("/admin/adapters", responses=ADMIN_RESPONSES, response_model=AdapterList, response_model_exclude_unset=True)
async def list_adapters(_: Admin, state: ReadyState) -> dict:
    return {"adapters": [describe(v, state) for _, v in sorted(state.registry.snapshot().items())],
            "max_loras": state.settings.engine.max_loras}


@router.post("/admin/adapters", responses=ADMIN_RESPONSES, response_model=AdapterLoaded, response_model_exclude_unset=True)
async def load_adapter(body: LoadAdapterRequest, _: Admin, state: ReadyState) -> dict:
    return await _load(state, body.name, body.path, body.examples, body.centroids, body.pinned)


@router.delete("/admin/adapters/{name}", responses=ADMIN_RESPONSES, response_model=AdapterUnloaded, response_model_exclude_unset=True)
async def unload_adapter(name: str, _: Admin, state: ReadyState, wait: bool = True) -> dict:
    version = await state.adapters.unload(name, wait=wait, timeout=state.settings.engine.request_timeout)
    return {"status": "unloaded", "name": name, "version": version.version}


@router.post("/admin/reload", responses=ADMIN_RESPONSES, response_model=ReloadReport, response_model_exclude_unset=True)
async def reload_store(_: Admin, state: ReadyState) -> dict:
    report = await state.adapters.reload()
    failed_routers = state.routing.scan_routers()
    return {"loaded": report.loaded, "replaced": report.replaced, "unchanged": report.unchanged,
            "failed": report.failed, "routers": state.routing.router_names(), "failed_routers": failed_routers}


@router.get("/admin/routers", responses=ADMIN_RESPONSES, response_model=RouterList, response_model_exclude_unset=True)
async def list_routers(_: Admin, state: ReadyState) -> dict:
    centroid = state.routing._centroid
    return {"routers": [{"name": "centroid", "kind": "centroid", "adapters": list(centroid.adapter_names),
                         "temperature": centroid.temperature, "voting": centroid.voting,
                         "switch_margin": centroid.switch_margin,
                         "confidence_rate": centroid.confidence_map.rate if centroid.confidence_map else None,
                         "form": state.routing.form_status()},
                        {"name": "arrow", "kind": "arrow", "adapters": list(state.routing._arrow.adapter_names),
                         "top_k": state.routing._arrow.top_k, "temperature": state.routing._arrow.temperature}]
            + [{"name": n, "kind": "mlp", "adapters": list(r.adapter_names), "embedder": r.embedder_id,
                "confidence_rate": getattr(getattr(r, "confidence_map", None), "rate", None)}
               for n, r in sorted(state.routing.mlp.items())], "embedder": state.routing.embedder_id}


@router.post("/admin/routers", responses=ADMIN_RESPONSES, response_model=RouterLoaded, response_model_exclude_unset=True)
async def load_router(body: RouterLoadRequest, _: Admin, state: ReadyState) -> dict:
    r = state.routing.load_mlp(body.name, body.path)
    return {"status": "loaded", "name": body.name, "kind": r.kind, "adapters": list(r.adapter_names)}


@router.delete("/admin/routers/{name}", responses=ADMIN_RESPONSES, response_model=RouterUnloaded, response_model_exclude_unset=True)
async def unload_router(name: str, _: Admin, state: ReadyState) -> dict:
    state.routing.unload_mlp(name)
    return {"status": "unloaded", "name": name}


# -- vLLM-compatible aliases -------------------------------------------------------------------------------
@router.post("/v1/load_lora_adapter", responses=ADMIN_RESPONSES, response_model=VLLMAdapterLoaded, response_model_exclude_unset=True)
async def vllm_load(body: VLLMLoadRequest, _: Admin, state: ReadyState) -> dict:
    result = await _load(state, body.lora_name, body.lora_path, replace=body.load_inplace)
    return {**result, "message": f"Success: LoRA adapter '{body.lora_name}' added successfully."}


@router.post("/v1/unload_lora_adapter", responses=ADMIN_RESPONSES, response_model=VLLMAdapterUnloaded, response_model_exclude_unset=True)
async def vllm_unload(body: VLLMUnloadRequest, _: Admin, state: ReadyState) -> dict:
    await state.adapters.unload(body.lora_name, timeout=state.settings.engine.request_timeout)
    return {"status": "unloaded", "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}
