"""A realistic traffic mix for any onetoken deployment (SRE load tests).

`make locust` (bench/loadtest.py) runs it, sets up keys and checks what it measured; run
by hand it is plain locust:

    ONETOKEN_API_KEYS=key1,key2 locust -f bench/locustfile.py --headless \\
        -u 50 -r 10 -t 2m --host http://127.0.0.1:8080 [--shape ramp|spike|soak]

Environment:
  ONETOKEN_BASE_URL      gateway origin (default http://127.0.0.1:8080; --host overrides)
  ONETOKEN_API_KEYS      comma-separated API keys; simulated users take them in turn, so
                         many keys (tenants) share the load (required)
  ONETOKEN_CHAT_MODEL    chat model (default demo-chat)
  ONETOKEN_EMBED_MODEL   embedding model (default demo-embed)
  ONETOKEN_WAIT          "MIN,MAX" seconds each user waits between requests (default 0.1,1)

Options of its own (beside locust's): --shape, --unknown-keys-per-minute,
--validate-every, --counts-json (see `locust -f bench/locustfile.py --help`).

The mix: non-streaming and streaming chat, embeddings, the model list, and a small share
of bad requests (unknown key, malformed JSON, unknown model) that must fail with the
documented status and error code; they count as successes when they do and as failures
otherwise. Unknown keys are paced (--unknown-keys-per-minute) below the gateway's 401-flood
threshold, so a load test does not get its own address blocked; an unknown key answered
403 `ip_blocked` (the documented answer once a source is blocked) still counts as a
success, and --counts-json says how many were.

Streams are read to the end: `[DONE]` must arrive. Each stream reports its time to the
first content chunk (type TTFT), every gap between consecutive content chunks (type GAP)
and the whole stream (type STREAM), beside the usual rows whose time for a stream is the
time to the response headers. One response in --validate-every of each kind is also
checked against the OpenAI SDK's own types.
"""

from __future__ import annotations

import argparse
import array
import collections
import itertools
import json
import math
import os
import random
import sys
import time
from typing import Any

from locust import HttpUser, LoadTestShape, between, events, task
from locust.env import Environment

BASE_URL = os.environ.get("ONETOKEN_BASE_URL", "http://127.0.0.1:8080").rstrip("/")
API_KEYS = [k.strip() for k in os.environ.get("ONETOKEN_API_KEYS", "").split(",") if k.strip()]
CHAT_MODEL = os.environ.get("ONETOKEN_CHAT_MODEL", "demo-chat")
EMBED_MODEL = os.environ.get("ONETOKEN_EMBED_MODEL", "demo-embed")

SHAPES = ("steady", "ramp", "spike", "soak")
# A shape other than steady always ends: this long when no --run-time is given.
DEFAULT_SHAPE_SECONDS = 120
# The gateway blocks a source after 100 401s in 60 s (ONETOKEN_ATTACK_401_THRESHOLD and
# _WINDOW_SECONDS, docs/security.md): half of that keeps a load test clear of it.
UNKNOWN_KEY_WINDOW_S = 60.0
DEFAULT_UNKNOWN_KEYS_PER_MINUTE = 50


def _wait_bounds() -> tuple[float, float]:
    raw = os.environ.get("ONETOKEN_WAIT", "0.1,1")
    try:
        low, high = (float(x) for x in raw.split(","))
    except ValueError:
        sys.exit(f'ONETOKEN_WAIT must be "MIN,MAX" in seconds, got {raw!r}')
    return low, high


WAIT_MIN, WAIT_MAX = _wait_bounds()
# Users take the keys in turn; what is counted per key is counted by its position, so no
# key ever reaches the counts file.
_key_cycle = itertools.cycle(range(len(API_KEYS) or 1))

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


class Tally:
    """What this process sent and saw beyond locust's own stats (for --counts-json).

    `sent` and `answered` count requests made with a valid key, per key position: the
    gateway stores one call record for each, so after the run the records of a key's org
    lie between the two (a request cut off when users stopped may or may not be stored).
    """

    def __init__(self) -> None:
        self.sent: collections.Counter[int] = collections.Counter()
        self.answered: collections.Counter[int] = collections.Counter()
        self.seen: collections.Counter[str] = collections.Counter()
        self.validated: collections.Counter[str] = collections.Counter()
        self.invalid: collections.Counter[str] = collections.Counter()
        self.unknown_key_blocked = 0
        self.unknown_key_paced = 0
        self.streams_done = 0
        # Microseconds, unrounded: locust's own percentiles round to whole milliseconds,
        # coarser than a gap between chunks.
        self.ttft_us = array.array("d")
        self.gap_us = array.array("d")

    def as_json(self) -> dict[str, Any]:
        return {
            "keys": len(API_KEYS),
            "sent_per_key": [self.sent[i] for i in range(len(API_KEYS))],
            "answered_per_key": [self.answered[i] for i in range(len(API_KEYS))],
            "validated": dict(self.validated),
            "invalid": dict(self.invalid),
            "unknown_key_blocked": self.unknown_key_blocked,
            "unknown_key_paced": self.unknown_key_paced,
            "streams_done": self.streams_done,
            "ttft_us": _percentiles(self.ttft_us),
            "gap_us": _percentiles(self.gap_us),
        }


def _percentiles(values: array.array[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    last = len(ordered) - 1
    return {
        "count": len(ordered),
        **{f"p{q}": round(ordered[round(last * q / 100)], 1) for q in (50, 95, 99)},
        "max": round(ordered[-1], 1),
    }


tally = Tally()


class Pacer:
    """At most `limit` events in any window of `window` seconds (this process)."""

    def __init__(self, limit: float, window: float) -> None:
        self.limit = limit
        self.window = window
        self.times: collections.deque[float] = collections.deque()

    def take(self) -> bool:
        now = time.monotonic()
        while self.times and now - self.times[0] >= self.window:
            self.times.popleft()
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True


unknown_keys = Pacer(DEFAULT_UNKNOWN_KEYS_PER_MINUTE, UNKNOWN_KEY_WINDOW_S)


@events.init_command_line_parser.add_listener
def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shape",
        choices=SHAPES,
        default="steady",
        help="load shape: steady (-u users, reached at -r per second), ramp (up to -u over "
        "80%% of the run, then held), spike (a fifth of -u, all of -u for the middle fifth "
        "of the run, a fifth again) or soak (-u held, meant for long runs); every shape but "
        f"steady ends after -t (default {DEFAULT_SHAPE_SECONDS} s)",
    )
    parser.add_argument(
        "--unknown-keys-per-minute",
        type=float,
        default=DEFAULT_UNKNOWN_KEYS_PER_MINUTE,
        help="most unknown-key requests this process sends in any 60 s (the gateway blocks "
        "a source after 100 401s in 60 s by default); raise it to test the blocker",
    )
    parser.add_argument(
        "--validate-every",
        type=int,
        default=10,
        help="check one response in N of each kind against the OpenAI SDK's types (0: never)",
    )
    parser.add_argument(
        "--counts-json",
        default="",
        help="write this run's own counters (per key position, validated samples) here",
    )


class Settings:
    validate_every = 0


settings = Settings()
_validators: dict[str, Any] = {}


@events.init.add_listener
def _setup(environment: Environment, **_: Any) -> None:
    if not API_KEYS:
        sys.exit(
            "set ONETOKEN_API_KEYS to one or more API keys, comma-separated "
            "(`make locust` creates tenants and keys itself; `python bench/tenants.py` "
            "creates them for a deployment you name)"
        )
    opts = environment.parsed_options
    if opts is None:
        return
    unknown_keys.limit = opts.unknown_keys_per_minute
    if opts.validate_every > 0:
        try:
            from openai.types import CreateEmbeddingResponse, Model
            from openai.types.chat import ChatCompletion, ChatCompletionChunk
            from openai.types.shared import ErrorObject
        except ImportError:
            sys.exit("--validate-every needs the openai package (pip install openai), or 0")
        settings.validate_every = opts.validate_every
        _validators.update(
            chat=ChatCompletion,
            chunk=ChatCompletionChunk,
            embeddings=CreateEmbeddingResponse,
            model=Model,
            error=ErrorObject,
        )


@events.quitting.add_listener
def _write_counts(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is not None and opts.counts_json:
        with open(opts.counts_json, "w") as f:
            json.dump(tally.as_json(), f, indent=2)


def _sampled(kind: str) -> bool:
    """One response in --validate-every of this kind (the first one included)."""
    tally.seen[kind] += 1
    every = settings.validate_every
    return every > 0 and (tally.seen[kind] - 1) % every == 0


def _validate(kind: str, validator: str, *payloads: Any) -> str | None:
    """None when every payload (a response, or each event of a stream) is what the OpenAI
    SDK's type accepts, else why not. Counts the response once either way."""
    for payload in payloads:
        try:
            _validators[validator].model_validate(payload)
        except Exception as exc:  # pydantic's ValidationError, or anything a bad shape raises
            tally.invalid[kind] += 1
            return f"not an OpenAI {validator}: {type(exc).__name__}"
    tally.validated[kind] += 1
    return None


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


def _error_code(resp: Any) -> tuple[str | None, Any]:
    """The `error.code` of an OpenAI-shaped error body (None if it is not one), and the
    error object itself."""
    try:
        error = resp.json()["error"]
        if isinstance(error.get("message"), str) and isinstance(error.get("type"), str):
            return str(error.get("code")), error
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return None, None


class GatewayUser(HttpUser):
    host = BASE_URL
    wait_time = between(WAIT_MIN, WAIT_MAX)

    def on_start(self) -> None:
        self.key_index = next(_key_cycle)
        self.auth = {"Authorization": f"Bearer {API_KEYS[self.key_index]}"}

    @task(40)
    def chat(self) -> None:
        with self._keyed("POST", "/v1/chat/completions", "chat", json=_chat_body(False)) as resp:
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
            elif _sampled("chat") and (why := _validate("chat", "chat", data)):
                resp.failure(why)

    @task(30)
    def chat_stream(self) -> None:
        started = time.perf_counter()
        chunks: list[float] = []  # arrival time of each content chunk
        events_seen: list[bytes] = []
        done = False
        size = 0
        sampled = _sampled("chat stream")
        with self._keyed(
            "POST", "/v1/chat/completions", "chat stream", json=_chat_body(True), stream=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            buf = b""
            try:
                # chunk_size=None yields each read as it arrives, so a chunk's time is when
                # it reached us, not when some buffer filled.
                for data in resp.iter_content(chunk_size=None):
                    arrived = time.perf_counter()
                    size += len(data)
                    buf += data
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        if event.startswith(b"data: [DONE]"):
                            done = True
                            continue
                        if b'"content"' in event:
                            chunks.append(arrived)
                        if sampled:
                            events_seen.append(event)
            except OSError as exc:
                resp.failure(f"stream broke: {type(exc).__name__}")
                return
            if not done:
                resp.failure("stream ended without [DONE]")
                return
            if not chunks:
                resp.failure("stream carried no content")
                return
            if sampled:
                payloads = []
                for event in events_seen:
                    try:
                        payloads.append(json.loads(event.removeprefix(b"data: ")))
                    except ValueError:
                        payloads.append(None)
                if why := _validate("chat stream", "chunk", *payloads):
                    resp.failure(why)
                    return
        ended = time.perf_counter()
        tally.streams_done += 1
        tally.ttft_us.append((chunks[0] - started) * 1e6)
        self._report("TTFT", (chunks[0] - started) * 1000)
        for before, after in itertools.pairwise(chunks):
            tally.gap_us.append((after - before) * 1e6)
            self._report("GAP", (after - before) * 1000)
        self._report("STREAM", (ended - started) * 1000, size)

    @task(10)
    def embeddings(self) -> None:
        inputs = rng.sample(EMBED_TEXTS, k=rng.randint(1, len(EMBED_TEXTS)))
        body = {"model": EMBED_MODEL, "input": inputs}
        with self._keyed("POST", "/v1/embeddings", "embeddings", json=body) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            try:
                data = resp.json()
                ok = len(data["data"]) == len(inputs)
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                resp.failure("one vector per input expected")
            elif _sampled("embeddings") and (why := _validate("embeddings", "embeddings", data)):
                resp.failure(why)

    @task(5)
    def models(self) -> None:
        with self._keyed("GET", "/v1/models", "models") as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            try:
                data = resp.json()
                listed = data["object"] == "list" and isinstance(data["data"], list)
            except (ValueError, KeyError, TypeError):
                listed = False
            if not listed:
                resp.failure("reply is not a model list")
            elif _sampled("models") and (why := _validate("models", "model", *data["data"])):
                resp.failure(why)

    @task(2)
    def bad_key(self) -> None:
        if not unknown_keys.take():
            tally.unknown_key_paced += 1
            return
        headers = {"Authorization": f"Bearer ot-not-a-real-key-{rng.randrange(10**9)}"}
        with self.client.post(
            "/v1/chat/completions",
            json=_chat_body(False),
            headers=headers,
            name="expected 401: unknown key",
            catch_response=True,
        ) as resp:
            # 403 ip_blocked: the source was blocked by the 401-flood detector, what the
            # gateway documents for an unknown key from there (docs/security.md, item 10).
            answer = self._judge(
                resp, "unknown key", (401, "invalid_api_key"), (403, "ip_blocked")
            )
            if answer == (403, "ip_blocked"):
                tally.unknown_key_blocked += 1

    @task(2)
    def bad_json(self) -> None:
        with self._keyed(
            "POST",
            "/v1/chat/completions",
            "expected 400: malformed JSON",
            data='{"model": ',
            headers={"Content-Type": "application/json"},
        ) as resp:
            self._judge(resp, "malformed JSON", (400, "invalid_json"))

    @task(1)
    def unknown_model(self) -> None:
        body = {**_chat_body(False), "model": f"no-such-model-{rng.randrange(1000)}"}
        with self._keyed(
            "POST", "/v1/chat/completions", "expected 404: unknown model", json=body
        ) as resp:
            self._judge(resp, "unknown model", (404, "model_not_found"))

    def _keyed(self, method: str, path: str, name: str, **kwargs: Any) -> Any:
        """A request with this user's key whose outcome the task judges (catch_response),
        counted for the stored-calls check: sent before it goes, answered once a response
        came back."""
        headers = {**self.auth, **kwargs.pop("headers", {})}
        tally.sent[self.key_index] += 1
        ctx = self.client.request(
            method, path, headers=headers, name=name, catch_response=True, **kwargs
        )
        return _Answered(ctx, self.key_index)

    def _judge(
        self, resp: Any, kind: str, *documented: tuple[int, str]
    ) -> tuple[int, str | None]:
        """Success only for one of the documented (status, error code) pairs; returns the
        pair the gateway answered."""
        code, error = _error_code(resp)
        answer = (resp.status_code, code)
        if answer not in documented:
            wanted = " or ".join(f"{s} {c}" for s, c in documented)
            resp.failure(f"status {resp.status_code} {code}, expected {wanted}")
        elif _sampled(kind) and (why := _validate(kind, "error", error)):
            resp.failure(why)
        else:
            resp.success()
        return answer

    def _report(self, kind: str, millis: float, size: int = 0) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name="chat stream",
            response_time=millis,
            response_length=size,
            exception=None,
            context={},
        )


class _Answered:
    """Wraps locust's response context: counts the request as answered when a response
    (any status) came back."""

    def __init__(self, ctx: Any, key_index: int) -> None:
        self.ctx = ctx
        self.key_index = key_index

    def __enter__(self) -> Any:
        resp = self.ctx.__enter__()
        if resp.status_code:
            tally.answered[self.key_index] += 1
        return resp

    def __exit__(self, *exc: Any) -> Any:
        return self.ctx.__exit__(*exc)


def plan(shape: str, t: float, total: float, users: int, rate: float) -> tuple[int, float]:
    """Users wanted at `t` seconds into a run of `total`, and the spawn rate to get there.
    Never more than `users`."""
    if shape == "ramp":
        # Steps up to the peak over 80% of the run, then holds it.
        wanted = math.ceil(users * min(1.0, t / (0.8 * total)))
        return max(1, wanted), max(rate, float(users))
    if shape == "spike":
        base = max(1, users // 5)
        in_spike = 0.4 * total <= t < 0.6 * total
        # The spike arrives (and leaves) within a second, whatever -r says.
        return (users if in_spike else base), max(rate, float(users))
    return users, rate


class Shape(LoadTestShape):
    """The load shape named by --shape, bounded by -u users and -t seconds."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        opts = self.runner.environment.parsed_options
        assert opts is not None
        users = int(opts.num_users or 1)
        rate = float(opts.spawn_rate or 1)
        total = opts.run_time
        if opts.shape == "steady" and not total:
            return users, rate  # locust's own behaviour: until stopped
        total = float(total or DEFAULT_SHAPE_SECONDS)
        t = self.get_run_time()
        if t >= total:
            return None
        return plan(opts.shape, t, total, users, rate)
