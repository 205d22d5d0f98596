"""Text embedders for routing: the resident model's own hidden states, or a sentence encoder.

Every embedder returns L2-normalised float32 rows, so a router only needs dot products for
cosine similarity and centroids computed by one component compare with embeddings from another.
Nothing here reads files: models arrive already loaded (see `router_core.artifacts`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HiddenFn = Callable[[Tensor, Tensor], Any]

_GENERIC_FOLDERS = {"model", "models", "snapshot", "snapshots", "main", "encoder", "sentence-encoder", ""}


@runtime_checkable
class Embedder(Protocol):
    """What a router needs from an embedder: a stable id (stored beside centroids) and vectors."""

    id: str
    dim: int

    def embed_texts(self, texts: list[str]) -> Tensor:
        """Return `[len(texts), dim]` float32 rows with unit L2 norm."""
        ...


def pool_hidden(
    hidden: Tensor,
    lengths: Tensor | None = None,
    window: int | None = None,
    *,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean of the last `window` valid hidden states of each row, L2-normalised.

    This is the `base` embedder's math, kept separate so the server can apply it to hidden
    states its decode step already produced (re-routing then costs no extra forward pass).

    Rows are right-padded with `lengths[i]` valid tokens; alternatively pass `mask` `[n, T]`
    (1 = valid, any padding side), which wins over `lengths`. A row with no valid token pools
    to the zero vector rather than NaN, so one empty context cannot poison a batch.
    Masking uses `where`, not multiplication, so NaN/inf in padded positions never leak.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [n, T, d], got shape {tuple(hidden.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    n, t, _ = hidden.shape
    device = hidden.device
    if mask is not None:
        if mask.shape != (n, t):
            raise ValueError(f"mask must be [{n}, {t}], got {tuple(mask.shape)}")
        valid = mask.to(device=device).bool()  # [n, T]
        if window is not None:
            # Rank of each valid token counted from the right end: 1 = the newest token.
            from_right = valid.flip(1).long().cumsum(1).flip(1)  # [n, T]
            valid = valid & (from_right <= window)  # [n, T]
    else:
        if lengths is None:
            lens = torch.full((n,), t, device=device, dtype=torch.long)  # [n]
        else:
            lens = lengths.to(device=device, dtype=torch.long).clamp(0, t)  # [n]
            if lens.shape != (n,):
                raise ValueError(f"lengths must be [{n}], got {tuple(lengths.shape)}")
        pos = torch.arange(t, device=device).unsqueeze(0)  # [1, T]
        start = lens - window if window is not None else torch.zeros_like(lens)  # [n]
        valid = (pos < lens.unsqueeze(1)) & (pos >= start.clamp(min=0).unsqueeze(1))  # [n, T]
    h = hidden.float()  # [n, T, d] fp16/bf16 hidden states are pooled in fp32
    summed = torch.where(valid.unsqueeze(-1), h, torch.zeros((), device=device)).sum(1)  # [n, d]
    count = valid.sum(1, keepdim=True).clamp(min=1).to(h.dtype)  # [n, 1]
    return F.normalize(summed / count, dim=-1)  # [n, d]


def _length_order(lengths: list[int]) -> list[int]:
    """Indices by decreasing length: batches of similar lengths waste little compute on padding."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def _unsort(rows: Tensor, order: list[int]) -> Tensor:
    """Undo `_length_order`: row k of `rows` belongs to input `order[k]`."""
    out = torch.empty_like(rows)  # [n, d]
    out[torch.tensor(order, dtype=torch.long)] = rows
    return out


def _module_device(module: Any) -> torch.device:
    if isinstance(module, nn.Module):
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


class BaseEmbedder:
    """The `base` embedder: mean-pooled last hidden state of the resident causal LM.

    Accepts an HF GPT-2 LM (`model.transformer` is used), a bare transformer module returning
    `last_hidden_state`, or any callable `hidden_fn(input_ids [n, T], attention_mask [n, T])`
    returning `[n, T, d]` (then `dim` must be given). Used offline by training and online to
    turn registration `examples` into centroids, with exactly the pooling the engine applies.
    """

    def __init__(
        self,
        model: nn.Module | HiddenFn,
        tokenizer: Any,
        *,
        window: int | None = None,
        dim: int | None = None,
        max_length: int | None = None,
        batch_size: int = 16,
        device: torch.device | str | None = None,
    ) -> None:
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        body = getattr(model, "transformer", model)
        config = getattr(body, "config", None) or getattr(model, "config", None)
        self._body = body
        self.tokenizer = tokenizer
        self.window = window
        self.batch_size = batch_size
        self.id = "base" if window is None else f"base:{window}"
        resolved_dim = dim or getattr(config, "n_embd", None) or getattr(config, "hidden_size", None)
        if not resolved_dim:
            raise ValueError("cannot infer the hidden size: pass dim= for a bare hidden_fn")
        self.dim = int(resolved_dim)
        positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        self.max_length = int(max_length or positions or 1024)
        self.device = torch.device(device) if device is not None else _module_device(body)
        pad = getattr(tokenizer, "pad_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        self._pad_id = int(pad if pad is not None else (eos if eos is not None else 0))
        # An empty context still gets one token, so it has a defined "no context yet" embedding.
        self._empty_ids = [int(eos)] if eos is not None else [self._pad_id]

    def _token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        # Tokenise without truncation, then keep the *tail*: the router cares about the newest
        # context, matching the engine, which pools the latest hidden states.
        ids = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [(row[-self.max_length :] if row else list(self._empty_ids)) for row in ids]

    def _hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if isinstance(self._body, nn.Module):
            out = self._body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        else:
            out = self._body(input_ids, attention_mask)
        hidden = getattr(out, "last_hidden_state", out)
        if isinstance(hidden, tuple):
            hidden = hidden[0]
        return hidden  # [n, T, d]

    def embed_texts(self, texts: list[str]) -> Tensor:
        """Embed `texts` in batches; returns `[n, dim]` float32 on the CPU, unit rows."""
        if not texts:
            return torch.zeros(0, self.dim)
        all_rows = self._token_ids(texts)
        order = _length_order([len(r) for r in all_rows])
        out: list[Tensor] = []
        for i in range(0, len(texts), self.batch_size):
            rows = [all_rows[j] for j in order[i : i + self.batch_size]]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)  # [b, T]
            for j, r in enumerate(rows):
                input_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)  # [b]
            attention_mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()  # [b, T]
            with torch.no_grad():
                hidden = self._hidden(input_ids.to(self.device), attention_mask.to(self.device))  # [b, T, d]
                out.append(pool_hidden(hidden, lengths.to(hidden.device), self.window).cpu())  # [b, d]
        return _unsort(torch.cat(out), order)  # [n, d]


def encoder_name_from_path(path: str) -> str:
    """A stable, human-readable model name from a local model folder path (string only).

    Hub-cache snapshots (`models--org--name/snapshots/<hash>`) give `name`; otherwise the
    folder name, skipping generic names such as `model` by walking up.
    """
    parts = [p for p in re.split(r"[\\/]+", path) if p]
    for part in reversed(parts):
        if part.startswith("models--"):
            return part.split("--")[-1]
    for part in reversed(parts):
        if part.lower() in _GENERIC_FOLDERS or re.fullmatch(r"[0-9a-f]{40}", part):
            continue
        return part
    return "encoder"


def encoder_id(name: str, model_type: str | None = None) -> str:
    """Embedder id for a sentence encoder named `name`, e.g. `minilm:all-MiniLM-L6-v2`.

    The id is stored in every centroid file; it must not depend on where the model lives
    (so it is built from the model's name, not its absolute path).
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "encoder"
    family = "minilm" if "minilm" in slug.lower() else (model_type or "sentence")
    return f"{family}:{slug}"


class SentenceEncoder:
    """A sentence-transformers style encoder built from an already-loaded HF model + tokenizer.

    Mean pooling over the attention mask (or the CLS token) and L2 normalisation, which is what
    sentence-transformers does for all-MiniLM-L6-v2, reimplemented so serving needs only
    `transformers`. Texts are batched by length (less padding) and returned in input order.
    Sets `tokenizer.truncation_side = "left"`. Load one from a folder with
    `router_core.artifacts.load_sentence_encoder`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        name: str | None = None,
        batch_size: int = 32,
        max_length: int = 256,
        pooling: str = "mean",
        device: torch.device | str | None = None,
    ) -> None:
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if batch_size < 1 or max_length < 1:
            raise ValueError("batch_size and max_length must be >= 1")
        config = getattr(model, "config", None)
        dim = getattr(config, "hidden_size", None)
        if not dim:
            raise ValueError("the model's config has no hidden_size")
        model_name = name or encoder_name_from_path(str(getattr(config, "name_or_path", "") or "encoder"))
        self.model = model.eval()
        # Over-long contexts keep their newest tokens (as the `base` embedder does): while
        # re-routing mid-stream, what was just generated is what should move the weights.
        tokenizer.truncation_side = "left"
        self.tokenizer = tokenizer
        self.name = model_name
        self.id = encoder_id(model_name, getattr(config, "model_type", None))
        self.dim = int(dim)
        self.batch_size = batch_size
        self.max_length = max_length
        self.pooling = pooling
        self.device = torch.device(device) if device is not None else _module_device(model)
        if self.device != _module_device(model):
            self.model.to(self.device)
        self._stream: Any = None  # its own CUDA stream (made on first use)

    def embed_texts(self, texts: list[str]) -> Tensor:
        """Embed `texts` in batches of `batch_size`; returns `[n, dim]` float32 on the CPU.

        On CUDA it runs on a stream of its own: the server calls it on a side thread one step
        ahead, and on the default stream its kernels would queue behind the decode step's and
        its read-back (`.cpu()`) would wait for that step too; on its own stream the read-back
        waits for this stream's work alone."""
        if not texts:
            return torch.zeros(0, self.dim)
        if self.device.type != "cuda":
            return self._embed(texts)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            return self._embed(texts)

    def _embed(self, texts: list[str]) -> Tensor:
        order = _length_order([len(t) for t in texts])
        out: list[Tensor] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                [texts[j] for j in order[i : i + self.batch_size]],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.no_grad():
                hidden = self.model(**enc).last_hidden_state  # [b, T, d]
            if self.pooling == "cls":
                pooled = F.normalize(hidden[:, 0].float(), dim=-1)  # [b, d]
            else:
                pooled = pool_hidden(hidden, mask=enc["attention_mask"])  # [b, d]
            out.append(pooled.cpu())
        return _unsort(torch.cat(out), order)  # [n, d]
