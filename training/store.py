"""The adapter store on disk, as training writes it, and base-model loading.

Layout (docs/architecture.md, "The adapter store"): ``<store>/<name>/`` is a PEFT LoRA folder
plus ``switchboard.json``, ``centroid.safetensors`` and, from this package,
``examples.jsonl`` (a sample of training prompts, so centroids can be refitted with
another embedder later) and ``controller.jsonl`` (the Unified LoRA controller log, when
used). Routers live in ``<store>/_routers/<name>/``. Scratch space (Trainer checkpoints)
goes to ``<store>/.work/<name>/``: a dot-folder is not a valid adapter name, so the
server's rescan never mistakes it for an adapter.

A finished adapter is written to a temporary sibling folder and renamed into place, so
a server rescanning the store never sees a half-written adapter.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from router_core import store_rules
from router_core.store_rules import (
    ADAPTER_CONFIG,
    CENTROID_FILE,
    CONTROLLER_LOG,
    EXAMPLES_FILE,
    META_FILE,
    ROUTERS_DIR,
    WORK_DIR,
    StoreRuleError,
)

log = logging.getLogger(__name__)

__all__ = [  # the store's rules, re-exported for this package's modules
    "ADAPTER_CONFIG", "CENTROID_FILE", "CONTROLLER_LOG", "EXAMPLES_FILE", "META_FILE", "ROUTERS_DIR", "WORK_DIR",
]


class TrainingError(RuntimeError):
    """A user-facing failure: the CLI prints the message and exits non-zero, no traceback."""


def check_name(name: str) -> str:
    """The store's name rule (`router_core.store_rules`), failing as a one-line CLI error."""
    try:
        return store_rules.check_name(name)
    except StoreRuleError as exc:
        raise TrainingError(str(exc)) from None


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def pick_device(device: str = "auto") -> torch.device:
    """``--device``, resolved by the store's rule (``auto`` is CUDA when there is one)."""
    try:
        return store_rules.resolve_device(device)
    except StoreRuleError as exc:
        raise TrainingError(f"--device: {exc}") from None


def load_base(model_id: str, device: torch.device | None = None) -> tuple[Any, Any]:
    """Load the base causal LM and its tokenizer from a hub id (cache) or a local folder.

    ``trust_remote_code=False`` always: a base model is data, not code. Offline and not
    cached, the error names both ways out instead of a long hub traceback.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=False, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise TrainingError(
            f"cannot load base model {model_id!r}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}\n"
            f"Pass --base-model as either a local folder holding config.json, the weights and the tokenizer "
            f"(e.g. one written by save_pretrained), or a Hugging Face hub id that is already in the local "
            f"cache (HF_HOME); nothing is downloaded while offline."
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)  # type: ignore[arg-type]
    return model.eval(), tokenizer


def read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TrainingError(f"{path}: not valid JSON ({exc.msg})") from exc


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file and ``os.replace`` so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(
        json.dumps(data, indent=2, ensure_ascii=False, default=_json_default) + "\n", encoding="utf-8"
    )
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def list_adapters(store: Path) -> list[str]:
    """Names of the adapter folders in ``store`` (those with an ``adapter_config.json``)."""
    if not store.is_dir():
        return []
    return sorted(
        p.name
        for p in store.iterdir()
        if p.is_dir() and store_rules.name_is_valid(p.name) and (p / ADAPTER_CONFIG).is_file()
    )


def adapter_folder(store: Path, name: str) -> Path:
    folder = store / check_name(name)
    if not (folder / ADAPTER_CONFIG).is_file():
        known = ", ".join(list_adapters(store)) or "none"
        raise TrainingError(f"no adapter {name!r} in {store} (adapters there: {known})")
    return folder


def next_version(store: Path, name: str) -> int:
    meta = read_meta(store / name) if (store / name).is_dir() else {}
    try:
        return int(meta.get("version", 0)) + 1
    except (TypeError, ValueError):
        return 1


def work_dir(store: Path, name: str) -> Path:
    return store / WORK_DIR / name


def make_readable(folder: Path) -> None:
    """``mkstemp`` files are 0600; the server may run as another user, so files become 0644."""
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o644)


@contextmanager
def staged_folder(store: Path, name: str):
    """Yield a temporary folder; on success it replaces ``store/name`` in two renames."""
    store.mkdir(parents=True, exist_ok=True)
    tmp = store / f".staging-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    make_readable(tmp)
    final = store / name
    old = None
    if final.exists():
        old = store / f".old-{name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
