"""The unit-priced interfaces as a client application sees them: image generation,
moderations and rerank through the official openai SDK (rerank, which it lacks, through
`client.post`), each priced by its unit (docs/gateway-spec.md, "Unit prices"), recorded
with its units, and refused or failed in the OpenAI error shape."""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from onetoken.demo import DEMO_UNIT_PRICES

from .catalog import new_key
from .harness import Admin
from .records import wait_for_calls

IMAGE_PRICES: dict[str, int] = DEMO_UNIT_PRICES["demo-image"]["image_prices"]  # type: ignore[assignment]
SEARCH_UNIT_PRICE: int = DEMO_UNIT_PRICES["demo-rerank"]["search_unit_price"]  # type: ignore[assignment]


@pytest.fixture(scope="module")
def client(deployment: dict[str, Any]) -> OpenAI:
    return OpenAI(
        base_url=f"{deployment['server'].gateway_url}/v1",
        api_key=deployment["creds"]["api_key"],
        max_retries=0,
    )


def test_images_are_relayed_and_charged_per_image_at_their_size_and_quality(
    client: OpenAI, admin: Admin
) -> None:
    raw = client.images.with_raw_response.generate(
        model="demo-image", prompt="a lighthouse at dusk", n=2, size="1024x1024", quality="hd"
    )
    images = raw.parse()
    assert images.data is not None and len(images.data) == 2
    png = base64.b64decode(images.data[0].b64_json or "")
    assert png.startswith(b"\x89PNG")
    default = client.images.with_raw_response.generate(
        model="demo-image", prompt="a lighthouse at dusk", size="512x512"
    )
    rows = wait_for_calls(admin, {raw.headers["x-request-id"], default.headers["x-request-id"]})
    by_id = {r["request_id"]: r for r in rows}
    hd = by_id[raw.headers["x-request-id"]]
    assert (hd["images"], hd["cost"]) == (2, 2 * IMAGE_PRICES["1024x1024/hd"])
    assert hd["path"] == "/v1/images/generations" and hd["model_served"] == "mock-image"
    assert (hd["prompt_tokens"], hd["completion_tokens"]) == (0, 0)
    # A size the operator did not list is charged at the model's default image price.
    other = by_id[default.headers["x-request-id"]]
    assert (other["images"], other["cost"]) == (1, IMAGE_PRICES["default"])


def test_images_settle_on_what_the_upstream_returned(client: OpenAI, admin: Admin) -> None:
    raw = client.images.with_raw_response.generate(
        model="demo-image", prompt="p", n=3, extra_body={"mock": {"images": 1}}
    )
    assert len(raw.parse().data or []) == 1
    [row] = wait_for_calls(admin, {raw.headers["x-request-id"]})
    assert (row["images"], row["usage_source"]) == (1, "upstream")
    assert row["cost"] == IMAGE_PRICES["1024x1024/standard"]


def test_image_failures_are_openai_errors_and_free(client: OpenAI, admin: Admin) -> None:
    with pytest.raises(openai.InternalServerError) as failed:
        client.images.generate(
            model="demo-image", prompt="p", extra_body={"mock": {"status": 500}}
        )
    assert failed.value.code == "upstream_error"
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(model="demo-image", prompt="p", n=11)
    assert (bad.value.code, bad.value.param) == ("invalid_request", "n")
    # A chat model is not an image model.
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="demo-chat", prompt="p")
    rid = failed.value.response.headers["x-request-id"]
    [row] = wait_for_calls(admin, {rid})
    assert (row["cost"], row["images"], row["status"]) == (0, 0, 500)


def test_moderations_pass_through_free(client: OpenAI, admin: Admin) -> None:
    raw = client.moderations.with_raw_response.create(
        model="demo-moderation", input=["a calm morning", "plan the attack"]
    )
    result = raw.parse()
    assert [r.flagged for r in result.results] == [False, True]
    assert result.results[1].categories.violence
    [row] = wait_for_calls(admin, {raw.headers["x-request-id"]})
    assert (row["path"], row["status"], row["cost"]) == ("/v1/moderations", 200, 0)
    with pytest.raises(openai.RateLimitError):
        client.moderations.create(
            model="demo-moderation", input="x", extra_body={"mock": {"status": 429}}
        )
    with pytest.raises(openai.BadRequestError) as bad:
        client.moderations.create(model="demo-moderation", input=[])
    assert bad.value.param == "input"


def rerank(client: OpenAI, **body: Any) -> httpx.Response:
    """POST /v1/rerank through the SDK's generic request, the answer as it came."""
    return client.post("/rerank", body={"model": "demo-rerank", **body}, cast_to=httpx.Response)


def test_rerank_is_charged_per_search_unit(client: OpenAI, admin: Admin) -> None:
    docs = ["the cat sat", "a dog ran", "the cat and the dog"] + [f"filler {i}" for i in range(150)]
    answer = rerank(client, query="cat dog", documents=docs, top_n=2)
    parsed = answer.json()
    assert [r["index"] for r in parsed["results"]] == [2, 0]
    assert parsed["meta"]["billed_units"]["search_units"] == 2
    # The upstream's billed units are what is charged, whatever the document count says.
    billed = rerank(client, query="q", documents=["a"], mock={"search_units": 5})
    # Without billed units in the answer: one unit per started hundred documents.
    counted = rerank(client, query="q", documents=docs, mock={"usage": False})
    ids = {r.headers["x-request-id"] for r in (answer, billed, counted)}
    rows = {r["request_id"]: r for r in wait_for_calls(admin, ids)}
    got = [
        (rows[r.headers["x-request-id"]]["search_units"], rows[r.headers["x-request-id"]]["cost"],
         rows[r.headers["x-request-id"]]["usage_source"])
        for r in (answer, billed, counted)
    ]
    assert got == [
        (2, 2 * SEARCH_UNIT_PRICE, "upstream"),
        (5, 5 * SEARCH_UNIT_PRICE, "upstream"),
        (2, 2 * SEARCH_UNIT_PRICE, "estimated"),
    ]


def test_rerank_failures_are_openai_errors(client: OpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        rerank(client, query="q", documents=["a"], mock={"status": 503})
    with pytest.raises(openai.BadRequestError) as bad:
        rerank(client, query="q", documents=[])
    assert bad.value.param == "documents"


CHARACTER_PRICE: int = DEMO_UNIT_PRICES["demo-tts"]["character_price"]  # type: ignore[assignment]


def test_speech_streams_as_it_arrives_and_is_charged_per_input_character(
    client: OpenAI, admin: Admin
) -> None:
    text = "Hello, wörld! 🦀"  # 15 characters, more bytes
    # The fake provider sends the audio in 5 pieces 300 ms apart: a relay that held the
    # whole audio would deliver its first byte only after the last piece.
    started = time.monotonic()
    with client.audio.speech.with_streaming_response.create(
        model="demo-tts", voice="alloy", input=text,
        extra_body={"mock": {"chunks": 5, "delay_ms": 300}},
    ) as resp:
        assert resp.headers["content-type"] == "audio/mpeg"
        pieces = resp.iter_bytes()
        first = next(pieces)
        first_at = time.monotonic() - started
        audio = first + b"".join(pieces)
        total = time.monotonic() - started
        rid = resp.headers["x-request-id"]
    assert audio.startswith(b"ID3") and len(audio) == 5 + 15 * 32
    assert first_at < total - 0.8, (first_at, total)
    [row] = wait_for_calls(admin, {rid})
    assert (row["path"], row["characters"], row["streamed"]) == ("/v1/audio/speech", 15, 1)
    assert row["cost"] == -(-15 * CHARACTER_PRICE // 1_000_000)


def test_speech_failures(client: OpenAI, admin: Admin) -> None:
    with pytest.raises(openai.InternalServerError):
        client.audio.speech.create(
            model="demo-tts", voice="alloy", input="x", extra_body={"mock": {"status": 500}}
        )
    with pytest.raises(openai.BadRequestError) as bad:
        client.audio.speech.create(model="demo-tts", voice="alloy", input="x" * 4097)
    assert bad.value.param == "input"
    # An upstream that dies mid-audio: what arrived is relayed and the record says so.
    with client.audio.speech.with_streaming_response.create(
        model="demo-tts", voice="alloy", input="abcd",
        extra_body={"mock": {"chunks": 4, "cut_after": 2}},
    ) as resp:
        got = b"".join(resp.iter_bytes())
        rid = resp.headers["x-request-id"]
    assert 0 < len(got) < 5 + 4 * 32
    [row] = wait_for_calls(admin, {rid})
    assert (row["status"], row["error_code"]) == (200, "upstream_stream_cut")


def test_keys_limits_and_balance_apply_as_for_chat(
    client: OpenAI, admin: Admin, deployment: dict[str, Any]
) -> None:
    base = f"{deployment['server'].gateway_url}/v1"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=base, api_key="ot-not-a-key", max_retries=0).images.generate(
            model="demo-image", prompt="p"
        )
    _, chat_only = new_key(admin, "chat only", allowed_models=["demo-chat"])
    scoped = OpenAI(base_url=base, api_key=chat_only, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        scoped.audio.speech.create(model="demo-tts", voice="alloy", input="hi")
    assert denied.value.code == "model_not_allowed"
    # A key whose day budget cannot cover the images asked for is refused before the
    # upstream is called, from the reservation of n images.
    _, tight = new_key(admin, "tight", limits={"budget_day": "0.05"})
    budgeted = OpenAI(base_url=base, api_key=tight, max_retries=0)
    assert budgeted.images.generate(model="demo-image", prompt="p", n=1).data
    with pytest.raises(openai.RateLimitError) as limited:
        budgeted.images.generate(model="demo-image", prompt="p", n=2)
    assert limited.value.code == "budget_exceeded"
