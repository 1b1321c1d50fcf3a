"""Speech to text as a client application sees it: /v1/audio/transcriptions and
/v1/audio/translations through the official openai SDK, the upload streamed through to
the upstream (never held whole), capped, sent once, reserved at the longest audio its
bytes can hold and settled on the duration the upstream heard (docs/gateway-spec.md,
"Audio uploads")."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from onetoken import _core
from onetoken.demo import DEMO_UNIT_PRICES
from onetoken.kit.money import NANO_PER_UNIT

from ..support import wait_until
from .harness import Admin
from .records import wait_for_calls

AUDIO_SECOND_PRICE: int = DEMO_UNIT_PRICES["demo-whisper"]["audio_second_price"]  # type: ignore[assignment]
#: The gateway's default cap on an upload (OpenAI's 25 MB).
MAX_UPLOAD_BYTES = 25 * 1024 * 1024
CANARY = f"CANARY-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def client(deployment: dict[str, Any]) -> OpenAI:
    return OpenAI(
        base_url=f"{deployment['server'].gateway_url}/v1",
        api_key=deployment["creds"]["api_key"],
        max_retries=0,
    )


def balance(admin: Admin) -> int:
    """The org's balance, nano-units."""
    return int(Decimal(admin.get("/api/v1/billing/balance")["balance"]) * NANO_PER_UNIT)


def cost_of(audio_ms: int) -> int:
    # Per second of audio, on milliseconds, rounded up once.
    return -(-audio_ms * AUDIO_SECOND_PRICE // 1000)


def test_transcription_settles_on_the_duration_the_upstream_reports(
    client: OpenAI, admin: Admin
) -> None:
    before = balance(admin)
    audio = b"RIFF" + bytes(47_996)  # 48 000 bytes: 3 s at the fake provider's bitrate
    plain = client.audio.transcriptions.with_raw_response.create(
        file=("a.wav", audio, "audio/wav"), model="demo-whisper"
    )
    assert plain.parse().text == "transcribed 48000 bytes with mock-whisper"
    verbose = client.audio.transcriptions.with_raw_response.create(
        file=("a.wav", audio, "audio/wav"), model="demo-whisper",
        response_format="verbose_json", extra_body={"mock_duration": "12.3451"},
    )
    assert verbose.parse().duration == pytest.approx(12.3451)
    translated = client.audio.translations.with_raw_response.create(
        file=("a.wav", audio, "audio/wav"), model="demo-whisper"
    )
    assert translated.parse().text == "translated 48000 bytes with mock-whisper"
    rows = wait_for_calls(admin, {r.headers["x-request-id"] for r in (plain, verbose, translated)})
    got = {r["request_id"]: (r["path"], r["audio_ms"], r["cost"], r["status"]) for r in rows}
    assert got == {
        plain.headers["x-request-id"]: ("/v1/audio/transcriptions", 3000, cost_of(3000), 200),
        verbose.headers["x-request-id"]: (
            "/v1/audio/transcriptions", 12_346, cost_of(12_346), 200
        ),
        translated.headers["x-request-id"]: ("/v1/audio/translations", 3000, cost_of(3000), 200),
    }
    # The ledger is charged exactly what the records say.
    charged = 2 * cost_of(3000) + cost_of(12_346)
    wait_until(lambda: balance(admin) == before - charged, message=lambda: "ledger settled")


def test_an_answer_without_a_duration_is_charged_the_reservation(
    client: OpenAI, admin: Admin
) -> None:
    audio = bytes(2_000)
    resp = client.audio.transcriptions.with_raw_response.create(
        file=("a.wav", audio, "audio/wav"), model="demo-whisper", response_format="text"
    )
    assert resp.parse().strip() == "transcribed 2000 bytes with mock-whisper"
    [row] = wait_for_calls(admin, {resp.headers["x-request-id"]})
    # The whole form's bytes at 16 kbit/s: the longest audio the upload could hold.
    assert row["audio_ms"] > 2_000 * 8 * 1000 // 16_000
    assert row["cost"] == cost_of(row["audio_ms"])


def test_failures_are_openai_errors_and_free(client: OpenAI, admin: Admin) -> None:
    with pytest.raises(openai.InternalServerError) as failed:
        client.audio.transcriptions.create(
            file=("a.wav", b"RIFF", "audio/wav"), model="demo-whisper",
            extra_body={"mock_status": "500"},
        )
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(file=("a.wav", b"RIFF", "audio/wav"), model="demo-tts")
    rid = failed.value.response.headers["x-request-id"]
    [row] = wait_for_calls(admin, {rid})
    assert (row["status"], row["cost"], row["attempts"]) == (500, 0, 1)


def test_model_after_the_file_and_not_multipart_are_refused(
    deployment: dict[str, Any]
) -> None:
    gw = httpx.Client(base_url=deployment["server"].gateway_url, timeout=30)
    auth = {"Authorization": f"Bearer {deployment['creds']['api_key']}"}
    late = gw.post(
        "/v1/audio/transcriptions", headers=auth,
        files={"file": ("a.wav", b"RIFF", "audio/wav")}, data={"model": "demo-whisper"},
    )
    # httpx sends the fields first; a form with the file first is built by hand.
    boundary = "b0undary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
        f"\r\nRIFF\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
        f"demo-whisper\r\n--{boundary}--\r\n"
    ).encode()
    file_first = gw.post(
        "/v1/audio/transcriptions", headers={
            **auth, "Content-Type": f"multipart/form-data; boundary={boundary}"
        }, content=body,
    )
    json_body = gw.post(
        "/v1/audio/transcriptions", headers=auth, json={"model": "demo-whisper"}
    )
    assert late.status_code == 200
    assert (file_first.status_code, file_first.json()["error"]["param"]) == (400, "model")
    # The rest of a refused upload is never read: the connection is not reused for it.
    assert file_first.headers["connection"] == "close"
    assert (json_body.status_code, json_body.json()["error"]["param"]) == (400, "file")


def form_head(boundary: str, model: str = "demo-whisper") -> bytes:
    return (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
        f"Content-Type: audio/wav\r\n\r\n"
    ).encode()


def test_uploads_over_the_cap_are_413(deployment: dict[str, Any]) -> None:
    gw = httpx.Client(base_url=deployment["server"].gateway_url, timeout=60)
    auth = {"Authorization": f"Bearer {deployment['creds']['api_key']}"}
    boundary = "capb0undary"
    ctype = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    # A declared length over the cap is refused before the body is read: the head alone
    # is sent, and the answer comes without the rest.
    url = httpx.URL(deployment["server"].gateway_url)
    with socket.create_connection((url.host, url.port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {auth['Authorization']}\r\n"
            f"Content-Type: {ctype['Content-Type']}\r\n"
            f"Content-Length: {MAX_UPLOAD_BYTES + 1}\r\n\r\n".encode() + form_head(boundary)
        )
        answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413") and '"body_too_large"' in answer, answer

    def chunked() -> Iterator[bytes]:
        yield form_head(boundary)
        for _ in range(MAX_UPLOAD_BYTES // (1 << 20) + 1):
            yield bytes(1 << 20)
        yield f"\r\n--{boundary}--\r\n".encode()

    streamed = gw.post("/v1/audio/transcriptions", headers={**auth, **ctype}, content=chunked())
    assert (streamed.status_code, streamed.json()["error"]["code"]) == (413, "body_too_large")


def test_the_upload_reaches_the_upstream_while_the_client_still_sends(
    deployment: dict[str, Any], mock_upstream: tuple[_core.MockUpstream, str], admin: Admin
) -> None:
    mock = mock_upstream[0]
    gw = httpx.Client(base_url=deployment["server"].gateway_url, timeout=60)
    auth = {"Authorization": f"Bearer {deployment['creds']['api_key']}"}
    boundary = "streamb0undary"
    before = mock.upload_bytes()
    first = bytes(256 * 1024)

    def slow() -> Iterator[bytes]:
        yield form_head(boundary) + first
        # A gateway that held the upload whole would not send a byte upstream before the
        # rest arrives, and this wait would time out.
        wait_until(lambda: mock.upload_bytes() - before >= len(first), timeout=10)
        yield bytes(256 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    resp = gw.post(
        "/v1/audio/transcriptions",
        headers={**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=slow(),
    )
    assert resp.json()["text"] == f"transcribed {512 * 1024} bytes with mock-whisper"
    [row] = wait_for_calls(admin, {resp.headers["x-request-id"]})
    # 512 KiB at the fake provider's 16 000 bytes per second is 32.768 s, reported (as
    # OpenAI's `usage.seconds`) in whole seconds.
    assert row["audio_ms"] == 33_000


def test_audio_and_transcript_stay_out_of_records_and_errors(
    client: OpenAI, admin: Admin, deployment: dict[str, Any]
) -> None:
    needle = CANARY.encode()
    ok = client.audio.transcriptions.with_raw_response.create(
        file=("a.wav", b"RIFF" + needle * 50, "audio/wav"), model="demo-whisper",
        extra_body={"mock_text": CANARY},
    )
    assert ok.parse().text == CANARY  # the client gets its transcript
    with pytest.raises(openai.APIStatusError) as failed:
        client.audio.transcriptions.create(
            file=(CANARY, needle, "audio/wav"), model="demo-whisper",
            extra_body={"mock_status": "400", "mock_text": CANARY},
        )
    assert CANARY not in failed.value.response.text
    rows = wait_for_calls(
        admin, {ok.headers["x-request-id"], failed.value.response.headers["x-request-id"]}
    )
    assert CANARY not in repr(rows)
    # The journal, chDB's files and every log live under the data dir.
    files = [p for p in deployment["server"].data_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" or "spool" in p.parts for p in files), files
    for path in files:
        assert needle not in path.read_bytes(), path
