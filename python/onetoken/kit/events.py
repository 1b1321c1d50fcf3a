"""An in-process event bus: typed, synchronous publish/subscribe.

Subscribers register per event type (the exact class of the published object). publish()
calls them in subscription order on the publisher's thread; a subscriber that raises is
logged (the event's type and the exception's type, never the event) and the others still
run, so a broken consumer never breaks the code that published. The composition root
(onetoken.control) owns the process's bus and does the subscribing."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("onetoken.events")

E = TypeVar("E")


class EventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[type[Any], tuple[Callable[[Any], object], ...]] = {}

    def subscribe(self, event_type: type[E], handler: Callable[[E], object]) -> None:
        """Call `handler(event)` for every published event of exactly `event_type`."""
        with self._lock:
            self._subscribers[event_type] = (*self._subscribers.get(event_type, ()), handler)

    def unsubscribe(self, event_type: type[E], handler: Callable[[E], object]) -> None:
        with self._lock:
            left = tuple(h for h in self._subscribers.get(event_type, ()) if h != handler)
            self._subscribers[event_type] = left

    def subscribers(self, event_type: type[Any]) -> tuple[Callable[[Any], object], ...]:
        return self._subscribers.get(event_type, ())

    def publish(self, event: object) -> int:
        """Deliver `event` to its type's subscribers; returns how many failed. Never raises
        for a subscriber's exception."""
        failed = 0
        for handler in self._subscribers.get(type(event), ()):
            try:
                handler(event)
            except Exception as exc:
                failed += 1
                log.error(
                    "events.subscriber_failed",
                    extra={
                        "event_type": type(event).__name__,
                        "subscriber": getattr(handler, "__qualname__", type(handler).__name__),
                        "exc_type": type(exc).__name__,
                    },
                )
        return failed
