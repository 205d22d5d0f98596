"""Gradient-free centroid routing (arXiv 2311.10847).

Each adapter is represented by one or more unit vectors (centroids) in an embedder's space.
A context is routed by cosine similarity to them: softmax with a temperature, the most similar
adapter's weight multiplied by `top_boost` and the row renormalised, then optionally truncated
to the `top_k` largest weights. No training is needed, so an adapter registered with a handful
of example texts is routable at once.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from router_core.confidence import ConfidenceMap
from router_core.form import form_log_likelihood


def check_route_options(temperature: float, top_k: int | None) -> None:
    """The options every router takes, checked the same way at construction and per request."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")


def _check_options(temperature: float, top_boost: float, top_k: int | None) -> None:
    check_route_options(temperature, top_k)
    if not top_boost > 0:
        raise ValueError(f"top_boost must be > 0, got {top_boost}")


def boost_and_truncate(probs: Tensor, top: Tensor, top_boost: float, top_k: int | None) -> Tensor:
    """Multiply each row's `top` entry by `top_boost`, renormalise, keep the `top_k` largest.

    Shared by the routers so "top_k" means the same thing everywhere. `probs` `[B, n]`,
    `top` `[B]` (long). Rows stay on the simplex.
    """
    if probs.shape[-1] == 0:
        return probs
    w = probs.clone()  # [B, n]
    if top_boost != 1.0:
        w.scatter_(1, top.unsqueeze(1), w.gather(1, top.unsqueeze(1)) * top_boost)  # [B, n]
        w = w / w.sum(-1, keepdim=True)  # [B, n]
    if top_k is not None and top_k < w.shape[-1]:
        kept = w.topk(top_k, dim=-1).indices  # [B, k]
        w = torch.zeros_like(w).scatter(1, kept, w.gather(1, kept))  # [B, n]
        w = w / w.sum(-1, keepdim=True)  # [B, n]
    return w


def fit_centroids(embeddings: Tensor, k: int = 1, iters: int = 25, seed: int = 0) -> Tensor:
    """Centroids `[k, d]` for one adapter from its example embeddings `[n, d]`.

    k = 1 is the normalised mean (arXiv 2311.10847's dataset centroid). k > 1 runs spherical k-means
    (k-means++ start, fixed seed so refits are reproducible), which helps adapters whose data is
    multi-modal, e.g. "code" spanning SQL questions and Python functions.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [n, d] matrix, got {tuple(embeddings.shape)}")
    x = F.normalize(embeddings.float(), dim=-1)  # [n, d]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k == 1 or x.shape[0] <= k:
        if x.shape[0] <= k and k > 1:
            return x.clone()  # [n, d] every example is its own centroid
        return F.normalize(x.mean(0, keepdim=True), dim=-1)  # [1, d]
    gen = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(x.shape[0], (1,), generator=gen))]
    for _ in range(1, k):
        dist = (1 - (x @ x[chosen].T).max(1).values).clamp(min=0)  # [n] cosine distance to nearest
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full_like(dist, 1 / len(dist))
        chosen.append(int(torch.multinomial(probs, 1, generator=gen)))
    c = x[chosen].clone()  # [k, d]
    for _ in range(iters):
        assign = (x @ c.T).argmax(1)  # [n]
        sums = torch.zeros_like(c).index_add_(0, assign, x)  # [k, d]
        empty = sums.norm(dim=1) == 0  # [k]
        c = torch.where(empty.unsqueeze(1), c, F.normalize(sums, dim=-1))  # [k, d]
    return c


class CentroidRouter:
    """Routes embeddings to adapters by cosine similarity to their centroids (arXiv 2311.10847).

    Scores: with one or a few centroids per adapter, an adapter's score is its best cosine
    similarity. When every adapter has at least `4 * vote` rows (the server keeps up to 64
    registration examples as rows), the score is *nearest-example voting* instead: the mean of the
    `vote` highest similarities to the adapter's rows, minus `baseline` times the same quantity
    for its rows against each other (leave-one-out). The baseline puts a tight domain (literary
    paragraphs, similar to each other) and a diverse one (code requests and code) on one scale,
    so the tight domain's high typical similarity counts against a text that is merely far from
    both. Half of it (`baseline=0.5`) was the best trade measured: on code-vs-literature text
    from sources unlike the examples top-1 rises from about 89 % (one mean centroid) to 99.6 %
    (averaged over 20 draws of 40 + 40 examples), while in-distribution accuracy stays at 99 %
    (the full baseline cost 1-5 points there). Few rows (k-means modes) keep the best-similarity
    score: voting over a handful of distinct modes averages unrelated directions.

    `temperature` defaults to 1.0 because arXiv 2311.10847 applies a plain softmax to the cosine
    similarities and gets its sharpness from the ×4 boost of the most similar adapter. With
    cosines in [-1, 1] a unit temperature keeps a genuine mixture (e.g. similarities 0.5/0.2
    give 0.57/0.43, then 0.84/0.16 after the boost), which is the paper's point: blend experts,
    let the best one dominate. Lower it for near one-hot routing.

    `confidence_map` (`router_core.confidence`, fitted by `router_core.calibration.with_fitted_confidence`)
    spreads each route vector toward uniform so its top weight is the calibrated probability
    that the top adapter is right; None leaves the weights as the softmax made them.

    `switch_margin` (score units, 0 = off) is how much a re-route's score for a new top adapter
    must beat the current top adapter's score by before the server switches to it
    (`router_core.policy.ReroutePolicy.stabilise`); `router_core.calibration.fit_switch_margin`
    fits it from the examples.

    `form_groups` (None = off; set with `with_form_groups`) is each adapter's form group
    (`router_core.form.adapter_form`: the form most of its examples have). With it, `route`
    takes `form`, each text's P(code, request, prose) `[B, 3]` (`router_core.form.FormReader`),
    and adds `temperature · log P(the text's form is the adapter's)` to every score: a product
    of the topic's softmax at the fitted temperature and the form's probability
    (docs/routing.md, "A three-way form head"). Rows of `form` that are NaN get no form term.

    Immutable: a changed adapter set means a new router (`with_adapters`, or the server's
    rebuild), so the server swaps a reference atomically while in-flight requests keep the one
    they started with.
    """

    kind = "centroid"
    per_token = False  # gates per row, from an embedding of the routing window

    def __init__(
        self,
        adapter_names: list[str],
        centroids: list[Tensor],  # each [m_i, d]
        temperature: float = 1.0,
        top_boost: float = 4.0,
        top_k: int | None = None,
        min_similarity: float | None = None,
        vote: int = 5,
        baseline: float = 0.5,
        switch_margin: float = 0.0,
        confidence_map: ConfidenceMap | None = None,
    ) -> None:
        _check_options(temperature, top_boost, top_k)
        if vote < 1:
            raise ValueError(f"vote must be >= 1, got {vote}")
        if not switch_margin >= 0:
            raise ValueError(f"switch_margin must be >= 0, got {switch_margin}")
        if len(adapter_names) != len(centroids):
            raise ValueError(f"{len(adapter_names)} adapter names but {len(centroids)} centroid sets")
        if len(set(adapter_names)) != len(adapter_names):
            raise ValueError(f"duplicate adapter names: {adapter_names}")
        self.temperature = float(temperature)
        self.top_boost = float(top_boost)
        self.top_k = top_k
        self.min_similarity = min_similarity
        self.vote = int(vote)
        self.baseline = float(baseline)
        self.switch_margin = float(switch_margin)
        self.confidence_map = confidence_map
        self.form_groups: tuple[str, ...] | None = None
        blocks = [_unit_rows(name, c) for name, c in zip(adapter_names, centroids, strict=True)]
        for name, rows in zip(adapter_names, blocks, strict=True):
            if rows.shape[1] != blocks[0].shape[1]:
                raise ValueError(f"centroids of {name!r} have dim {rows.shape[1]}, others {blocks[0].shape[1]}")
        self._assemble(tuple(adapter_names), blocks, [self._block_baseline(b) for b in blocks])
        self.rows_checked = len(blocks)  # adapters whose centroids this router checked and normalised

    def _assemble(self, names: tuple[str, ...], blocks: list[Tensor], block_baselines: list[Tensor | None]) -> None:
        """Set the router from per-adapter unit rows (already checked) and their leave-one-out
        baselines (None for an adapter with too few rows to vote). The stacked `[M, d]` matrix
        and the baselines are built on first use (`_stacked`), not here: a registration among
        thousands of adapters then costs list operations, not a copy of every centroid."""
        self.adapter_names: tuple[str, ...] = names
        self._blocks, self._block_baselines = tuple(blocks), tuple(block_baselines)
        self._stack: tuple[Tensor, Tensor, Tensor | None] | None = None
        self._on_device: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._column_index: dict[torch.device, list[Tensor]] = {}
        self.voting = bool(blocks) and all(b is not None for b in block_baselines)

    def _stacked(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """(unit rows `[M, d]`, their adapter index `[M]`, baselines `[n]` or None), built once."""
        if self._stack is None:
            blocks = self._blocks
            rows = torch.cat(blocks) if blocks else torch.zeros(0, 0)  # [M, d]
            counts = torch.tensor([b.shape[0] for b in blocks], dtype=torch.long)
            owner = torch.repeat_interleave(torch.arange(len(blocks)), counts)  # [M]
            baselines = self.baseline * torch.stack([b for b in self._block_baselines if b is not None]) \
                if self.voting else None  # [n]
            self._stack = (rows, owner, baselines)
        return self._stack

    @property
    def embed_dim(self) -> int | None:
        return int(self._blocks[0].shape[1]) if self._blocks else None

    @property
    def _centroids(self) -> Tensor:
        return self._stacked()[0]

    @property
    def _owner(self) -> Tensor:
        return self._stacked()[1]

    @property
    def baselines(self) -> Tensor | None:
        return self._stacked()[2]

    def _block_baseline(self, rows: Tensor) -> Tensor | None:
        return self._loo_baseline(rows) if rows.shape[0] >= 4 * self.vote else None

    def with_changes(self, changed: dict[str, Tensor | None]) -> CentroidRouter:
        """A new router where each name in `changed` has its new centroids (None: it leaves),
        every other adapter keeping the rows this router already checked and normalised, so
        registering one adapter among thousands checks one adapter's centroids, not all of them.
        Names stay sorted (as the catalogue builds them). `rows_checked` counts the work."""
        index = {name: i for i, name in enumerate(self.adapter_names)}
        keep = [n for n in self.adapter_names if n not in changed]
        fresh = {name: _unit_rows(name, c) for name, c in changed.items() if c is not None}
        for name, rows in fresh.items():
            if keep and rows.shape[1] != self.embed_dim:
                raise ValueError(f"centroids of {name!r} have dim {rows.shape[1]}, others {self.embed_dim}")
        names = sorted([*keep, *fresh]) if fresh else keep
        blocks, baselines = [], []
        for name in names:
            if name in fresh:
                blocks.append(fresh[name])
                baselines.append(self._block_baseline(fresh[name]))
            else:
                blocks.append(self._blocks[index[name]])
                baselines.append(self._block_baselines[index[name]])
        out = copy.copy(self)
        out._assemble(tuple(names), blocks, baselines)
        out.rows_checked = len(fresh)
        out.form_groups = None  # they were per adapter of the old list: the caller sets the new ones
        return out

    def _loo_baseline(self, rows: Tensor) -> Tensor:
        """Mean over an adapter's rows of their top-`vote` similarity to its *other* rows."""
        sims = rows @ rows.T  # [m, m]
        sims.fill_diagonal_(float("-inf"))
        return sims.topk(self.vote, dim=1).values.mean()

    @property
    def centroids(self) -> list[Tensor]:
        """Per-adapter unit centroids, each `[m_i, d]`, in `adapter_names` order."""
        return list(self._blocks)

    def _tensors(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self._centroids.to(device), self._owner.to(device))
        return self._on_device[device]

    def similarities(self, embeddings: Tensor) -> Tensor:
        """Cosine similarity `[B, n]` of each embedding to each adapter (max over its centroids)."""
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be [B, d], got {tuple(embeddings.shape)}")
        b, n = embeddings.shape[0], len(self.adapter_names)
        if n == 0:
            return embeddings.new_zeros(b, 0, dtype=torch.float32)
        if embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"embedding dim {embeddings.shape[1]} != centroid dim {self.embed_dim}")
        cents, owner = self._tensors(embeddings.device)
        e = F.normalize(embeddings.float(), dim=-1)  # [B, d]
        sims = e @ cents.T  # [B, M]
        out = torch.full((b, n), float("-inf"), device=e.device)  # [B, n]
        return out.scatter_reduce(1, owner.expand(b, -1), sims, reduce="amax")  # [B, n]

    @property
    def needs_complexity(self) -> bool:
        return False

    def scores(self, embeddings: Tensor, complexity: Tensor | None = None, leave_out: Tensor | None = None) -> Tensor:
        """The routing scores `[B, n]` (see the class docstring): best similarity, or the
        baseline-corrected vote when voting is on. `complexity` is ignored (the
        `Router` signature). `leave_out` `[B]` (long, -1 = none) excludes
        one centroid row per embedding, for leave-one-out scores of the examples themselves."""
        if not self.voting:
            if leave_out is not None:
                raise ValueError("leave-one-out scores need voting (at least 4 * `vote` rows per adapter)")
            return self.similarities(embeddings)
        assert self.baselines is not None
        cents, _ = self._tensors(embeddings.device)
        sims = F.normalize(embeddings.float(), dim=-1) @ cents.T  # [B, M]
        if leave_out is not None:
            hit = leave_out.to(sims.device).clamp(min=0)[:, None]  # [B, 1]
            dropped = torch.where((leave_out >= 0).to(sims.device)[:, None], float("-inf"), sims.gather(1, hit))
            sims = sims.scatter(1, hit, dropped)  # [B, M]
        # Each adapter's columns by a long index made once per device: a boolean mask
        # (`sims[:, owner == i]`) has a data-dependent size, which costs a host sync per adapter
        # on a GPU, on every re-route.
        out = [sims.index_select(1, own).topk(self.vote, dim=1).values.mean(1)  # [B]
               for own in self._columns(sims.device)]
        return torch.stack(out, dim=1) - self.baselines.to(sims.device)  # [B, n]

    def with_form(self, scores: Tensor, form: Tensor | None) -> Tensor:
        """`scores` `[B, n]` plus the form term, `T · log P(the text's form is the adapter's)` at
        the router's own (fitted) temperature T, whatever a request's temperature; unchanged
        without `form_groups` or `form`, and on rows of `form` that are NaN."""
        if form is None or self.form_groups is None:
            return scores
        if form.shape != (scores.shape[0], 3):
            raise ValueError(f"form must be [{scores.shape[0]}, 3], got {tuple(form.shape)}")
        known = ~torch.isnan(form).any(dim=1, keepdim=True)  # [B, 1]
        term = self.temperature * form_log_likelihood(torch.nan_to_num(form), self.form_groups)  # [B, n]
        return scores + torch.where(known, term.to(scores.device), 0.0)  # [B, n]

    def _columns(self, device: torch.device) -> list[Tensor]:
        """Per adapter, the indices of its centroid rows `[m_i]` on `device` (cached)."""
        if device not in self._column_index:  # each adapter's rows are contiguous: one range per block
            index, start = [], 0
            for block in self._blocks:
                index.append(torch.arange(start, start + block.shape[0], device=device))
                start += block.shape[0]
            self._column_index[device] = index
        return self._column_index[device]

    def weights_from_scores(self, scores: Tensor, temperature: float | None = None,
                            top_k: int | None = None) -> Tensor:
        """softmax(scores / T), the top adapter × `top_boost`, renormalised, top-k truncated."""
        temp = self.temperature if temperature is None else temperature
        k = self.top_k if top_k is None else top_k
        _check_options(temp, self.top_boost, k)
        if scores.shape[1] == 0:
            return scores
        probs = torch.softmax(scores / temp, dim=-1)  # [B, n]
        return boost_and_truncate(probs, scores.argmax(dim=-1), self.top_boost, k)  # [B, n]

    def route(
        self,
        embeddings: Tensor,
        complexity: Tensor | None = None,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        form: Tensor | None = None,
    ) -> Tensor:
        """Mixture weights `[B, n]`: rows sum to 1, or are all zero (= base model) when the best
        similarity is below `min_similarity`.

        `complexity` is ignored (the `Router` signature); `temperature` / `top_k` override the
        router's own for one request; `form` `[B, 3]` adds the form term (see the class
        docstring) when the router has `form_groups`.
        """
        temp = self.temperature if temperature is None else temperature
        k = self.top_k if top_k is None else top_k
        _check_options(temp, self.top_boost, k)
        if not self.adapter_names:
            return self.similarities(embeddings)
        scores = self.with_form(self.scores(embeddings), form)  # [B, n]
        if self.confidence_map is None:
            weights = self.weights_from_scores(scores, temp, k)  # [B, n]
        else:  # spread first, then keep the top_k, so "top_k" still bounds the mixture's size
            weights = self.confidence_map.spread(self.weights_from_scores(scores, temp, None), scores)  # [B, n]
            weights = boost_and_truncate(weights, weights.argmax(-1), 1.0, k)  # [B, n]
        if self.min_similarity is not None:
            best = self.similarities(embeddings).max(dim=-1).values  # [B]
            weights = torch.where((best < self.min_similarity).unsqueeze(1), 0.0, weights)  # [B, n]
        return weights

    def with_adapters(self, names: list[str], centroids: list[Tensor]) -> CentroidRouter:
        """A new router over exactly `names`/`centroids`, with this router's options."""
        return CentroidRouter(
            list(names), list(centroids), self.temperature, self.top_boost, self.top_k, self.min_similarity,
            self.vote, self.baseline, self.switch_margin, self.confidence_map,
        )

    def with_form_groups(self, groups: Sequence[str] | None) -> CentroidRouter:
        """A new router over the same rows with one form group per adapter (`adapter_names`
        order; `router_core.form.FORMS`), or None: no form term."""
        if groups is not None and len(groups) != len(self.adapter_names):
            raise ValueError(f"{len(groups)} form groups for {len(self.adapter_names)} adapters")
        out = copy.copy(self)
        out.form_groups, out.rows_checked = (tuple(groups) if groups is not None else None), 0
        return out

    def with_options(self, *, temperature: float | None = None, switch_margin: float | None = None,
                     confidence_map: ConfidenceMap | None = None, calibrate: bool = True) -> CentroidRouter:
        """A new router over the same rows with a fitted `temperature` / `switch_margin` /
        `confidence_map` (`calibrate=False` drops the map: the uncalibrated weights). The rows
        are shared, never copied: routers are immutable."""
        temperature = self.temperature if temperature is None else float(temperature)
        switch_margin = self.switch_margin if switch_margin is None else float(switch_margin)
        _check_options(temperature, self.top_boost, self.top_k)
        if not switch_margin >= 0:
            raise ValueError(f"switch_margin must be >= 0, got {switch_margin}")
        out = copy.copy(self)
        out.temperature, out.switch_margin, out.rows_checked = temperature, switch_margin, 0
        out.confidence_map = (confidence_map or self.confidence_map) if calibrate else None
        return out

    def __repr__(self) -> str:
        return (
            f"CentroidRouter(adapters={list(self.adapter_names)}, temperature={self.temperature}, "
            f"top_boost={self.top_boost}, top_k={self.top_k}, min_similarity={self.min_similarity}, vote={self.vote}, baseline={self.baseline}, "
            f"switch_margin={self.switch_margin}, confidence_map={self.confidence_map})"
        )


def _unit_rows(name: str, c: Tensor) -> Tensor:
    """One adapter's centroids as checked unit rows `[m, d]` (float32, CPU)."""
    c = c.detach().float().cpu()
    if c.dim() == 1:
        c = c.unsqueeze(0)  # [1, d]
    if c.dim() != 2 or c.shape[0] == 0:
        raise ValueError(f"centroids of {name!r} must be [m, d] with m >= 1, got {tuple(c.shape)}")
    if not torch.isfinite(c).all() or (c.norm(dim=1) == 0).any():
        raise ValueError(f"centroids of {name!r} contain non-finite or zero rows")
    return F.normalize(c, dim=-1)
