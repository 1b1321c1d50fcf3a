"""A realistic traffic mix for any onetoken deployment (SRE load tests).

    ONETOKEN_BASE_URL=http://127.0.0.1:8080 ONETOKEN_API_KEYS=key1,key2 \\
        bench/.venv-litellm/bin/locust -f bench/locustfile.py --headless -u 50 -r 10 -t 2m

Environment:
  ONETOKEN_BASE_URL      gateway origin (default http://127.0.0.1:8080; --host overrides)
  ONETOKEN_API_KEYS      comma-separated API keys; simulated users take them in turn, so
                         many keys (tenants) share the load (required)
  ONETOKEN_CHAT_MODEL    chat model (default demo-chat)
  ONETOKEN_EMBED_MODEL   embedding model (default demo-embed)
  ONETOKEN_WAIT          "MIN,MAX" seconds each user waits between requests (default 0.1,1)

The mix: non-streaming and streaming chat, embeddings, the model list, and a small share
of bad requests (unknown key, malformed JSON, unknown model) that must fail with the
documented status; they count as successes when they do and as failures otherwise.
Streams are read to the end: `[DONE]` must arrive. Time to first token is reported as its
own entry (type TTFT) and the whole stream as type STREAM, beside the usual rows whose
time for a stream is the time to the response headers.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
import time
from typing import Any

from locust import HttpUser, between, events, task

BASE_URL = os.environ.get("ONETOKEN_BASE_URL", "http://127.0.0.1:8080").rstrip("/")
API_KEYS = [k.strip() for k in os.environ.get("ONETOKEN_API_KEYS", "").split(",") if k.strip()]
CHAT_MODEL = os.environ.get("ONETOKEN_CHAT_MODEL", "demo-chat")
EMBED_MODEL = os.environ.get("ONETOKEN_EMBED_MODEL", "demo-embed")


def _wait_bounds() -> tuple[float, float]:
    raw = os.environ.get("ONETOKEN_WAIT", "0.1,1")
    try:
        low, high = (float(x) for x in raw.split(","))
    except ValueError:
        sys.exit(f'ONETOKEN_WAIT must be "MIN,MAX" in seconds, got {raw!r}')
    return low, high


WAIT_MIN, WAIT_MAX = _wait_bounds()
_key_cycle = itertools.cycle(API_KEYS or [""])

PROMPTS = (
    "Summarise the plot of Hamlet in two sentences.",
    "Write a haiku about load balancers.",
    "What is the capital of Australia?",
    "Explain idempotency keys to a new engineer.",
    "Translate 'good morning' into French, German and Spanish.",
    "List three ways to reduce tail latency in a web service.",
)
EMBED_TEXTS = (
    "invoice overdue reminder",
    "reset my password please",
    "quarterly revenue grew by eight percent",
    "the cat sat on the mat",
)

# Traffic shapes only, not secrets: the standard generator is fine.
rng = random.Random()  # noqa: S311


@events.init.add_listener
def _require_keys(environment: Any, **_: Any) -> None:
    if not API_KEYS:
        sys.exit(
            "set ONETOKEN_API_KEYS to one or more API keys, comma-separated "
            "(`onetoken bootstrap --json` prints one; `onetoken keys create` makes more)"
        )


def _chat_body(stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": CHAT_MODEL,
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": rng.choice(PROMPTS)},
        ],
        "max_tokens": rng.choice((16, 64, 128)),
    }
    if stream:
        body["stream"] = True
    return body


class GatewayUser(HttpUser):
    host = BASE_URL
    wait_time = between(WAIT_MIN, WAIT_MAX)

    def on_start(self) -> None:
        self.key = next(_key_cycle)
        self.auth = {"Authorization": f"Bearer {self.key}"}

    @task(40)
    def chat(self) -> None:
        with self._post("/v1/chat/completions", "chat", _chat_body(stream=False)) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            try:
                data = resp.json()
                ok = data["choices"][0]["message"]["content"] is not None and "usage" in data
            except (ValueError, KeyError, IndexError, TypeError):
                ok = False
            if not ok:
                resp.failure("reply is not a chat.completion with usage")

    @task(30)
    def chat_stream(self) -> None:
        started = time.perf_counter()
        first_token: float | None = None
        done = False
        size = 0
        with self._post(
            "/v1/chat/completions", "chat stream", _chat_body(stream=True), stream=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            buf = b""
            try:
                # chunk_size=None yields each chunk as it arrives, so the first token's
                # time is when it reached us, not when some buffer filled.
                for chunk in resp.iter_content(chunk_size=None):
                    size += len(chunk)
                    buf += chunk
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        if event.startswith(b"data: [DONE]"):
                            done = True
                        elif first_token is None and b'"content"' in event:
                            first_token = time.perf_counter()
            except OSError as exc:
                resp.failure(f"stream broke: {type(exc).__name__}")
                return
            if not done:
                resp.failure("stream ended without [DONE]")
                return
        ended = time.perf_counter()
        if first_token is not None:
            self._report("TTFT", "chat stream", (first_token - started) * 1000, 0)
        self._report("STREAM", "chat stream", (ended - started) * 1000, size)

    @task(10)
    def embeddings(self) -> None:
        inputs = rng.sample(EMBED_TEXTS, k=rng.randint(1, len(EMBED_TEXTS)))
        with self._post(
            "/v1/embeddings", "embeddings", {"model": EMBED_MODEL, "input": inputs}
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
            elif len(resp.json().get("data", [])) != len(inputs):
                resp.failure("one vector per input expected")

    @task(5)
    def models(self) -> None:
        with self.client.get(
            "/v1/models", headers=self.auth, name="models", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")

    @task(2)
    def bad_key(self) -> None:
        headers = {"Authorization": f"Bearer ot-not-a-real-key-{rng.randrange(10**9)}"}
        self._expect(401, "expected 401: unknown key", json=_chat_body(False), headers=headers)

    @task(2)
    def bad_json(self) -> None:
        headers = {**self.auth, "Content-Type": "application/json"}
        self._expect(400, "expected 400: malformed JSON", data='{"model": ', headers=headers)

    @task(1)
    def unknown_model(self) -> None:
        body = {**_chat_body(False), "model": f"no-such-model-{rng.randrange(1000)}"}
        self._expect(404, "expected 404: unknown model", json=body, headers=self.auth)

    def _post(self, path: str, name: str, body: dict[str, Any], **kwargs: Any) -> Any:
        """A POST with this user's key whose outcome the task judges (catch_response)."""
        return self.client.post(
            path, json=body, headers=self.auth, name=name, catch_response=True, **kwargs
        )

    def _expect(self, status: int, name: str, **kwargs: Any) -> None:
        with self.client.post(
            "/v1/chat/completions", name=name, catch_response=True, **kwargs
        ) as resp:
            if resp.status_code != status:
                resp.failure(f"status {resp.status_code}, expected {status}")
                return
            try:
                error = resp.json()["error"]
                shaped = isinstance(error.get("message"), str) and "type" in error
            except (ValueError, KeyError, TypeError, AttributeError):
                shaped = False
            if shaped:
                resp.success()
            else:
                resp.failure("error body is not OpenAI-shaped")

    def _report(self, kind: str, name: str, millis: float, size: int) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=millis,
            response_length=size,
            exception=None,
            context={},
        )
