"""Structured output and tools through real clients against a live loopback server on the tiny
random-weight model: the openai SDK's `beta.chat.completions.parse` with a pydantic model,
LangChain's `with_structured_output` (json_schema and function_calling) and `bind_tools` with a
named choice, and LiteLLM's tools. A random model produces valid objects only because the grammar
allows nothing else."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.live import CLIENT_KEY as KEY

MESSAGES = [{"role": "user", "content": "Name a pet."}]


class Pet(BaseModel):
    """A pet (bounded fields: a random model stops only where the schema makes it)."""

    name: str = Field(max_length=6)
    kind: Literal["cat", "dog"]
    age: int = Field(ge=0, le=20)


@pytest.fixture(scope="module")
def server(live_clients):
    return f"{live_clients.base}/v1"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120)


@pytest.mark.parametrize("model,extra", [("alpha", {}), ("auto", {"routing": {"reroute_every": 2}}),
                                         ("auto", {"routing": {"weights": {"alpha": 0.3, "beta": 0.7}}})])
def test_openai_parse_with_pydantic(client, model, extra):
    r = client.beta.chat.completions.parse(model=model, messages=MESSAGES, response_format=Pet, temperature=1.0,
                                           seed=4, extra_body=extra)
    message = r.choices[0].message
    assert isinstance(message.parsed, Pet), message
    assert Pet.model_validate_json(message.content or "") == message.parsed


def test_openai_tools_named_and_streamed(client):
    tool = openai.pydantic_function_tool(Pet, name="record_pet")
    kwargs = dict(model="beta", messages=MESSAGES, tools=[tool], temperature=1.0, seed=2,
                  tool_choice={"type": "function", "function": {"name": "record_pet"}})
    r = client.chat.completions.create(**kwargs)
    (call,) = r.choices[0].message.tool_calls or []
    assert call.function.name == "record_pet"
    Pet.model_validate_json(call.function.arguments)
    with client.beta.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    (streamed,) = final.choices[0].message.tool_calls or []
    assert streamed.function.arguments == call.function.arguments
    assert isinstance(streamed.function.parsed_arguments, Pet)


class Pick(BaseModel):
    x: Literal["a", "b"]


class Ping(BaseModel):
    """No arguments: the call's arguments are `{}`."""


def test_openai_tools_required_makes_several_calls(client, server):
    """`tool_choice: "required"` as vLLM serves it: a reply may hold several calls (short tools,
    so the tiny model's context has room for two), streamed with increasing `index`."""
    tools = [openai.pydantic_function_tool(Pick, name="f"), openai.pydantic_function_tool(Ping, name="g")]
    kwargs = dict(model="alpha", messages=[{"role": "user", "content": "hi"}], tools=tools, tool_choice="required",
                  temperature=1.0, seed=3)
    r = client.chat.completions.create(**kwargs)
    calls = r.choices[0].message.tool_calls or []
    assert len(calls) >= 2 and r.choices[0].finish_reason == "tool_calls"
    for call in calls:
        {"f": Pick, "g": Ping}[call.function.name].model_validate_json(call.function.arguments)
    with client.beta.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in streamed] == [
        (c.function.name, c.function.arguments) for c in calls]
    assert all(isinstance(c.function.parsed_arguments, Pick | Ping) for c in streamed)
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model="alpha", base_url=server, api_key=KEY, temperature=1.0, seed=3, max_retries=0)
    msg = chat.bind_tools(tools, tool_choice="required").invoke("hi")
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls]


def test_langchain_structured_output_and_bind_tools(server):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model="auto", base_url=server, api_key=KEY, temperature=1.0, seed=3, max_retries=0,
                      extra_body={"routing": {"reroute_every": 2}})
    for method in ("json_schema", "function_calling"):
        pet = chat.with_structured_output(Pet, method=method).invoke("Name a pet.")
        assert isinstance(pet, Pet), (method, pet)
    bound = chat.bind_tools([Pet], tool_choice="Pet")
    msg = bound.invoke("Name a pet.")
    (call,) = msg.tool_calls
    assert call["name"] == "Pet" and Pet.model_validate(call["args"])
    streamed = None
    for chunk in bound.stream("Name a pet."):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None and streamed.tool_calls and streamed.tool_calls[0]["name"] == "Pet"
    Pet.model_validate(streamed.tool_calls[0]["args"])


def test_litellm_tools(server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # its bundled price list: no network at import
    litellm = pytest.importorskip("litellm", reason="litellm is not installed (pip install -e '.[dev]')")
    tool = openai.pydantic_function_tool(Pet, name="record_pet")
    r = litellm.completion(model="openai/alpha", api_base=server, api_key=KEY, messages=MESSAGES, tools=[tool],
                           tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=5)
    (call,) = r.choices[0].message.tool_calls  # "required" with parallel_tool_calls false: exactly one call
    assert call.function.name == "record_pet" and r.choices[0].finish_reason == "tool_calls"
    Pet.model_validate_json(call.function.arguments)
