"""Where outgoing connections may go: the one address classification (security/net.py)
and the save-time refusal of provider base URLs that lead inside the platform's network.
Names resolve through a stub: nothing here sends a packet anywhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from onetoken.control import build_state, create_app
from onetoken.orgs.models import Account
from onetoken.security import net
from onetoken.settings import Settings
from tests.support import TEST_SECRET
from tests.unit.conftest import Admin, make_org_admin
from tests.unit.stub_dns import STUB_DNS, stub_resolver

REFUSED = [
    "127.0.0.1", "127.8.9.10", "0.0.0.0", "10.0.0.1", "172.16.5.4", "192.168.1.1",  # noqa: S104
    "169.254.169.254", "100.64.0.1", "100.100.100.200", "224.0.0.1", "255.255.255.255",
    "192.0.2.1", "198.18.0.1", "::1", "::", "fe80::1", "fd00:ec2::254", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
    "2002:a00:1::", "64:ff9b::a9fe:a9fe", "2001:db8::1",
    # Ranges the engine refuses that Python's ipaddress counts as global.
    "fec0::1", "192.0.0.9", "192.0.0.10",
]
PUBLIC = ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "64:ff9b::808:808"]

@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses(address: str) -> None:
    ip = net.parse_ip(address)
    assert ip is not None and not net.is_public(ip)
    assert not net.target_allowed(ip, net.networks("203.0.113.0/24"))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses(address: str) -> None:
    ip = net.parse_ip(address)
    assert ip is not None and net.is_public(ip) and net.target_allowed(ip, ())


def test_allow_list_and_resolution() -> None:
    loopback = net.networks("127.0.0.0/8")
    assert net.resolve_checked("loopback.example.test", 80, loopback, stub_resolver)
    for name in ("private", "metadata", "cgnat", "mixed"):
        with pytest.raises(net.AddressRefused):
            net.resolve_checked(f"{name}.example.test", 80, loopback, stub_resolver)
    # A v4-mapped answer is its IPv4 address: inside the loopback allow-list, refused without.
    assert net.resolve_checked("mapped.example.test", 80, loopback, stub_resolver)
    with pytest.raises(net.AddressRefused):
        net.resolve_checked("mapped.example.test", 80, (), stub_resolver)
    with pytest.raises(OSError):
        net.resolve_checked("nowhere.example.test", 80, (), stub_resolver)
    assert net.url_target_refused("http://[::ffff:10.0.0.1]:8080/v1", ())
    assert not net.url_target_refused("https://nowhere.example.test/v1", (), stub_resolver)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    monkeypatch.setattr(net, "system_resolver", stub_resolver)
    settings = Settings(
        data_dir=tmp_path / "data",
        secret_key=SecretStr(TEST_SECRET),
        upstream_private_cidrs="127.0.0.0/8",
    )
    state = build_state(settings)
    try:
        with TestClient(create_app(settings, state=state)) as client:
            operator = make_org_admin(state, client, "Platform", "ops@platform.test")
            with state.session_factory() as s:
                s.get(Account, operator.account_id).is_operator = True  # type: ignore[union-attr]
                s.commit()
            tenant = make_org_admin(state, client, "Tenant", "owner@tenant.test")
            yield {"client": client, "operator": operator, "tenant": tenant, "state": state}
    finally:
        state.db_engine.dispose()


def _create(client: TestClient, who: Admin, base_url: str, scope: str = "org") -> Any:
    body = {"name": f"p{abs(hash((base_url, scope))) % 10**8}", "base_url": base_url,
            "scope": scope}
    return client.post("/api/v1/providers", json=body, headers=who.headers)


def test_org_provider_base_url_must_lead_to_a_public_address(world: dict[str, Any]) -> None:
    client, tenant = world["client"], world["tenant"]
    refused = [
        "http://127.0.0.1:8081/api", "http://10.0.0.1/v1", "http://169.254.169.254/latest",
        "http://100.64.0.1/v1", "http://[::ffff:127.0.0.1]/v1", "http://[::1]:8080/v1",
        *(f"https://{name}/v1" for name in STUB_DNS if not name.startswith("public")),
    ]
    for url in refused:
        r = _create(client, tenant, url)
        assert r.status_code == 422, url
        assert r.json()["error"]["param"] == "base_url"
        assert "example" not in r.text and "10.0" not in r.text
    ok = _create(client, tenant, "https://public.example.test/v1")
    assert ok.status_code == 201, ok.text
    # Not resolvable now: accepted, the engine checks on connect.
    assert _create(client, tenant, "https://nowhere.example.test/v1").status_code == 201
    moved = client.patch(f"/api/v1/providers/{ok.json()['id']}",
                         json={"base_url": "https://metadata.example.test/v1"},
                         headers=tenant.headers)
    assert moved.status_code == 422 and moved.json()["error"]["param"] == "base_url"


def test_platform_provider_may_use_the_operator_allow_list(world: dict[str, Any]) -> None:
    client, operator = world["client"], world["operator"]
    # ONETOKEN_UPSTREAM_PRIVATE_CIDRS=127.0.0.0/8: an in-house server on loopback.
    for url in ("http://127.0.0.1:9009/v1", "https://loopback.example.test/v1"):
        r = _create(client, operator, url, scope="platform")
        assert r.status_code == 201, (url, r.text)
    for url in ("http://10.0.0.1/v1", "https://metadata.example.test/v1",
                "https://mixed.example.test/v1"):
        r = _create(client, operator, url, scope="platform")
        assert r.status_code == 422 and r.json()["error"]["param"] == "base_url", url
    # The allow-list is the platform's: an operator's own org provider does not get it.
    r = _create(client, operator, "http://127.0.0.1:9009/v1", scope="org")
    assert r.status_code == 422
