"""The engine set up in-process, as `server.app` sets it up, and the assets every section shares
(base model, tokenizer, adapter store, and lazily the PEFT model and the engine rig)."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from bench.common import (
    ADAPTER_RANK,
    N_ROUTED,
    BenchConfig,
    build_base,
    build_tokenizer,
    clone,
    routing_settings,
    write_adapters,
)


# -- the engine in-process ---------------------------------------------------------------------------------
def resident_from(model, tokenizer, cfg: BenchConfig, model_id: str = "gpt2-random"):
    from server.engine.base_model import resident_model

    return resident_model(model_id, model, tokenizer, torch.device(cfg.device), cfg.dtype)


def base_spec(resident, max_rank: int = 64):
    from server.engine.adapter_weights import BaseSpec

    return BaseSpec(resident.module_shapes, resident.fingerprint, max_rank)


@dataclass
class EngineRig:
    engine: object
    registry: object
    routing: object | None  # the router catalogue
    resident: object
    warm_up_s: float = 0.0
    gater: object | None = None  # the engine's gate source, reading `routing`


def make_engine(resident, folders: dict[str, Path], cfg: BenchConfig, max_loras: int = 16,
                max_batch_size: int = 32, routed: bool = True, store: Path | None = None,
                decode_step: str = "eager") -> EngineRig:
    from server.build import build_engine, build_routing
    from server.engine.registry import AdapterRegistry
    from server.settings import EngineSettings
    from server.store.folder import read_adapter

    registry = AdapterRegistry()
    spec = base_spec(resident)
    for name, folder in folders.items():
        registry.register(read_adapter(name, folder, spec))
    routing = gater = None
    settings = routing_settings()
    if routed:
        routing, gater = build_routing(settings, resident, registry, store or next(iter(folders.values())).parent)
    limits = EngineSettings(max_loras=max_loras, max_batch_size=max_batch_size, max_queue=1024)
    engine = build_engine(limits, settings, resident, registry, gate_source=gater, decode_step=decode_step)
    return EngineRig(engine, registry, routing, resident, gater=gater)


def engine_generate(rig: EngineRig, prompts: torch.Tensor, new_tokens: int, specs: list) -> dict:
    """Submit one sequence per prompt row (greedy, no EOS) and step the engine until all finish.

    Returns wall time, time to each row's first token, and when the last row got its first token
    (the decode phase is timed from there)."""
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import Sequence

    tok = rig.resident.tokenizer
    engine, registry = rig.engine, rig.registry
    first: dict[int, float] = {}
    count = {"tokens": 0}

    def emit(ev, _first=first):
        if ev.token_id is not None:
            count["tokens"] += 1
            _first.setdefault(ev.seq_id, time.perf_counter())

    seqs = []
    for row, spec in zip(prompts.tolist(), specs, strict=True):
        names = sorted(set(spec.weights)) if spec.mode == "fixed" else list(rig.routing.resolve(spec.router)[1])
        versions = registry.acquire(names)
        seqs.append(Sequence(prompt_ids=row, max_tokens=new_tokens, sampling=SamplingParams(temperature=0.0),
                             routing=spec, decode=lambda t: tok.decode(t, skip_special_tokens=True), emit=emit,
                             eos_token_id=None, versions={v.name: v for v in versions}))
    start = time.perf_counter()
    for s in seqs:
        engine.submit(s)
    while engine.has_work():
        engine.step()
    end = time.perf_counter()
    ttfts = [first[s.id] - start for s in seqs]
    return {"seconds": end - start, "ttft": statistics.mean(ttfts), "all_first": max(first.values()) - start,
            "tokens": count["tokens"], "reroutes": sum(s.route.reroutes for s in seqs),
            "generated": [list(s.generated) for s in seqs]}


def make_peft(base, folders: dict[str, Path], cfg: BenchConfig):
    """A PEFT model over its own copy of the base with `folders`' adapters loaded from disk, the first active."""
    from peft import PeftModel

    names = list(folders)
    model = PeftModel.from_pretrained(clone(base), str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    model.set_adapter(names[0])
    return model.to(cfg.device).eval()


# -- what the sections share ------------------------------------------------------------------------------------
class Assets:
    """Built once per run: the base model, tokenizer, an adapter store on disk, and (lazily) the PEFT
    model and the engine over their own copies of the base."""

    def __init__(self, cfg: BenchConfig, root: Path) -> None:
        self.cfg, self.root = cfg, root
        self.base = build_base(cfg)
        self.tokenizer = build_tokenizer()
        self.store = root / "adapters"
        self.store.mkdir(parents=True, exist_ok=True)
        n_embd = self.base.config.n_embd
        rank = 4 if cfg.tiny else ADAPTER_RANK
        self.folders = write_adapters(self.base, self.store, [(f"a{i}", rank) for i in range(N_ROUTED)],
                                      centroid_dim=n_embd)
        self.rank_folders = write_adapters(self.base, self.store, [(f"r{r}", r) for r in cfg.ranks], seed=200)
        self._peft = None
        self._rigs: dict[str, EngineRig] = {}
        self._model_dir: Path | None = None

    def peft(self):
        if self._peft is None:
            self._peft = make_peft(self.base, self.folders, self.cfg)
        return self._peft

    def engine_rig(self, decode_step: str = "eager", quant: str = "none", native: bool = True) -> EngineRig:
        """The engine over its own copy of the base; `decode_step` as `EngineConfig.decode_step`,
        `quant` as `--quant` (one rig per kind; a compiled one is warmed up, i.e. compiled, here);
        `native=False` keeps the quantised engine off the native kernel (torch's kernel or fbgemm)."""
        key = (decode_step if quant == "none" else f"{decode_step}/{quant}") + ("" if native else "/torch")
        if key not in self._rigs:
            resident = resident_from(clone(self.base), self.tokenizer, self.cfg)
            resident.quant = quant
            with contextlib.ExitStack() as stack:
                if not native:
                    stack.enter_context(mock.patch("server.engine.engine.int8_kernel", return_value=None))
                rig = make_engine(resident, self.folders, self.cfg, store=self.store, decode_step=decode_step)
            rig.warm_up_s = rig.engine.warm_up()
            self._rigs[key] = rig
        return self._rigs[key]

    def model_dir(self) -> Path:
        """The base model and tokenizer saved for a server process (`--base-model DIR`)."""
        if self._model_dir is None:
            path = self.root / "base-model"
            self.base.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            self._model_dir = path
        return self._model_dir
