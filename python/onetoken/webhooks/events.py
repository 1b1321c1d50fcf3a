"""Event kinds an endpoint can subscribe to, and the event envelope."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from typing import Final, Literal, get_args

import orjson

from onetoken.kit.crypto import BASE62

EventKind = Literal[
    "balance_low",
    "quota_exhausted",
    "key_risk",
    "abnormal_login",
    "abnormal_calls",
    "frequency_anomaly",
    "attack_blocked",
    "permission_change",
    "system_alarm",
]
EVENT_KINDS: Final[tuple[str, ...]] = get_args(EventKind)
# Sent only by POST /webhooks/{id}/test, to that endpoint, whatever it subscribes to.
TEST_KIND: Final = "webhook_test"

Scalar = str | int | bool | None
_MAX_FIELDS = 32
_MAX_STR = 256


def normalize_kind(kind: str) -> str:
    """Billing names its events `balance.low`; the catalogue spells them `balance_low`."""
    return kind.strip().lower().replace(".", "_")


def new_event_id() -> str:
    return "evt_" + "".join(secrets.choice(BASE62) for _ in range(24))


def clean_data(data: Mapping[str, object]) -> dict[str, Scalar]:
    """Flat metadata only: short scalar values under short keys; anything else is dropped
    (so a caller cannot turn an event into a content carrier by accident)."""
    out: dict[str, Scalar] = {}
    for key, value in data.items():
        if len(out) >= _MAX_FIELDS or not isinstance(key, str) or not 0 < len(key) <= 64:
            continue
        if value is None or isinstance(value, bool | int):
            out[key] = value
        elif isinstance(value, float):
            out[key] = str(value)
        elif isinstance(value, str):
            out[key] = value[:_MAX_STR]
    return out


def envelope(event_id: str, kind: str, org_id: str, data: Mapping[str, Scalar]) -> bytes:
    return orjson.dumps(
        {
            "id": event_id,
            "type": kind,
            "created": int(time.time()),
            "org_id": org_id,
            "data": dict(data),
        },
        option=orjson.OPT_SORT_KEYS,
    )
