"""The relay as a client application sees it: the official openai SDK against a real server."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from .harness import Admin
from .records import wait_for_calls

MSG = [{"role": "user", "content": "Say something short."}]


@pytest.fixture(scope="module")
def client(deployment: dict[str, Any]) -> OpenAI:
    return OpenAI(
        base_url=f"{deployment['server'].gateway_url}/v1",
        api_key=deployment["creds"]["api_key"],
        max_retries=0,
    )


def test_completion_with_usage(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model="demo-chat", messages=MSG, extra_body={"mock": {"chunks": 5}}
    )
    assert r.choices[0].message.content == "tok " * 5
    assert r.usage is not None and r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens > 0


def test_stream_with_usage(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="demo-chat",
        messages=MSG,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"mock": {"chunks": 6}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok " * 6
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 6


def test_stream_without_include_usage_hides_the_injected_usage_chunk(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="demo-chat", messages=MSG, stream=True, extra_body={"mock": {"chunks": 3}}
        )
    )
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks), "a usage-only chunk leaked to a client that did not ask"


def test_embeddings(client: OpenAI) -> None:
    r = client.embeddings.create(model="demo-embed", input=["a b c", "d e"])
    assert len(r.data) == 2 and len(r.data[0].embedding) > 0
    assert r.usage.prompt_tokens > 0


def test_models_lists_configured_models(client: OpenAI) -> None:
    names = {m.id for m in client.models.list()}
    assert {"demo-chat", "demo-embed"} <= names


def test_errors_are_openai_shaped(client: OpenAI, deployment: dict[str, Any]) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="no-such-model", messages=MSG)
    assert nf.value.code == "model_not_found"
    bad = OpenAI(base_url=client.base_url, api_key="ot-not-a-real-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as au:
        bad.chat.completions.create(model="demo-chat", messages=MSG)
    assert au.value.code == "invalid_api_key"
    r = httpx.post(
        f"{deployment['server'].gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {deployment['creds']['api_key']}"},
        content=b"{not json",
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert r.headers["x-request-id"]


def test_malformed_requests_get_an_openai_400_naming_the_parameter(client: OpenAI) -> None:
    """What OpenAI refuses is refused before it is forwarded or billed, in a shape the SDK
    raises as BadRequestError with `param` set."""
    cases: list[tuple[str, dict[str, Any]]] = [
        ("messages", {"messages": []}),
        ("max_tokens", {"messages": MSG, "max_tokens": -1}),
        ("max_completion_tokens", {"messages": MSG, "max_completion_tokens": 0}),
        ("n", {"messages": MSG, "n": 0}),
    ]
    for param, kwargs in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="demo-chat", **kwargs)
        assert bad.value.param == param
        assert bad.value.code == "invalid_request"
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model="demo-embed", input=[])
    assert bad.value.param == "input"


def test_every_call_is_recorded_and_billed(client: OpenAI, admin: Admin) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="demo-chat", messages=MSG, extra_body={"mock": {"chunks": 4}}
    )
    rid = raw.headers["x-request-id"]
    usage = raw.parse().usage
    assert usage is not None
    [row] = wait_for_calls(admin, {rid})
    assert row["usage_source"] == "upstream"
    assert row["prompt_tokens"] == usage.prompt_tokens
    assert row["completion_tokens"] == usage.completion_tokens
    # demo-chat: 0.50 input / 1.50 output per million tokens, in nano-units, rounded up per part.
    expected = -(-usage.prompt_tokens * 500_000_000 // 1_000_000) + -(
        -usage.completion_tokens * 1_500_000_000 // 1_000_000
    )
    assert row["cost"] == expected
    assert row["status"] == 200 and row["model_requested"] == "demo-chat"
