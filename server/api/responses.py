"""Response bodies, so that /openapi.json describes what clients get.

The routes keep building plain dicts; FastAPI validates them against these models
(`response_model=`, with `response_model_exclude_unset` so a field an entry does not carry,
such as `routers` on an adapter's model card, stays absent rather than becoming null).
Every model allows extra fields: a body may carry more than is described here (new fields are
added without breaking a client that validates against an older schema), and the schema says so.
OpenAI's field names where OpenAI has them; Switchboard's own fields are documented below.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Open(BaseModel):
    """A response object that may carry fields beyond the ones described."""

    model_config = ConfigDict(extra="allow")


# -- health -------------------------------------------------------------------------------------------------
class Health(Open):
    status: Literal["ok"]


class Ready(Open):
    status: Literal["ready"]
    model: str = Field(description="the resident model's id")
    adapters: int = Field(description="registered adapters")


class Loading(Open):
    status: Literal["loading"]


# -- models -------------------------------------------------------------------------------------------------
class ModelCard(Open):
    """One entry of /v1/models: the base model, `auto` (when a router exists), or an adapter."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int = Field(description="context length in tokens, prompt and completion together (vLLM's field)")
    routers: list[str] | None = Field(None, description="`auto` only: the routers it can use")
    reroute_every: int | None = Field(None, description="`auto` only: the server's default re-route cadence in tokens (0 = once)")
    version: int | None = Field(None, description="adapters only: the registered version")
    rank: int | None = Field(None, description="adapters only: LoRA rank")
    target_modules: list[str] | None = Field(None, description="adapters only")
    routable: bool | None = Field(None, description="adapters only: some router of `auto` can pick it")
    load_state: Literal["slot", "host", "disk"] | None = Field(
        None, description="adapters only: `slot` (in a compute slot), `host` (factors in host memory) or `disk` "
                          "(registered; read from the store on first use)")
    dtype: str | None = Field(None, description="the base model only: its float dtype")
    quantization: str | None = Field(None, description="the base model only: `none`, `int8` (weight-only int8 base weights) or `w8a8` (int8 weights and activations)")


class ModelList(Open):
    object: Literal["list"]
    data: list[ModelCard]


# -- completions --------------------------------------------------------------------------------------------
class RoutingSegment(Open):
    """Generated tokens [start_token, end_token) and the gates in force for them."""

    start_token: int
    end_token: int
    weights: dict[str, float]
    confidence: float | None = Field(None, description=(
        "the top adapter's share of the weights: for `auto` with the centroid router, the calibrated "
        "probability that it is the right adapter (docs/routing.md); null for the base model"))


class CompletionLogprobs(Open):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int] | None


class PromptLogprob(Open):
    """vLLM's: one token's entry at one prompt position."""

    logprob: float
    rank: int | None = Field(description="1 = the most likely token at that position")
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]  # token id (as a string) -> its entry, per position


class CompletionChoice(Open):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str
    routing: list[RoutingSegment] = Field(description="the routing trace of this choice")
    prompt_logprobs: PromptLogprobs | None = Field(None, description="vLLM: with `prompt_logprobs: N`, None for "
                                                   "the first prompt token, then the prompt's token and the N most likely")


class Usage(Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(Open):
    """The body of a non-streaming completion (a streaming one is `text/event-stream`)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


# -- chat completions ---------------------------------------------------------------------------------------
class FunctionCall(Open):
    name: str
    arguments: str = Field(description="JSON text following the function's parameters schema")


class ToolCall(Open):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(Open):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(Open):
    token: str
    logprob: float
    bytes: list[int] = Field(description="the token's raw bytes")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Open):
    content: list[ChatTokenLogprob]


class ChatChoice(Open):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: str
    routing: list[RoutingSegment] = Field(description="the routing trace of this choice")


class ChatCompletion(Open):
    """The body of a non-streaming chat completion (a streaming one is `text/event-stream`)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = Field(None, description="vLLM: with `prompt_logprobs: N`, the "
                                                   "rendered conversation's (as on a completions choice)")


# -- admin: adapters ----------------------------------------------------------------------------------------
class AdapterInfo(Open):
    name: str
    version: int
    path: str = Field(description="the adapter's folder name in the store")
    rank: int
    alpha: int | float
    scale: float
    target_modules: list[str]
    pinned: bool
    resident: bool = Field(description="whether its factors are in a compute slot now")
    load_state: Literal["slot", "host", "disk"] = Field(
        description="`slot` (in a compute slot), `host` (factors in host memory) or `disk` (read on first use)")
    in_flight: int = Field(description="requests holding this version")
    bytes: int
    centroids: list[int] | None = Field(description="the centroid tensor's shape [m, d], if any")
    centroid_embedder: str | None
    meta: dict[str, Any]


class AdapterList(Open):
    adapters: list[AdapterInfo]
    max_loras: int


class AdapterLoaded(Open):
    status: Literal["loaded", "replaced"]
    adapter: AdapterInfo
    replaced_version: int | None


class VLLMAdapterLoaded(AdapterLoaded):
    message: str


class AdapterUnloaded(Open):
    status: Literal["unloaded"]
    name: str
    version: int


class VLLMAdapterUnloaded(Open):
    status: Literal["unloaded"]
    message: str


class ReloadReport(Open):
    loaded: list[str]
    replaced: list[str]
    unchanged: list[str]
    failed: dict[str, str] = Field(description="adapter -> why it was refused")
    routers: list[str]
    failed_routers: dict[str, str] = Field(description="router -> why it was refused")


# -- admin: routers -----------------------------------------------------------------------------------------
class FormInfo(Open):
    on: bool = Field(description="whether the centroid router reads each prompt's form beside its topic")
    note: str = Field(description="`on`, or why it is off (no spaCy, an unfitted temperature, an adapter without examples)")
    groups: dict[str, str] | None = Field(None, description="adapter -> the form of its examples: code, request or prose")


class RouterInfo(Open):
    name: str
    kind: str = Field(description="centroid | arrow | mlp")
    adapters: list[str]
    embedder: str | None = Field(None, description="MLP routers: the embedder it was trained on")
    form: FormInfo | None = Field(None, description="centroid router: its form term (router_core/form.py)")


class RouterList(Open):
    routers: list[RouterInfo]
    embedder: str = Field(description="the server's embedder id")


class RouterLoaded(Open):
    status: Literal["loaded"]
    name: str
    kind: str
    adapters: list[str]


class RouterUnloaded(Open):
    status: Literal["unloaded"]
    name: str


# -- tokenizer ----------------------------------------------------------------------------------------------
class Tokenized(Open):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class Detokenized(Open):
    prompt: str


# -- LoRAX --------------------------------------------------------------------------------------------------
class LoraxError(Open):
    """LoRAX's error shape (`error` text, `error_type`); a body that fails validation before the
    route runs gets OpenAI's shape (`error` object), which this also describes."""

    error: str | dict[str, Any]
    error_type: str | None = None


class LoraxGenerated(Open):
    generated_text: str
    details: dict[str, Any] | None = None
