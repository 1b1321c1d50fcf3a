"""Protocol translation as client applications see it: the official openai and anthropic
SDKs against a real server whose providers speak OpenAI, Azure OpenAI, Anthropic
Messages and Gemini (all played by the bundled fake provider), streaming and not, with
tool calls; every answer parses in the SDK and is billed at its deployment's price.

The catalog comes from a providers file applied at server start; `onetoken providers
apply` changes it while the server runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from openai import OpenAI

from tests.support import wait_until

from .catalog import expected_cost, write_providers_file
from .harness import Admin, Server, bootstrap, cli
from .records import wait_for_calls

PER_M = 1_000_000_000
UPSTREAM_SECRET = "sk-ant-fake-credential-0a1b2c3d"
MSG = [{"role": "user", "content": "Say something short."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ANTHROPIC_TOOL = {
    "name": "get_weather",
    "description": "Weather in a city.",
    "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
}

# public name -> (provider protocol, input price, output price) in units per million tokens
DEPLOYMENTS = {
    "x-openai": ("openai", 1, 2),
    "x-azure": ("azure", 2, 8),
    "x-anthropic": ("anthropic", 3, 15),
    "x-gemini": ("gemini", 1, 3),
}
TRANSLATED = ["x-openai", "x-azure", "x-anthropic", "x-gemini"]


def _catalog(mock: str, gitops_price: int = 1) -> dict[str, Any]:
    bases = {
        "openai": f"http://{mock}/v1",
        "azure": f"http://{mock}",
        "anthropic": f"http://{mock}/v1",
        "gemini": f"http://{mock}/v1beta",
    }
    upstream = {"openai": "mock-gpt", "azure": "mock-gpt", "anthropic": "mock-claude",
                "gemini": "mock-gemini"}
    providers = []
    for name, (protocol, inp, out) in DEPLOYMENTS.items():
        entry: dict[str, Any] = {
            "name": f"p-{protocol}",
            "protocol": protocol,
            "base_url": bases[protocol],
            "models": [{"name": name, "upstream_model": upstream[protocol],
                        "input_price": str(inp), "output_price": str(out)}],
        }
        if protocol == "openai":
            # Only the GitOps test calls it (and changes its price).
            entry["models"].append({"name": "x-gitops", "upstream_model": "mock-gpt",
                                    "input_price": str(gitops_price),
                                    "output_price": str(gitops_price)})
        if protocol == "anthropic":
            entry["preset"] = "anthropic"
            entry["api_key_env"] = "ONETOKEN_TEST_ANTHROPIC_KEY"
        if protocol == "azure":
            entry["api_version"] = "2024-10-21"
        providers.append(entry)
    return {"providers": providers}


@pytest.fixture(scope="module")
def deployment(  # this module's server applies a catalog file at start
    tmp_path_factory: pytest.TempPathFactory, mock_addr: str
) -> Iterator[dict[str, Any]]:
    data_dir: Path = tmp_path_factory.mktemp("onetoken-protocols")
    creds = bootstrap(data_dir)
    catalog = write_providers_file(data_dir / "providers.yaml", _catalog(mock_addr))
    env = {"ONETOKEN_PROVIDERS_FILE": str(catalog),
           "ONETOKEN_TEST_ANTHROPIC_KEY": UPSTREAM_SECRET}
    server = Server(data_dir=data_dir, upstream=mock_addr, extra_env=env)
    server.start()
    try:
        yield {"server": server, "creds": creds, "data_dir": data_dir, "catalog": catalog,
               "env": env, "mock": mock_addr}
    finally:
        server.kill()


@pytest.fixture(scope="module")
def oai(deployment: dict[str, Any]) -> OpenAI:
    return OpenAI(base_url=f"{deployment['server'].gateway_url}/v1",
                  api_key=deployment["creds"]["api_key"], max_retries=0)


@pytest.fixture(scope="module")
def ant(deployment: dict[str, Any]) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=deployment["server"].gateway_url,
                               api_key=deployment["creds"]["api_key"], max_retries=0)


def _prices(model: str) -> tuple[int, int]:
    _, inp, out = DEPLOYMENTS[model]
    return inp * PER_M, out * PER_M


def _check_billed(admin: Admin, rid: str, model: str, prompt: int, completion: int) -> None:
    [row] = wait_for_calls(admin, {rid})
    assert row["status"] == 200 and row["usage_source"] == "upstream", row
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    assert row["model_requested"] == model
    assert row["cost"] == expected_cost(prompt, completion, *_prices(model))
    assert row["cost"] > 0


def _finish_reasons(chunks: list[Any]) -> list[str]:
    return [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]


# -- the catalog file --------------------------------------------------------------------


def test_catalog_file_was_applied_at_start(admin: Admin) -> None:
    listed = admin.http.get("/api/v1/providers")
    assert UPSTREAM_SECRET not in listed.text
    by_name = {p["name"]: p for p in listed.json()["data"]}
    assert {"p-openai", "p-azure", "p-anthropic", "p-gemini"} <= set(by_name)
    claude = by_name["p-anthropic"]
    assert claude["managed_by"] == "file" and claude["scope"] == "platform"
    assert claude["has_api_key"] and claude["credential_env"] == "ONETOKEN_TEST_ANTHROPIC_KEY"
    assert (claude["vendor"], claude["api_version"]) == ("anthropic", "2023-06-01")


# -- OpenAI chat clients -----------------------------------------------------------------


@pytest.mark.parametrize("model", TRANSLATED)
def test_openai_chat_json(oai: OpenAI, admin: Admin, model: str) -> None:
    raw = oai.chat.completions.with_raw_response.create(model=model, messages=MSG)
    r = raw.parse()
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens > 0
    _check_billed(admin, raw.headers["x-request-id"], model, r.usage.prompt_tokens,
                  r.usage.completion_tokens)


# A 1x1 PNG and a few bytes of WAV header: what travels is checked, not what it shows.
PIXEL = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
WAV = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAEAfAAABAAgAZGF0YQAAAAA="


@pytest.mark.parametrize("model", TRANSLATED)
def test_images_in_chat_reach_every_protocol(oai: OpenAI, model: str) -> None:
    r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}},
        {"type": "image_url", "image_url": {"url": "https://example.test/cat.png"}},
    ]}])
    assert r.choices[0].message.content


@pytest.mark.parametrize("model", TRANSLATED)
def test_audio_in_chat_is_refused_where_the_upstream_cannot_hear(oai: OpenAI, model: str) -> None:
    messages: Any = [{"role": "user", "content": [
        {"type": "text", "text": "Transcribe this."},
        {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}},
    ]}]
    if DEPLOYMENTS[model][0] == "anthropic":
        with pytest.raises(openai.BadRequestError) as bad:
            oai.chat.completions.create(model=model, messages=messages)
        assert (bad.value.code, bad.value.param) == ("invalid_request", "messages")
        assert "Audio input is not supported" in bad.value.message
    else:
        assert oai.chat.completions.create(model=model, messages=messages).choices


def test_anthropic_clients_send_images_to_openai_upstreams(ant: anthropic.Anthropic) -> None:
    r = ant.messages.create(model="x-openai", max_tokens=20, messages=[{"role": "user", "content": [
        {"type": "text", "text": "And this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}},
    ]}])
    assert r.content and r.content[0].type == "text"


@pytest.mark.parametrize("model", TRANSLATED)
def test_openai_chat_stream(oai: OpenAI, admin: Admin, model: str) -> None:
    with oai.chat.completions.with_streaming_response.create(
        model=model, messages=MSG, stream=True, stream_options={"include_usage": True}
    ) as raw:
        rid = raw.headers["x-request-id"]
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert _finish_reasons(chunks) == ["stop"]
    [usage] = [c.usage for c in chunks if c.usage is not None]
    _check_billed(admin, rid, model, usage.prompt_tokens, usage.completion_tokens)


@pytest.mark.parametrize("model", TRANSLATED)
def test_openai_stream_without_usage_request_hides_usage(oai: OpenAI, model: str) -> None:
    chunks = list(oai.chat.completions.create(model=model, messages=MSG, stream=True))
    assert chunks and all(c.usage is None for c in chunks)


@pytest.mark.parametrize("model", TRANSLATED)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_openai_tool_calls(oai: OpenAI, admin: Admin, model: str, stream: bool) -> None:
    kwargs: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        # The fake provider answers with a call of the first declared tool on request.
        "extra_body": {"mock": {"tool_call": True}},
    }
    if not stream:
        raw = oai.chat.completions.with_raw_response.create(**kwargs)
        r = raw.parse()
        [call] = r.choices[0].message.tool_calls or []
        assert call.function.name == "get_weather" and call.id
        assert isinstance(json.loads(call.function.arguments), dict)
        assert r.choices[0].finish_reason == "tool_calls"
        assert r.usage is not None
        _check_billed(admin, raw.headers["x-request-id"], model, r.usage.prompt_tokens,
                      r.usage.completion_tokens)
        return
    with oai.chat.completions.with_streaming_response.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    ) as raw:
        rid = raw.headers["x-request-id"]
        chunks = list(raw.parse())
    name, args = "", ""
    for c in chunks:
        for choice in c.choices:
            for tc in choice.delta.tool_calls or []:
                name += (tc.function.name or "") if tc.function else ""
                args += (tc.function.arguments or "") if tc.function else ""
    assert name == "get_weather" and isinstance(json.loads(args), dict)
    assert _finish_reasons(chunks) == ["tool_calls"]
    [usage] = [c.usage for c in chunks if c.usage is not None]
    _check_billed(admin, rid, model, usage.prompt_tokens, usage.completion_tokens)


# -- Anthropic Messages clients ----------------------------------------------------------

ANTHROPIC_SERVED = ["x-openai", "x-anthropic"]


@pytest.mark.parametrize("model", ANTHROPIC_SERVED)
def test_anthropic_messages_json(ant: anthropic.Anthropic, admin: Admin, model: str) -> None:
    raw = ant.messages.with_raw_response.create(model=model, max_tokens=64, messages=MSG)
    m = raw.parse()
    assert m.type == "message" and m.role == "assistant"
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason == "end_turn"
    _check_billed(admin, raw.headers["x-request-id"], model, m.usage.input_tokens,
                  m.usage.output_tokens)


@pytest.mark.parametrize("model", ANTHROPIC_SERVED)
def test_anthropic_messages_stream(ant: anthropic.Anthropic, admin: Admin, model: str) -> None:
    with ant.messages.with_streaming_response.create(
        model=model, max_tokens=64, messages=MSG, stream=True
    ) as raw:
        rid = raw.headers["x-request-id"]
        events = list(raw.parse())
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    text = "".join(
        e.delta.text for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text
    [delta] = [e for e in events if e.type == "message_delta"]
    assert delta.delta.stop_reason == "end_turn"
    start = next(e for e in events if e.type == "message_start")
    prompt = delta.usage.input_tokens or start.message.usage.input_tokens
    _check_billed(admin, rid, model, prompt, delta.usage.output_tokens)


@pytest.mark.parametrize("model", ANTHROPIC_SERVED)
def test_anthropic_stream_helper_and_tool_use(ant: anthropic.Anthropic, model: str) -> None:
    with ant.messages.stream(
        model=model, max_tokens=64,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"mock": {"tool_call": True}},
    ) as s:
        final = s.get_final_message()
    [block] = [b for b in final.content if b.type == "tool_use"]
    assert block.name == "get_weather" and isinstance(block.input, dict) and block.id
    assert final.stop_reason == "tool_use"
    m = ant.messages.create(
        model=model, max_tokens=64,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"mock": {"tool_call": True}},
    )
    assert [b.type for b in m.content if b.type == "tool_use"] == ["tool_use"]


def test_anthropic_errors_are_anthropic_shaped(ant: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as nf:
        ant.messages.create(model="no-such-model", max_tokens=8, messages=MSG)
    assert nf.value.status_code == 404
    bad = anthropic.Anthropic(base_url=str(ant.base_url), api_key="ot-nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="x-openai", max_tokens=8, messages=MSG)


# -- Responses API -----------------------------------------------------------------------


def test_responses_passthrough(oai: OpenAI, admin: Admin) -> None:
    raw = oai.responses.with_raw_response.create(model="x-openai", input="Say something short.")
    r = raw.parse()
    assert r.output_text
    assert r.usage is not None and r.usage.output_tokens > 0
    _check_billed(admin, raw.headers["x-request-id"], "x-openai", r.usage.input_tokens,
                  r.usage.output_tokens)


def test_responses_stream(oai: OpenAI, admin: Admin) -> None:
    with oai.responses.with_streaming_response.create(
        model="x-openai", input="Say something short.", stream=True
    ) as raw:
        rid = raw.headers["x-request-id"]
        events = list(raw.parse())
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text
    [done] = [e for e in events if e.type == "response.completed"]
    usage = done.response.usage
    assert usage is not None
    _check_billed(admin, rid, "x-openai", usage.input_tokens, usage.output_tokens)


# -- GitOps while running ----------------------------------------------------------------


def test_providers_apply_reaches_the_running_gateway(
    deployment: dict[str, Any], oai: OpenAI, admin: Admin
) -> None:
    """`onetoken providers apply` in another process: the price change is served within a
    second (the server's revision watcher). Refusals and idempotence of the command are
    covered by tests/unit/test_providers_file.py."""
    catalog: Path = deployment["catalog"]
    changed = write_providers_file(
        catalog.with_name("changed.yaml"), _catalog(deployment["mock"], gitops_price=2)
    )
    out = json.loads(cli(deployment["data_dir"], "providers", "apply", str(changed), "--json",
                         env=deployment["env"]).stdout)
    assert out["updated"] == ["model:p-openai/x-gitops"] and out["created"] == []

    def charged_the_new_price() -> bool:
        raw = oai.chat.completions.with_raw_response.create(model="x-gitops", messages=MSG)
        usage = raw.parse().usage
        assert usage is not None
        [row] = wait_for_calls(admin, {raw.headers["x-request-id"]})
        new_cost = expected_cost(usage.prompt_tokens, usage.completion_tokens,
                                 2 * PER_M, 2 * PER_M)
        return bool(row["cost"] == new_cost)

    wait_until(charged_the_new_price, 5, 0.1, message="the applied price charged")
