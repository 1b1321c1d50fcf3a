"""Org and key policies, /v1/models, routing and fallback, through a real server whose
catalog comes from a providers file (ONETOKEN_PROVIDERS_FILE) applied at start.

Four providers with different data-processing attributes each serve their own name
(so each policy's effect is visible per provider) and together serve `pol-chat`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from onetoken import _core
from tests.support import free_port

from .catalog import (
    admin_org,
    expected_cost,
    failing_base,
    failing_upstream,
    new_key,
    put,
    write_providers_file,
)
from .harness import Admin, deployed
from .records import wait_for_calls

MSG = [{"role": "user", "content": "Say something short."}]
PER_M = 1_000_000_000  # one currency unit per million tokens, in nano-units

# name, vendor, region, trains_on_data, zero_retention, retains_content
PROVIDERS = (
    ("us-openai", "openai", "us", False, True, False),
    ("eu-google", "google", "eu", False, False, True),
    ("cn-alibaba", "alibaba", "cn-mainland", False, False, True),
    ("cn-deepseek", "deepseek", "cn-mainland", True, False, True),
)
ALL_OWN = {f"pol-{p[0]}" for p in PROVIDERS}


def _catalog(mock: str, failing: Any, refused_port: int) -> dict[str, Any]:
    providers: list[dict[str, Any]] = []
    for i, (name, vendor, region, trains, zero, retains) in enumerate(PROVIDERS):
        providers.append(
            {
                "name": name,
                "base_url": f"http://{mock}/v1",
                "vendor": vendor,
                "region": region,
                "trains_on_data": trains,
                "zero_retention": zero,
                "retains_content": retains,
                "models": [
                    {"name": f"pol-{name}", "upstream_model": "mock-gpt",
                     "input_price": "1", "output_price": "2"},
                    {"name": "pol-chat", "upstream_model": "mock-gpt", "priority": i,
                     "input_price": str(i + 1), "output_price": str(2 * (i + 1))},
                ],
            }
        )
    # Strategies: rt-cheap (lowest_price picks the dearer-by-priority but cheaper one) and
    # rt-weighted (weights 1 : 3).
    extra = {
        "us-openai": [{"name": "rt-cheap", "upstream_model": "mock-gpt", "priority": 0,
                       "input_price": "5", "output_price": "5"},
                      {"name": "rt-weighted", "upstream_model": "mock-gpt", "weight": 1,
                       "input_price": "1", "output_price": "1"}],
        "eu-google": [{"name": "rt-cheap", "upstream_model": "mock-gpt", "priority": 1,
                       "input_price": "1", "output_price": "1"}],
        "cn-alibaba": [{"name": "rt-weighted", "upstream_model": "mock-gpt", "weight": 3,
                        "input_price": "1", "output_price": "1"}],
        # rt-train: the cheapest deployment is a provider that trains on data.
        "cn-deepseek": [{"name": "rt-train", "upstream_model": "mock-gpt",
                         "input_price": "1", "output_price": "1"}],
    }
    extra["us-openai"].append({"name": "rt-train", "upstream_model": "mock-gpt",
                               "input_price": "9", "output_price": "9"})
    for p in providers:
        p["models"] += extra.get(p["name"], [])
    # Fallback pairs: a failing primary (priority 0) and the mock as secondary.
    primaries = {
        "fb-500": failing_base(failing, "s500"),
        "fb-429": failing_base(failing, "s429"),
        "fb-refused": f"http://127.0.0.1:{refused_port}/v1",
        "fb-cut": failing_base(failing, "cut"),
    }
    for name, base in primaries.items():
        providers.append(
            {
                "name": f"{name}-primary",
                "base_url": base,
                "connect_timeout_ms": 1000,
                "models": [{"name": name, "upstream_model": "mock-gpt", "priority": 0,
                            "input_price": "5", "output_price": "5"}],
            }
        )
    providers.append(
        {
            "name": "secondary",
            "base_url": f"http://{mock}/v1",
            "models": [
                {"name": name, "upstream_model": "mock-gpt", "priority": 1,
                 "input_price": "3", "output_price": "7"}
                for name in primaries
            ],
        }
    )
    return {
        "providers": providers,
        "routes": [
            {"name": "pol-chat", "strategy": "priority", "aliases": ["pol-alias"]},
            {"name": "rt-cheap", "strategy": "lowest_price"},
            {"name": "rt-weighted", "strategy": "weighted"},
            {"name": "rt-train", "strategy": "lowest_price"},
        ],
        # Enough attempts and a breaker that stays closed for the few failures here.
        "routing": {"max_attempts": 3, "retry_deadline_ms": 10000, "backoff_ms": 10,
                    "breaker_failures": 50, "breaker_open_ms": 1000},
    }


@pytest.fixture(scope="module")
def failing() -> Iterator[Any]:
    with failing_upstream() as srv:
        yield srv


@pytest.fixture(scope="module")
def deployment(  # overrides the shared fixture: this module's server has a catalog file
    tmp_path_factory: pytest.TempPathFactory, mock_addr: str, failing: Any
) -> Iterator[dict[str, Any]]:
    data_dir: Path = tmp_path_factory.mktemp("onetoken-policy")
    catalog = write_providers_file(
        data_dir / "providers.yaml", _catalog(mock_addr, failing, free_port())
    )
    with deployed(data_dir, mock_addr, {"ONETOKEN_PROVIDERS_FILE": str(catalog)}) as d:
        yield d


@pytest.fixture(scope="module")
def org_id(admin: Admin) -> str:
    return admin_org(admin)


#: The permissive policy: the org's owner (the bootstrap admin) lifted no_training.
OPEN: dict[str, Any] = {"no_training": False}


@pytest.fixture
def policy(admin: Admin, org_id: str) -> Iterator[Any]:
    """Starts one test on the permissive policy, lets it set others, and puts the
    permissive one back after it."""

    # The control API pushes the snapshot before it answers, so no waiting is needed.
    def set_policy(body: dict[str, Any]) -> None:
        put(admin, f"/api/v1/orgs/{org_id}/policy", body)

    set_policy(OPEN)
    yield set_policy
    set_policy(OPEN)


def _client(deployment: dict[str, Any], key: str) -> OpenAI:
    return OpenAI(base_url=f"{deployment['server'].gateway_url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def key(admin: Admin) -> str:
    return new_key(admin, "policy tests")[1]


def _reachable(client: OpenAI) -> set[str]:
    """Own names of the policy providers that the key can reach, by calling each."""
    ok = set()
    for name in sorted(ALL_OWN):
        try:
            client.chat.completions.create(model=name, messages=MSG, max_tokens=5)
            ok.add(name)
        except openai.PermissionDeniedError as exc:
            assert exc.code == "policy_denied", name
            assert "policy" in exc.message and "Say something" not in exc.message
    return ok


def _listed(client: OpenAI) -> set[str]:
    return {m.id for m in client.models.list()} & ALL_OWN


CASES: list[tuple[str, dict[str, Any], set[str]]] = [
    ("allow_vendors", {"allow_vendors": ["openai", "alibaba"]},
     {"pol-us-openai", "pol-cn-alibaba"}),
    ("deny_vendors", {"deny_vendors": ["deepseek"]},
     ALL_OWN - {"pol-cn-deepseek"}),
    ("mainland_china_only", {"allow_regions": ["cn-mainland"], "no_training": False},
     {"pol-cn-alibaba", "pol-cn-deepseek"}),
    ("deny_regions", {"deny_regions": ["us", "eu"], "no_training": False},
     {"pol-cn-alibaba", "pol-cn-deepseek"}),
    ("allow_models", {"allow_models": ["pol-eu-google", "pol-chat"]},
     {"pol-eu-google"}),
    ("deny_models", {"deny_models": ["pol-us-openai"], "no_training": False},
     ALL_OWN - {"pol-us-openai"}),
    ("no_training", {"no_training": True},
     ALL_OWN - {"pol-cn-deepseek"}),
    # The default: what an org that never chose gets.
    ("default", {},
     ALL_OWN - {"pol-cn-deepseek"}),
    ("zero_retention_only", {"zero_retention_only": True},
     {"pol-us-openai"}),
    ("combined", {"allow_regions": ["cn-mainland"], "no_training": True},
     {"pol-cn-alibaba"}),
]


@pytest.mark.parametrize(("label", "body", "allowed"), CASES, ids=[c[0] for c in CASES])
def test_each_policy_blocks_exactly_its_providers(
    deployment: dict[str, Any], key: str, policy: Any, label: str, body: dict[str, Any],
    allowed: set[str],
) -> None:
    client = _client(deployment, key)
    assert _reachable(client) == ALL_OWN and _listed(client) == ALL_OWN
    policy(body)
    assert _reachable(client) == allowed, label
    assert _listed(client) == allowed, label


def test_shared_name_is_served_by_the_first_permitted_deployment(
    deployment: dict[str, Any], admin: Admin, key: str, policy: Any
) -> None:
    client = _client(deployment, key)
    providers = {p["name"]: p["id"] for p in admin.get("/api/v1/providers")["data"]}
    rid = {}
    for label, body in (("open", {}), ("cn", {"allow_regions": ["cn-mainland"]}),
                        ("cn_no_training", {"allow_regions": ["cn-mainland"],
                                            "deny_vendors": ["alibaba"], "no_training": True})):
        policy(body)
        if label == "cn_no_training":
            # Only cn-deepseek is in the region and it trains: nothing may serve.
            with pytest.raises(openai.PermissionDeniedError) as denied:
                client.chat.completions.create(model="pol-chat", messages=MSG)
            assert denied.value.code == "policy_denied"
            assert "pol-chat" not in {m.id for m in client.models.list()}
            continue
        raw = client.chat.completions.with_raw_response.create(
            model="pol-alias" if label == "cn" else "pol-chat", messages=MSG
        )
        rid[label] = raw.headers["x-request-id"]
    rows = {r["request_id"]: r for r in wait_for_calls(admin, set(rid.values()))}
    assert rows[rid["open"]]["provider"] == providers["us-openai"]
    assert rows[rid["cn"]]["provider"] == providers["cn-alibaba"]
    # cn-alibaba is pol-chat's third deployment: 3 / 6 per million tokens.
    row = rows[rid["cn"]]
    assert row["cost"] == expected_cost(
        row["prompt_tokens"], row["completion_tokens"], 3 * PER_M, 6 * PER_M
    )


def test_lowest_price_never_picks_a_training_provider_the_owner_did_not_allow(
    deployment: dict[str, Any], admin: Admin, key: str, policy: Any
) -> None:
    """Policy clause I.3: the cheapest deployment of rt-train trains on data; an org on
    the default policy is served by the dearer one, until its owner lifts no_training."""
    client = _client(deployment, key)
    providers = {p["name"]: p["id"] for p in admin.get("/api/v1/providers")["data"]}
    rid = {}
    for label, body in (("default", {}), ("lifted", OPEN)):
        policy(body)
        raw = client.chat.completions.with_raw_response.create(model="rt-train", messages=MSG)
        rid[label] = raw.headers["x-request-id"]
        served_by = {m.id: m for m in client.models.list()}["rt-train"]
        vendors = {p["vendor"] for p in (served_by.model_extra or {})["processors"]}
        assert vendors == ({"openai"} if label == "default" else {"openai", "deepseek"})
    rows = {r["request_id"]: r for r in wait_for_calls(admin, set(rid.values()))}
    assert rows[rid["default"]]["provider"] == providers["us-openai"]
    assert rows[rid["lifted"]]["provider"] == providers["cn-deepseek"]


def test_key_policy_narrows_the_org_policy(
    deployment: dict[str, Any], admin: Admin, org_id: str, policy: Any
) -> None:
    key_id, plaintext = new_key(admin, "narrow key")
    client = _client(deployment, plaintext)
    policy({"allow_regions": ["cn-mainland", "us"], "no_training": False})
    r = admin.http.put(f"/api/v1/keys/{key_id}/policy", json={"allow_regions": ["eu"]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "policy_widens"
    put(admin, f"/api/v1/keys/{key_id}/policy", {"no_training": True, "deny_vendors": ["openai"]})
    assert _reachable(client) == {"pol-cn-alibaba"} == _listed(client)
    # Another key of the org is not narrowed.
    other = _client(deployment, new_key(admin, "wide key")[1])
    assert _reachable(other) == {"pol-us-openai", "pol-cn-alibaba", "pol-cn-deepseek"}


# -- strategies --------------------------------------------------------------------------


def test_lowest_price_and_weighted_strategies(
    deployment: dict[str, Any], admin: Admin, key: str
) -> None:
    client = _client(deployment, key)
    providers = {p["name"]: p["id"] for p in admin.get("/api/v1/providers")["data"]}

    def served(model: str, n: int) -> list[str]:
        rids = {
            client.chat.completions.with_raw_response.create(
                model=model, messages=MSG, max_tokens=5
            ).headers["x-request-id"]
            for _ in range(n)
        }
        return [r["provider"] for r in wait_for_calls(admin, rids)]

    assert set(served("rt-cheap", 3)) == {providers["eu-google"]}
    weighted = served("rt-weighted", 40)
    light, heavy = weighted.count(providers["us-openai"]), weighted.count(providers["cn-alibaba"])
    assert light + heavy == 40 and 1 <= light < heavy, (light, heavy)


# -- fallback ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fb-500", "fb-429", "fb-refused"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_failure_before_the_first_byte_falls_back(
    deployment: dict[str, Any], admin: Admin, key: str, failing: Any, name: str, stream: bool,
    mock_upstream: tuple[_core.MockUpstream, str],
) -> None:
    client = _client(deployment, key)
    mock = mock_upstream[0]
    before_mock = mock.request_count()
    before_fail = sum(failing.hits.values())
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model=name, messages=MSG, stream=True, stream_options={"include_usage": True},
            extra_body={"mock": {"chunks": 4}},
        ) as raw:
            rid = raw.headers["x-request-id"]
            chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        raw = client.chat.completions.with_raw_response.create(
            model=name, messages=MSG, extra_body={"mock": {"chunks": 4}}
        )
        rid = raw.headers["x-request-id"]
        text = raw.parse().choices[0].message.content or ""
    assert text == "tok " * 4
    assert mock.request_count() == before_mock + 1
    if name != "fb-refused":
        assert sum(failing.hits.values()) == before_fail + 1
    providers = {p["name"]: p["id"] for p in admin.get("/api/v1/providers")["data"]}
    [row] = wait_for_calls(admin, {rid})
    assert row["attempts"] == 2
    assert row["provider"] == providers["secondary"]
    assert row["status"] == 200 and row["usage_source"] == "upstream"
    # Billed at the secondary's price (3 / 7 per million), nothing for the failed attempt.
    assert row["cost"] == expected_cost(
        row["prompt_tokens"], row["completion_tokens"], 3 * PER_M, 7 * PER_M
    )


def test_cut_after_the_first_byte_is_not_retried(
    deployment: dict[str, Any], admin: Admin, key: str, failing: Any,
    mock_upstream: tuple[_core.MockUpstream, str],
) -> None:
    mock = mock_upstream[0]
    before_mock = mock.request_count()
    before_cut = failing.hits["cut"]
    gw = httpx.Client(base_url=deployment["server"].gateway_url, timeout=30)
    with gw.stream(
        "POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
        json={"model": "fb-cut", "messages": MSG, "stream": True},
    ) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        body = b"".join(r.iter_bytes())
    assert b"tok " in body and b"[DONE]" not in body  # the client saw the stream break
    assert failing.hits["cut"] == before_cut + 1
    assert mock.request_count() == before_mock, "retried after bytes reached the client"
    [row] = wait_for_calls(admin, {rid})
    assert row["attempts"] == 1 and row["error_code"] == "upstream_stream_cut"
