"""The real clients against a live loopback server: the `openai` SDK (sync and async, streaming,
chat, logprobs, echo, token-id prompts, penalties, errors as its exception classes) and
LangChain's `ChatOpenAI` / `OpenAI` (package langchain-openai)."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.live import CLIENT_KEY as KEY

MESSAGES = [{"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def server(live_clients):
    return f"{live_clients.base}/v1", live_clients.app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=60)


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert {"tiny-gpt2", "alpha", "beta"} <= set(ids)
    assert client.models.retrieve("alpha").id == "alpha"


def test_chat_plain_and_streamed(client):
    plain = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=8, temperature=0)
    text = plain.choices[0].message.content
    assert plain.choices[0].message.role == "assistant" and text
    assert plain.usage is not None and plain.usage.completion_tokens == 8
    stream = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_chat_logprobs_and_routing_extension(client):
    r = client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"routing": {"weights": {"alpha": 0.5, "beta": 0.5}}})
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert r.choices[0].model_extra["routing"][0]["weights"] == {"alpha": 0.5, "beta": 0.5}


def test_completions_logprobs_echo_token_ids_and_penalties(client):
    r = client.completions.create(model="alpha", prompt="def add(a, b):", max_tokens=6, temperature=0, logprobs=5)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 6 and len(lp.top_logprobs) == 6 and lp.text_offset[0] == 0
    scored = client.completions.create(model="alpha", prompt=[[5, 17, 42, 8], [7, 1, 300]], max_tokens=0, echo=True,
                                       logprobs=1)
    assert [len(c.logprobs.token_logprobs) for c in scored.choices] == [4, 3]
    assert all(c.logprobs.token_logprobs[0] is None for c in scored.choices)
    penalised = client.completions.create(model="alpha", prompt="the cat sat on the mat", max_tokens=12, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=1.0,
                                          extra_body={"repetition_penalty": 1.5, "min_tokens": 2})
    plain = client.completions.create(model="alpha", prompt="the cat sat on the mat", max_tokens=12, temperature=0)
    assert penalised.choices[0].text != plain.choices[0].text
    streamed = client.completions.create(model="alpha", prompt="def add(a, b):", max_tokens=6, temperature=0,
                                         logprobs=5, stream=True)
    tokens = [t for chunk in streamed for t in (chunk.choices[0].logprobs.tokens if chunk.choices[0].logprobs else [])]
    assert tokens == lp.tokens


def test_errors_map_to_sdk_exceptions(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="alpha", prompt="x", max_tokens=2, suffix="y")
    assert bad.value.param == "suffix"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2, temperature=5)
    wrong = openai.OpenAI(base_url=server[0], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_async_client(server):
    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=60) as client:
            plain = await client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=6, temperature=0)
            stream = await client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=6, temperature=0,
                                                          stream=True)
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return plain.choices[0].message.content or "", "".join(parts)

    plain, streamed = asyncio.run(run())
    assert plain and plain == streamed


def test_langchain_chat_and_llm(server, client):
    from langchain_openai import ChatOpenAI, OpenAI

    chat = ChatOpenAI(model="alpha", base_url=server[0], api_key=KEY, max_tokens=8, temperature=0, max_retries=0)
    reply = chat.invoke("def add(a, b):")
    ref = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=8, temperature=0)
    assert reply.content == ref.choices[0].message.content
    assert "".join(str(c.content) for c in chat.stream("def add(a, b):")) == reply.content
    llm = OpenAI(model="alpha", base_url=server[0], api_key=KEY, max_tokens=6, temperature=0, max_retries=0)
    text = llm.invoke("def add(a, b):")
    assert text == client.completions.create(model="alpha", prompt="def add(a, b):", max_tokens=6,
                                             temperature=0).choices[0].text
