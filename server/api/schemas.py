"""Every request body the API takes. OpenAI field names where OpenAI has them; vLLM's extensions
under their vLLM names; Switchboard's own under `routing`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictInt


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema", description="the JSON schema the output follows")
    strict: bool | None = Field(None, description="accepted; the output always follows the schema exactly")


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` object: exactly one of its constraints."""

    model_config = ConfigDict(extra="allow")  # vLLM's backend options (disable_fallback, ...): no meaning here
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StructuredFields(BaseModel):
    """Constrained decoding: OpenAI's `response_format` and vLLM's guided-decoding fields (at most one)."""

    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM: a JSON schema the output follows")
    guided_regex: str | None = Field(None, description="vLLM: a regular expression the output matches")
    guided_choice: list[str] | None = Field(None, description="vLLM: the output is one of these strings")
    guided_grammar: str | None = Field(None, description="vLLM: an EBNF (GBNF) grammar the output follows")
    guided_decoding_backend: str | None = Field(None, description="vLLM: accepted; xgrammar always decodes")
    guided_whitespace_pattern: str | None = Field(None, description="vLLM: accepted; JSON is written compactly")
    structured_outputs: StructuredOutputs | None = None


class SamplingFields(StructuredFields):
    """Penalties and stop controls shared by completions and chat (None = the default)."""

    presence_penalty: float | None = Field(None, ge=-2, le=2, description="OpenAI: minus this for every token already generated")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="OpenAI: minus this times the token's count so far")
    repetition_penalty: float | None = Field(None, ge=0.01, le=10, description="vLLM/transformers: divides positive logits of seen tokens (below 0.01 they overflow)")
    min_tokens: int | None = Field(None, ge=0, le=4096, description="vLLM: no EOS / stop token before this many tokens")
    ignore_eos: bool | None = Field(None, description="vLLM: keep generating past EOS")
    stop_token_ids: list[int] | None = Field(None, max_length=64, description="vLLM: token ids that end the completion")
    best_of: int | None = Field(None, ge=1, description="completions: sample this many candidates per prompt and "
                                "return the n with the highest cumulative log-probability (not with stream)")
    min_p: float | None = Field(None, ge=0, le=1, description="vLLM: drop tokens less likely than min_p times the most likely")
    bad_words: list[str] | None = Field(None, max_length=64, description="vLLM: words never generated (with and "
                                        "without a leading space)")
    include_stop_str_in_output: bool | None = Field(None, description="vLLM: keep the stop string that ended the text")
    skip_special_tokens: bool | None = Field(None, description="vLLM: false keeps special tokens in the text")
    truncate_prompt_tokens: int | None = Field(None, ge=1, description="vLLM: keep only the prompt's last k tokens")
    return_tokens_as_token_ids: bool | None = Field(None, description="vLLM: log-prob tokens as 'token_id:<id>'")
    prompt_logprobs: StrictInt | None = Field(None, description="vLLM: per prompt token its log-prob and rank and "
                                              "the N (0-20) most likely tokens there; not with stream")


class RoutingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    router: str | None = Field(None, description="centroid | arrow | mlp | a router name")
    reroute_every: int | None = Field(None, ge=0, le=1024)
    top_k: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, gt=0, le=100)
    weights: dict[str, float] | None = Field(None, description="a fixed manual mixture (with model=auto)")


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="vLLM: every chunk carries the usage so far")


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
    # a chat request's tool-call plan (serving/structured.py), set by the chat service, never from a body
    _tool_plan: Any = PrivateAttr(None)
    _echo: str = PrivateAttr("")  # chat `echo`: the assistant's last message, which starts the reply


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: not used by the templates here
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: NamedFunction


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
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = Field(
        None, description="required / a named function: the reply is a tool call whose arguments follow the "
        "function's schema; none / auto: text (GPT-2 has no tool-call format of its own)")
    parallel_tool_calls: bool | None = Field(None, description="false: `required` makes at most one call (a named "
                                             "function always makes one)")
    echo: bool = Field(False, description="vLLM: the last message, when it is the assistant's, starts the reply")
    add_generation_prompt: bool = Field(True, description="vLLM: end the rendered conversation with the assistant's turn")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="vLLM: extra variables for the chat template")


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


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize`: a prompt, or a conversation rendered by the chat template."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


# -- LoRAX's REST API (/generate, /generate_stream) --------------------------------------------------------
class LoraxMergedAdapters(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ids: list[str] = Field(min_length=1, max_length=64)
    weights: list[float] = Field(min_length=1, max_length=64)
    merge_strategy: str | None = Field(None, description="linear (Switchboard's exact mixture, see docs/clients.md)")
    density: float = Field(1.0, ge=0, le=1)
    majority_sign_method: str | None = None


class LoraxResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: Literal["json_object"]
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class LoraxParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")
    adapter_id: str | None = None
    adapter_source: str | None = Field(None, description="accepted; adapters come from the server's store")
    merged_adapters: LoraxMergedAdapters | None = None
    api_token: str | None = None
    do_sample: bool = False
    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    ignore_eos_token: bool = False
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    return_full_text: bool = False
    stop: list[str] = Field(default_factory=list, max_length=16)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    truncate: int | None = Field(None, ge=1)
    typical_p: float | None = None
    best_of: int | None = Field(None, ge=1)
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = Field(None, ge=1, le=20)
    response_format: LoraxResponseFormat | None = None


class LoraxRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    inputs: str = Field(min_length=1)
    parameters: LoraxParameters = Field(default_factory=LoraxParameters)
    stream: bool = False
