"""Every request body the API takes. OpenAI field names where OpenAI has them; vLLM's extensions
under their vLLM names; Switchboard's own under `routing`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt


class SamplingFields(BaseModel):
    """Penalties and stop controls shared by completions and chat (None = the default)."""

    presence_penalty: float | None = Field(None, ge=-2, le=2, description="OpenAI: minus this for every token already generated")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="OpenAI: minus this times the token's count so far")
    repetition_penalty: float | None = Field(None, ge=0.01, le=10, description="vLLM/transformers: divides positive logits of seen tokens (below 0.01 they overflow)")
    min_tokens: int | None = Field(None, ge=0, le=4096, description="vLLM: no EOS / stop token before this many tokens")
    ignore_eos: bool | None = Field(None, description="vLLM: keep generating past EOS")
    stop_token_ids: list[int] | None = Field(None, max_length=64, description="vLLM: token ids that end the completion")
    best_of: int | None = Field(None, ge=1, description="completions: sample this many candidates per prompt and "
                                "return the n with the highest cumulative log-probability (not with stream)")


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
    # StrictInt: `[true, false]` is not a list of token ids (JSON booleans are not numbers)
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = ""
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


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: not used by the templates here
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="allow")  # unknown fields: logged once (see request_fields)
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=4096, description="default: the rest of the context")
    max_completion_tokens: int | None = Field(None, ge=1, le=4096, description="OpenAI's newer name for max_tokens")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="vLLM extension; 0 = off")
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
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
