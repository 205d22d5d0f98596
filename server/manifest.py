"""The store's manifest: what was registered through the admin API, restored on the next start.

One small JSON file, `<store>/_manifest.json`, rewritten atomically (temp file + rename) after
every change, so a crash mid-write leaves the previous manifest, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from router_core.store_rules import MANIFEST_FILE as MANIFEST

log = logging.getLogger(__name__)


class Manifest:
    def __init__(self, store: Path) -> None:
        self.path = store / MANIFEST
        self._lock = threading.Lock()
        self.adapters: dict[str, dict] = {}  # name -> {"path", "pinned"}
        self.routers: dict[str, str] = {}  # name -> path
        self.exists = self.path.exists()
        if self.exists:
            self._read()

    def _read(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            self.adapters = {str(a["name"]): {"path": str(a["path"]), "pinned": bool(a.get("pinned", False))}
                             for a in data.get("adapters", [])}
            self.routers = {str(r["name"]): str(r["path"]) for r in data.get("routers", [])}
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            log.warning("ignoring unreadable %s: %s", self.path, e)
            self.exists = False

    def set_adapter(self, name: str, path: str, pinned: bool) -> None:
        with self._lock:
            self.adapters[name] = {"path": path, "pinned": pinned}
            self._write()

    def drop_adapter(self, name: str) -> None:
        with self._lock:
            self.adapters.pop(name, None)
            self._write()

    def set_router(self, name: str, path: str) -> None:
        with self._lock:
            self.routers[name] = path
            self._write()

    def drop_router(self, name: str) -> None:
        with self._lock:
            self.routers.pop(name, None)
            self._write()

    def _write(self) -> None:
        if not self.path.parent.is_dir():
            return
        body = {"adapters": [{"name": n, **a} for n, a in sorted(self.adapters.items())],
                "routers": [{"name": n, "path": p} for n, p in sorted(self.routers.items())]}
        tmp = self.path.with_name(f".{MANIFEST}.tmp")
        tmp.write_text(json.dumps(body, indent=2))
        os.replace(tmp, self.path)
        self.exists = True
