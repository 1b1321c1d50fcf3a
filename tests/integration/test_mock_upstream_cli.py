"""`onetoken mock-upstream` as benchmarks and demos run it: flags set server-wide defaults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx

from onetoken import _core


def test_cli_flags_set_the_defaults_and_sigint_stops_it() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "onetoken.cli",
            "mock-upstream",
            "--listen",
            "127.0.0.1:0",
            "--chunks",
            "3",
        ],
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # It binds before it says where it listens: no wait needed after this line.
        assert proc.stderr is not None
        announced = proc.stderr.readline().decode()
        base = announced.partition("listening on ")[2].strip()
        assert base.startswith("http://127.0.0.1:"), announced
        r = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.json()["choices"][0]["message"]["content"] == "tok " * 3
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    assert code == 0


def test_in_process_defaults_are_overridden_per_request() -> None:
    mock = _core.MockUpstream("127.0.0.1:0", chunks=2)
    addr = mock.start()
    try:
        body = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
        plain = httpx.post(f"http://{addr}/v1/chat/completions", json=body).json()
        assert plain["usage"]["completion_tokens"] == 2
        told = httpx.post(
            f"http://{addr}/v1/chat/completions", json={**body, "mock": {"chunks": 5}}
        ).json()
        assert told["usage"]["completion_tokens"] == 5
    finally:
        mock.stop()
