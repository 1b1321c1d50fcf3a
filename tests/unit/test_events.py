"""The in-process event bus (onetoken.kit.events)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from onetoken.kit.events import EventBus


@dataclass(frozen=True)
class Opened:
    name: str


@dataclass(frozen=True)
class Closed:
    name: str


def test_publish_reaches_the_subscribers_of_its_type_in_order() -> None:
    bus = EventBus()
    seen: list[str] = []
    bus.subscribe(Opened, lambda e: seen.append(f"a:{e.name}"))
    bus.subscribe(Opened, lambda e: seen.append(f"b:{e.name}"))
    bus.subscribe(Closed, lambda e: seen.append(f"closed:{e.name}"))
    assert bus.publish(Opened("x")) == 0
    assert seen == ["a:x", "b:x"]
    bus.publish(Closed("y"))
    assert seen == ["a:x", "b:x", "closed:y"]


def test_an_event_without_subscribers_is_dropped() -> None:
    assert EventBus().publish(Opened("nobody")) == 0


def test_a_failing_subscriber_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    seen: list[str] = []

    def broken(event: Opened) -> None:
        raise RuntimeError(event.name)

    bus.subscribe(Opened, broken)
    bus.subscribe(Opened, lambda e: seen.append(e.name))
    with caplog.at_level(logging.ERROR, logger="onetoken.events"):
        assert bus.publish(Opened("secret-value")) == 1
    assert seen == ["secret-value"]
    (rec,) = [r for r in caplog.records if r.getMessage() == "events.subscriber_failed"]
    assert rec.__dict__["exc_type"] == "RuntimeError"
    assert rec.__dict__["event_type"] == "Opened"
    # The event's content is never logged.
    assert "secret-value" not in caplog.text


def test_unsubscribe_stops_delivery() -> None:
    bus = EventBus()
    seen: list[str] = []

    def handler(e: Opened) -> None:
        seen.append(e.name)

    bus.subscribe(Opened, handler)
    bus.unsubscribe(Opened, handler)
    bus.publish(Opened("x"))
    assert seen == []
