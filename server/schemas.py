"""Request bodies. OpenAI field names where OpenAI has them; Switchboard's own under `routing`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from server.request_fields import SamplingFields


class RoutingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    router: str | None = Field(None, description="centroid | mlp | a router name")
    reroute_every: int | None = Field(None, ge=0, le=1024)
    top_k: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, gt=0, le=100)
    weights: dict[str, float] | None = Field(None, description="a fixed manual mixture (with model=auto)")


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="allow")  # unknown fields: logged once (see request_fields)
    model: str
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    max_tokens: int = Field(16, ge=0, le=4096, description="0 with echo: score the prompt only")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy; otherwise at least 0.01")
    top_p: float = Field(1.0, ge=0.001, le=1)
    top_k: int = Field(0, ge=0, description="vLLM extension; 0 = off")
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100]")
    echo: bool = False
    user: str | None = None
    routing: RoutingOptions | None = None


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str
    examples: list[str] | None = Field(None, max_length=4096, description="texts the adapter's centroid is computed from")
    centroids: int = Field(64, ge=1, le=64, description="centroid rows kept from the examples: each example up to this many, k-means beyond; 1 = their mean")
    pinned: bool = False


class RouterLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str | None = Field(None, description="folder relative to the store; default _routers/<name>")


class VLLMLoadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class VLLMUnloadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_int_id: int | None = None
