"""The control end of the gateway channel: `/internal/gateway/*` on the control listener.

Gateways (onetoken.gateway.runner) fetch their engine config and poll snapshots here with
the bearer token `channel_token(master secret, GATEWAY)`. Both answers carry secrets
(the key-hash secret, provider credentials): without the token the answer is 401, and
the endpoints are left out of the public OpenAPI document.
"""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request, Response

from onetoken.gateway.supervisor import engine_config
from onetoken.kit.channel import bearer_matches
from onetoken.kit.errors import Unauthorized
from onetoken.orgs.terms import POOL_NAME
from onetoken.web.deps import StateDep

# Neither answer may be kept by a cache on the way.
_NO_STORE = {"Cache-Control": "no-store"}
# The longest a snapshot poll is held open waiting for a change.
MAX_WAIT_S = 60.0


def gateway_channel(request: Request, state: StateDep) -> None:
    """Let the request through only with the gateway channel's token."""
    if not bearer_matches(request.headers.get("authorization"), state.gateway_token):
        raise Unauthorized("Missing or invalid gateway channel token.")


router = APIRouter(
    prefix="/internal/gateway",
    include_in_schema=False,
    dependencies=[Depends(gateway_channel)],
)


@router.get("/config")
def config(state: StateDep) -> Response:
    """The engine config (tests/contract/engine_config.json), key-hash secrets included."""
    body = orjson.dumps(engine_config(state.settings, state.secrets))
    return Response(body, media_type="application/json", headers=_NO_STORE)


@router.get("/snapshot")
def snapshot(
    state: StateDep,
    instance: Annotated[str, Query(min_length=1, max_length=128)],
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0.0,
    pool: Annotated[str | None, Query(pattern=POOL_NAME.pattern)] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The snapshot for engine `instance` (its spent marks) of gateway pool `pool` (absent:
    the shared gateways), or 304 for a current ETag; with `wait`, a current ETag is
    answered when something changed or after `wait` s."""
    etag, body = state.snapshots.poll(instance, if_none_match, wait, pool)
    headers = {**_NO_STORE, "ETag": etag}
    if body is None:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)
