"""The store's manifest: what was registered through the admin API, restored on the next start.

One small JSON file, `<store>/_manifest.json`, rewritten atomically (temp file + rename) after
every change, so a crash mid-write leaves the previous manifest, never half of one. Several
servers may share a store (`--watch-store`): every change re-reads the file under an advisory
lock (`<store>/.manifest.lock`) and applies itself to what is there, so changes made through two
servers to different names both survive instead of the last writer's view winning.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: the in-process lock alone
    fcntl = None  # type: ignore[assignment]

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

    def _read(self, quiet: bool = False) -> bool:
        try:
            data = json.loads(self.path.read_text())
            adapters = {str(a["name"]): {"path": str(a["path"]), "pinned": bool(a.get("pinned", False))}
                        for a in data.get("adapters", [])}
            routers = {str(r["name"]): str(r["path"]) for r in data.get("routers", [])}
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            if not quiet:
                log.warning("ignoring unreadable %s: %s", self.path, e)
            self.exists = False
            return False
        self.adapters, self.routers, self.exists = adapters, routers, True
        return True

    def refresh(self) -> bool:
        """Re-read the file (another server may have changed it). False, keeping what was known, when
        there is no readable manifest: an atomic rename never shows half a file, so that means it
        is missing or broken, and a watcher must not take it for "no adapters"."""
        with self._lock:
            return self.path.exists() and self._read(quiet=True)

    @contextmanager
    def _update(self) -> Iterator[None]:
        """Read-modify-write under the in-process lock and the store's advisory file lock."""
        with self._lock:
            if not self.path.parent.is_dir():
                yield
                return
            with open(self.path.parent / ".manifest.lock", "a") as lock:
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                if self.path.exists():
                    self._read()
                yield
                self._write()

    def set_adapter(self, name: str, path: str, pinned: bool) -> None:
        with self._update():
            self.adapters[name] = {"path": path, "pinned": pinned}

    def drop_adapter(self, name: str) -> None:
        with self._update():
            self.adapters.pop(name, None)

    def set_router(self, name: str, path: str) -> None:
        with self._update():
            self.routers[name] = path

    def drop_router(self, name: str) -> None:
        with self._update():
            self.routers.pop(name, None)

    def _write(self) -> None:
        body = {"adapters": [{"name": n, **a} for n, a in sorted(self.adapters.items())],
                "routers": [{"name": n, "path": p} for n, p in sorted(self.routers.items())]}
        tmp = self.path.with_name(f".{MANIFEST}.tmp")
        tmp.write_text(json.dumps(body, indent=2))
        os.replace(tmp, self.path)
        self.exists = True
