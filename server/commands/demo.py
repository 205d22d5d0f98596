"""`switchboard demo`: from a fresh install to a routed completion in one command.

It loads the base model, and when the store holds nothing `model: "auto"` can route over it trains
the starter adapters (code, prose, math) from the data shipped in the package, then serves with
`auto` routing and prints where to go next. A second run finds the adapters and trains nothing.

The check reads files only (adapter folders, their metadata, centroids, the store's manifest), so
deciding costs nothing; what the server later loads is the same set, by the same rules.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from router_core.artifacts import ArtifactError, load_centroids
from server.engine.base_model import ResidentModel
from server.settings import Settings
from server.store.manifest import Manifest

log = logging.getLogger(__name__)
STARTERS = ("code", "prose", "math")


def _store_adapters(store: Path, scan: bool = True) -> dict[str, Path]:
    """What the server registers at start: the manifest's adapters, or every adapter folder when
    there is no manifest and `scan` (`--scan-on-start`, see `AdapterService.reload`)."""
    manifest = Manifest(store)
    if manifest.exists:
        return {name: store / entry["path"] for name, entry in manifest.adapters.items()}
    if not scan or not store.is_dir():
        return {}
    return {p.name: p for p in sorted(store.iterdir())
            if p.is_dir() and not p.name.startswith((".", "_")) and (p / "adapter_config.json").is_file()}


def _fingerprint(folder: Path) -> str | None:
    try:
        return json.loads((folder / "switchboard.json").read_text(encoding="utf-8")).get("base_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def routable_adapters(store: Path, resident: ResidentModel, embedder: str, scan: bool = True) -> list[str]:
    """Adapters in `store` that `auto` will route over once served with `embedder`: trained for this
    base model, with example prompts (a centroid is computed from them at load) or a stored centroid
    in a matching space (for `base`: a base-family centroid of the model's width)."""
    out = []
    for name, folder in sorted(_store_adapters(store, scan).items()):
        fp = _fingerprint(folder)
        if not (folder / "adapter_config.json").is_file() or (fp and fp != resident.fingerprint):
            continue
        if (folder / "examples.jsonl").is_file():
            out.append(name)
            continue
        try:
            centroids, embedder_id = load_centroids(folder / "centroid.safetensors")
        except (ArtifactError, OSError):
            continue
        is_base = embedder_id.split(":", 1)[0] == "base"
        if embedder == "base":
            ok = is_base and centroids.shape[-1] == resident.model.config.n_embd
        else:
            ok = not is_base
        if ok:
            out.append(name)
    return out


def prepare_store(settings: Settings, resident: ResidentModel, quick: bool) -> list[str]:
    """Train the starter adapters when the store has nothing routable (or only some of the starters,
    as an interrupted first run leaves it); returns the routable names."""
    store = settings.store.adapter_dir
    scan = settings.store.scan_on_start
    routable = routable_adapters(store, resident, settings.routing.embedder, scan)
    present = _store_adapters(store)
    if routable and not set(routable) <= set(STARTERS):
        missing: list[str] = []  # the user's own adapters: serve them as they are
    else:
        missing = [n for n in STARTERS if n not in routable]
    if not missing:
        log.info("using %d routable adapter(s) already in %s: %s (nothing to train)", len(routable), store,
                 ", ".join(routable))
        return routable
    taken = [n for n in missing if n in present or (store / n).exists()]
    if taken:
        raise SystemExit(f"switchboard demo: {store} already holds {', '.join(taken)}, which `auto` cannot route "
                         "for this base model; pass --adapter-dir with an empty folder for the starter adapters")
    try:
        from training.starter import train_starters
    except ImportError as e:  # the serving image may leave the train extra out
        raise SystemExit(f"switchboard demo: training the starter adapters needs the train extra "
                         f"(pip install 'lora-switchboard[train]'): {e}") from e

    embedder = settings.routing.embedder
    if embedder == "base":
        embedder = f"base:{settings.routing.route_window}"  # the window the server routes on
    train_starters(store, settings.model.base_model, names=missing, quick=quick, device=settings.model.device,
                   embedder=embedder)
    manifest = Manifest(store)
    if manifest.exists or not settings.store.scan_on_start:  # what the server restores at start
        for name in missing:
            manifest.set_adapter(name, name, False)
    return routable_adapters(store, resident, settings.routing.embedder, scan)


def python_command() -> str:
    """The interpreter running this server, as the user would type it: relative to the current
    folder when inside it (`.venv/bin/python`, where the openai package is installed; a bare
    `python` may be another interpreter), else its full path."""
    rel = os.path.relpath(sys.executable)
    return rel if not rel.startswith("..") else sys.executable


def banner(settings: Settings, adapters: list[str]) -> str:
    host = settings.server.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{host}:{settings.server.port}"
    body = json.dumps({"model": "auto", "prompt": "def fibonacci(n):", "max_tokens": 32,
                       "routing": {"reroute_every": 2}})
    return f"""
Switchboard is serving {settings.model.base_model} with `auto` routing over {', '.join(adapters)}.

  Playground: {url}/playground
  Models:     curl -s {url}/v1/models

  curl -s {url}/v1/completions -H 'content-type: application/json' \\
    -d '{body}'

  {python_command()} -c 'from openai import OpenAI  # pip install openai
  c = OpenAI(base_url="{url}/v1", api_key="none").completions.create(
      model="auto", prompt="Natalia sold 48 clips in April.", max_tokens=32)
  print(c.choices[0].text); print(c.choices[0].model_extra["routing"])'

Press Ctrl+C to stop.
"""


def run(settings: Settings, resident: ResidentModel, quick: bool) -> int:
    """Prepare the store, then serve until interrupted; the banner prints once the server is ready."""
    import torch
    import uvicorn

    from server.app import create_app
    from training.data import DataError
    from training.store import TrainingError

    if settings.engine.torch_threads:  # training runs under the same thread budget as serving
        torch.set_num_threads(settings.engine.torch_threads)
    try:
        adapters = prepare_store(settings, resident, quick)
    except (TrainingError, DataError) as e:
        sys.stderr.write(f"switchboard demo: {e}\n")
        return 2
    if not adapters:
        sys.stderr.write("switchboard demo: training finished but no adapter in the store is routable\n")
        return 1
    text = banner(settings, adapters)

    class DemoServer(uvicorn.Server):
        async def startup(self, sockets=None) -> None:  # noqa: ANN001 (uvicorn's signature)
            await super().startup(sockets)
            if not self.should_exit:
                log.info("%s", text)

    app = create_app(settings, resident=resident)
    config = uvicorn.Config(app, host=settings.server.host, port=settings.server.port,
                            log_level=settings.server.log_level.lower())
    DemoServer(config).run()
    return 0
