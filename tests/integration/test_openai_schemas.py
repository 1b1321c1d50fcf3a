"""The gateway's OpenAI-shaped replies against OpenAI's own published schemas.

Every reply an OpenAI client can receive (chat completions, each stream chunk, embeddings,
the model list, errors, Responses objects and each Responses event) is validated against
the component schemas of the openai/openai-openapi document, kept trimmed under
tests/contract/openai/ (source commit and MIT license beside it). The translated paths are
included: the same OpenAI client API served by OpenAI, Azure, Anthropic and Gemini
providers (the world of test_protocols.py, played by the bundled fake provider).
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from .test_protocols import MSG, TRANSLATED, WEATHER_TOOL, deployment  # noqa: F401

FIXTURE = Path(__file__).resolve().parents[1] / "contract" / "openai" / "openapi-schemas.json"
DOC_URI = "urn:openai-openapi"


def _with_nullable(node: Any) -> Any:
    """OpenAPI's `nullable: true` (still used in places of the 3.1 document) as JSON Schema:
    a null is valid too. Without this a validator would refuse the nulls OpenAI sends."""
    if isinstance(node, list):
        return [_with_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _with_nullable(v) for k, v in node.items()}
    if out.pop("nullable", False) is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def _document() -> dict[str, Any]:
    return dict(_with_nullable(json.loads(FIXTURE.read_text())))


@cache
def _registry() -> Registry[Any]:
    return Registry().with_resource(DOC_URI, Resource(_document(), DRAFT202012))


def _schema(component: str) -> dict[str, Any]:
    return dict(_document()["components"]["schemas"][component])


@cache
def _validator(component: str) -> Draft202012Validator:
    schema = {"$ref": f"{DOC_URI}#/components/schemas/{component}"}
    return Draft202012Validator(schema, registry=_registry())


def _variant(component: str, kind: str) -> str | None:
    """The member of a union discriminated by `type` (ResponseStreamEvent, OutputItem...)
    that declares `kind`: validating against it alone names the real violation, where a
    failed anyOf only says that no member matched."""
    for member in _schema(component).get("anyOf") or _schema(component).get("oneOf") or []:
        name = member.get("$ref", "").rpartition("/")[2]
        declared = _schema(name).get("properties", {}).get("type", {}) if name else {}
        if kind in declared.get("enum", []):
            return str(name)
    return None


def check(component: str, instance: Any) -> None:
    """Fail with the most relevant violation, located by its JSON path in the reply."""
    if "discriminator" in _schema(component) and isinstance(instance, dict):
        variant = _variant(component, str(instance.get("type")))
        assert variant is not None, f"{component} has no member of type {instance.get('type')!r}"
        component = variant
    error = best_match(_validator(component).iter_errors(instance))
    if error is not None:
        raise AssertionError(
            f"{component} at {error.json_path}: {error.message}\n"
            f"reply: {json.dumps(instance)[:2000]}"
        )


def sse_events(response: httpx.Response) -> Iterator[tuple[str | None, str]]:
    """(event name, data) of each server-sent event of a streamed reply."""
    name: str | None = None
    data: list[str] = []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield name, "\n".join(data)
            name, data = None, []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        yield name, "\n".join(data)


@pytest.fixture(scope="module")
def gw(deployment: dict[str, Any]) -> Iterator[httpx.Client]:  # noqa: F811
    key = deployment["creds"]["api_key"]
    with httpx.Client(base_url=deployment["server"].gateway_url,
                      headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        yield client


def _chat_body(model: str, tools: bool) -> dict[str, Any]:
    if not tools:
        return {"model": model, "messages": MSG}
    return {"model": model, "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [WEATHER_TOOL], "mock": {"tool_call": True}}


# -- chat completions --------------------------------------------------------------------


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tool_call"])
@pytest.mark.parametrize("model", TRANSLATED)
def test_chat_completion_matches_schema(gw: httpx.Client, model: str, tools: bool) -> None:
    r = gw.post("/v1/chat/completions", json=_chat_body(model, tools))
    assert r.status_code == 200, r.text
    check("CreateChatCompletionResponse", r.json())


@pytest.mark.parametrize("usage", [False, True], ids=["no_usage", "include_usage"])
@pytest.mark.parametrize("tools", [False, True], ids=["text", "tool_call"])
@pytest.mark.parametrize("model", TRANSLATED)
def test_every_chat_stream_chunk_matches_schema(
    gw: httpx.Client, model: str, tools: bool, usage: bool
) -> None:
    body = {**_chat_body(model, tools), "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    with gw.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = list(sse_events(r))
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert chunks
    for chunk in chunks:
        check("CreateChatCompletionStreamResponse", chunk)
    # The usage chunk is there exactly when asked for.
    assert sum(c.get("usage") is not None for c in chunks) == (1 if usage else 0)


# -- embeddings and models ---------------------------------------------------------------


def _embedding_model(gw: httpx.Client) -> str:
    models = gw.get("/v1/models").json()["data"]
    names = [m["id"] for m in models if "embed" in m["id"]]
    assert names, models
    return str(names[0])


def test_embeddings_match_schema(gw: httpx.Client) -> None:
    body = {"model": _embedding_model(gw), "input": ["a b", "c"]}
    floats = gw.post("/v1/embeddings", json=body)
    assert floats.status_code == 200, floats.text
    check("CreateEmbeddingResponse", floats.json())
    # The document describes float vectors only; a base64 answer (OpenAI's own wire form
    # for `encoding_format: "base64"`) is checked once decoded to the floats it packs.
    packed = gw.post("/v1/embeddings", json={**body, "encoding_format": "base64"})
    assert packed.status_code == 200, packed.text
    reply = packed.json()
    for item in reply["data"]:
        raw = base64.b64decode(item["embedding"], validate=True)
        item["embedding"] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    check("CreateEmbeddingResponse", reply)
    assert [len(d["embedding"]) for d in reply["data"]] == [
        len(d["embedding"]) for d in floats.json()["data"]]


def test_model_list_matches_schema(gw: httpx.Client) -> None:
    r = gw.get("/v1/models")
    assert r.status_code == 200
    check("ListModelsResponse", r.json())
    assert set(TRANSLATED) <= {m["id"] for m in r.json()["data"]}


# -- errors ------------------------------------------------------------------------------


ERRORS: dict[str, tuple[str, str, dict[str, str], bytes | None, int]] = {
    "unknown_key": ("POST", "/v1/chat/completions", {"Authorization": "Bearer ot-nope"},
                    json.dumps({"model": "x-openai", "messages": MSG}).encode(), 401),
    "no_key": ("GET", "/v1/models", {"Authorization": ""}, None, 401),
    "unknown_model": ("POST", "/v1/chat/completions", {},
                      json.dumps({"model": "no-such-model", "messages": MSG}).encode(), 404),
    "invalid_json": ("POST", "/v1/chat/completions", {}, b"{not json", 400),
    "no_model": ("POST", "/v1/chat/completions", {}, b'{"messages": []}', 400),
    "unknown_path": ("GET", "/v1/nothing-here", {}, None, 404),
    "responses_on_anthropic": ("POST", "/v1/responses", {},
                               json.dumps({"model": "x-anthropic", "input": "hi"}).encode(), 0),
    "upstream_failure": ("POST", "/v1/chat/completions", {},
                         json.dumps({"model": "x-anthropic", "messages": MSG,
                                     "mock": {"status": 500}}).encode(), 0),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_match_schema(gw: httpx.Client, case: str) -> None:
    method, path, headers, body, status = ERRORS[case]
    r = gw.request(method, path, headers={"Content-Type": "application/json", **headers},
                   content=body)
    assert r.status_code >= 400 and (status == 0 or r.status_code == status), r.text
    check("ErrorResponse", r.json())


# -- Responses API -----------------------------------------------------------------------


RESPONSES_SERVED = ["x-openai", "x-azure"]


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tool_call"])
@pytest.mark.parametrize("model", RESPONSES_SERVED)
def test_response_object_matches_schema(gw: httpx.Client, model: str, tools: bool) -> None:
    body: dict[str, Any] = {"model": model, "input": "Say something short."}
    if tools:
        body |= {"tools": [{"type": "function", **WEATHER_TOOL["function"]}],
                 "mock": {"tool_call": True}}
    r = gw.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    check("Response", r.json())


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tool_call"])
@pytest.mark.parametrize("model", RESPONSES_SERVED)
def test_every_response_event_matches_schema(gw: httpx.Client, model: str, tools: bool) -> None:
    body: dict[str, Any] = {"model": model, "input": "Say something short.", "stream": True}
    if tools:
        body |= {"tools": [{"type": "function", **WEATHER_TOOL["function"]}],
                 "mock": {"tool_call": True}}
    with gw.stream("POST", "/v1/responses", json=body) as r:
        assert r.status_code == 200
        events = list(sse_events(r))
    assert events
    for name, data in events:
        event = json.loads(data)
        assert event["type"] == name
        check("ResponseStreamEvent", event)
    assert events[-1][0] == "response.completed"
