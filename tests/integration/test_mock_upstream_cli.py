"""`onetoken mock-upstream` as benchmarks and demos run it: flags set server-wide defaults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from onetoken import _core

from .harness import free_port


def test_cli_flags_set_the_defaults_and_sigint_stops_it() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "onetoken.cli",
            "mock-upstream",
            "--listen",
            f"127.0.0.1:{port}",
            "--chunks",
            "3",
        ],
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json={"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]},
                )
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "mock-upstream did not start"
                time.sleep(0.05)
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
