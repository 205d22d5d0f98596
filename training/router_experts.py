"""Publishing experts updated by the router's expert/joint phases back into the store.

Kept apart from :mod:`training.router` because it is the only step of router training that
rewrites adapters. Each expert gets a new folder (same name, version + 1) holding its new
LoRA tensors plus the files of the old version that still apply (prompt sample, centroids,
controller log), swapped in atomically so a server rescan sees the old or the new version.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from training.store import (
    CENTROID_FILE,
    CONTROLLER_LOG,
    EXAMPLES_FILE,
    META_FILE,
    now_iso,
    read_meta,
    staged_folder,
    write_json,
)

CARRIED_FILES = (EXAMPLES_FILE, CENTROID_FILE, CONTROLLER_LOG, "README.md")


def republish_experts(
    cfg: Any, mixture: Any, folders: dict[str, Path], phase_history: list
) -> dict[str, int]:
    """Write every expert of ``mixture`` back to ``folders``; returns ``{name: new version}``."""
    versions: dict[str, int] = {}
    for name, folder in folders.items():
        meta = read_meta(folder)
        version = int(meta.get("version", 0) or 0) + 1
        with staged_folder(cfg.adapter_dir, name) as tmp:
            mixture.save_adapter(name, tmp)
            for fname in CARRIED_FILES:
                if (folder / fname).is_file():
                    shutil.copyfile(folder / fname, tmp / fname)
            meta.update({"name": name, "version": version})
            meta.setdefault("created", now_iso())
            meta["updated"] = now_iso()
            meta.setdefault("training", {})["router_phases"] = {
                "router": cfg.name,
                "phases": list(cfg.phases),
                "phase_history": phase_history,
                "expert_lr": cfg.expert_lr,
                "co_trained_with": [n for n in folders if n != name],
            }
            write_json(tmp / META_FILE, meta)
        versions[name] = version
    return versions
