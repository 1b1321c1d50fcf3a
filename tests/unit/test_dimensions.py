"""The dimension sync (onetoken.ingest.dimensions): the control DB's orgs, providers,
models and keys into ClickHouse's dim_* tables, on real chDB and the control DB of the
suite (SQLite, or PostgreSQL with ONETOKEN_TEST_POSTGRES_URL)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from sqlalchemy import select

from onetoken.analytics import clickhouse as ch
from onetoken.ingest import dimensions
from onetoken.keys import applications
from onetoken.keys import service as keys
from onetoken.keys.models import ApiKey
from onetoken.orgs.models import Org
from onetoken.providers import service as providers
from onetoken.providers.models import Provider
from onetoken.settings import Settings
from onetoken.state import AppState
from tests import builders as build
from tests.support import wait_until

CANARY = "canary-7c2e9d"


@pytest.fixture(scope="module")
def chdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    # One chDB engine for the module (~250 MB, one path per process).
    client = ch.open_client(Settings(data_dir=tmp_path_factory.mktemp("dims")))
    yield client
    client.close()


@pytest.fixture
def ch_client(chdb: Client) -> Client:
    """The module's engine with empty dimension tables (each test has a fresh control DB)."""
    for table in dimensions.TABLES:
        chdb.command(f"TRUNCATE TABLE onetoken.{table}")
    return chdb


def deploy(s: Any, owner: str | None, provider: Provider, name: str, *,
           upstream_model: str = "mock-gpt") -> Any:
    return build.model(s, owner, provider, name, upstream_model=upstream_model, input_price=1)


def run_on(client: Client) -> dimensions.ClientRunner:
    return lambda query: query(client)


def final(client: Client, table: str) -> list[tuple[Any, ...]]:
    keys, values = dimensions.TABLES[table]
    columns = ", ".join((*keys, *values, "deleted"))
    return client.query(
        f"SELECT {columns} FROM onetoken.{table} FINAL ORDER BY ALL"  # noqa: S608
    ).result_rows


def test_create_rename_delete_reach_the_tables(state: AppState, ch_client: Client) -> None:
    run = run_on(ch_client)
    with state.session_factory() as s:
        org, owner = build.org_with_owner(s, "Acme Corp", "owner@acme.test")
        prov = build.provider(s, state.secrets, org.id, name="acme-openai")
        prov.vendor, prov.region = "openai", "eu"
        platform = build.provider(s, state.secrets, None, name="platform-up")
        deploy(s, org.id, prov, "chat", upstream_model="gpt-4o")
        deploy(s, None, platform, "shared", upstream_model="gpt-4o-mini")
        extra = deploy(s, org.id, prov, "extra", upstream_model="o3")
        key, _ = build.api_key(s, state.secrets, org, owner, name="ci key")
        s.commit()
        ids = {"org": org.id, "prov": prov.id, "platform": platform.id, "key": key.id}
        display = key.display
    assert dimensions.sync(state.session_factory, run) == 7
    assert final(ch_client, "dim_orgs") == [(ids["org"], "Acme Corp", 0)]
    assert final(ch_client, "dim_providers") == sorted([
        (ids["prov"], ids["org"], "acme-openai", "openai", "eu", 0),
        (ids["platform"], "", "platform-up", "", "", 0),
    ])
    assert final(ch_client, "dim_models") == [
        ("", "gpt-4o-mini", "", 0),
        (ids["org"], "gpt-4o", "openai", 0),
        (ids["org"], "o3", "openai", 0),
    ]
    assert final(ch_client, "dim_keys") == [(ids["key"], ids["org"], display, "ci key", 0)]
    # In step: nothing to write.
    assert dimensions.sync(state.session_factory, run) == 0

    with state.session_factory() as s:
        s.get_one(Org, ids["org"]).name = "Acme Holdings"
        providers.update_provider(s, state.secrets, ids["org"], ids["prov"],
                                  {"name": "acme-primary"})
        keys.update_key(s, ids["org"], ids["key"], {"name": "deploy key"})
        providers.delete_model(s, ids["org"], extra.id)
        s.commit()
    assert dimensions.sync(state.session_factory, run) == 4
    assert final(ch_client, "dim_orgs") == [(ids["org"], "Acme Holdings", 0)]
    assert (ids["prov"], ids["org"], "acme-primary", "openai", "eu", 0) in final(
        ch_client, "dim_providers"
    )
    assert final(ch_client, "dim_keys") == [(ids["key"], ids["org"], display, "deploy key", 0)]
    # Gone from the control DB: kept with its name, marked deleted.
    assert (ids["org"], "o3", "openai", 1) in final(ch_client, "dim_models")

    with state.session_factory() as s:
        for model in providers.list_models(s, None):
            providers.delete_model(s, None, model.id)
        providers.delete_provider(s, None, ids["platform"])
        s.commit()
    assert dimensions.sync(state.session_factory, run) == 2
    assert (ids["platform"], "", "platform-up", "", "", 1) in final(ch_client, "dim_providers")
    assert ("", "gpt-4o-mini", "", 1) in final(ch_client, "dim_models")
    # A replaced row is merged away at once: old names are not left on disk.
    old = ch_client.command(
        "SELECT count() FROM onetoken.dim_orgs WHERE name = 'Acme Corp'"
    )
    assert old == 0
    assert ch_client.command("SELECT count() FROM onetoken.dim_keys") == 1


def test_a_deleted_thing_that_comes_back_is_live_again(
    state: AppState, ch_client: Client
) -> None:
    run = run_on(ch_client)
    with state.session_factory() as s:
        org, _ = build.org_with_owner(s, "Initech", "owner@initech.test")
        prov = build.provider(s, state.secrets, org.id, name="p")
        model = deploy(s, org.id, prov, "m", upstream_model="llama")
        s.commit()
        org_id, prov_id = org.id, prov.id
    dimensions.sync(state.session_factory, run)
    with state.session_factory() as s:
        providers.delete_model(s, org_id, model.id)
        s.commit()
    dimensions.sync(state.session_factory, run)
    assert final(ch_client, "dim_models") == [(org_id, "llama", "", 1)]
    with state.session_factory() as s:
        deploy(s, org_id, s.get_one(Provider, prov_id), "m2", upstream_model="llama")
        s.commit()
    dimensions.sync(state.session_factory, run)
    assert final(ch_client, "dim_models") == [(org_id, "llama", "", 0)]


def test_nothing_secret_reaches_a_dimension_column(
    state: AppState, ch_client: Client
) -> None:
    """Canary: a key's plaintext and hash, a provider's credential (plain and encrypted)
    and base URL, an account's e-mail address: none is in any column of any dim table."""
    with state.session_factory() as s:
        org, owner = build.org_with_owner(s, "Umbrella", f"{CANARY}@umbrella.test")
        prov = build.provider(s, state.secrets, org.id, name="u",
                              base_url=f"https://{CANARY}.example/v1",
                              api_key=f"sk-{CANARY}-credential")
        deploy(s, org.id, prov, "m")
        key, plaintext = build.api_key(s, state.secrets, org, owner, name="k")
        # An application's description is not copied: its name is.
        applications.create_application(
            s, org_id=org.id, name="billing-bot", owner_id=owner.id,
            description=f"talks to {CANARY}",
        )
        s.commit()
        row = s.scalars(select(ApiKey).where(ApiKey.id == key.id)).one()
        stored = s.get_one(Provider, prov.id).api_key_encrypted
        secrets = [CANARY, plaintext, row.hash, str(stored)]
    assert all(secrets) and key.display not in secrets
    assert dimensions.sync(state.session_factory, run_on(ch_client)) == 5

    scanned = 0
    for table in dimensions.TABLES:
        columns = [
            str(r[0]) for r in ch_client.query(
                "SELECT name FROM system.columns WHERE database = 'onetoken' "
                "AND table = {t:String} AND type LIKE '%String%'", parameters={"t": table},
            ).result_rows
        ]
        for column in columns:
            for secret in secrets:
                found = ch_client.query(
                    f"SELECT count() FROM onetoken.{table} "  # noqa: S608
                    f"WHERE position(toString({column}), {{s:String}}) > 0",
                    parameters={"s": secret},
                ).result_rows[0][0]
                assert found == 0, (table, column)
                scanned += 1
    # 17 string columns in the five tables, four secrets each.
    assert scanned == 17 * 4


def test_applications_are_named_and_kept_once_deleted(
    state: AppState, ch_client: Client
) -> None:
    run = run_on(ch_client)
    with state.session_factory() as s:
        org, owner = build.org_with_owner(s, "Globex", "owner@globex.test")
        app = applications.create_application(s, org_id=org.id, name="crm", owner_id=owner.id)
        s.commit()
        org_id, app_id = org.id, app.id
    dimensions.sync(state.session_factory, run)
    assert final(ch_client, "dim_applications") == [(app_id, org_id, "crm", 0)]
    with state.session_factory() as s:
        applications.update_application(s, org_id, app_id, {"name": "crm-sync"})
        s.commit()
    dimensions.sync(state.session_factory, run)
    assert final(ch_client, "dim_applications") == [(app_id, org_id, "crm-sync", 0)]
    with state.session_factory() as s:
        applications.delete_application(s, org_id, app_id)
        s.commit()
    dimensions.sync(state.session_factory, run)
    assert final(ch_client, "dim_applications") == [(app_id, org_id, "crm-sync", 1)]


def test_the_worker_syncs_at_start_and_after_a_change(
    state: AppState, ch_client: Client
) -> None:
    with state.session_factory() as s:
        org, owner = build.org_with_owner(s, "Hooli", "owner@hooli.test")
        s.commit()
        org_id = org.id
    worker = dimensions.DimensionSync(
        state.session_factory, run_on(ch_client), poll_s=0.05, interval_s=3600
    )
    worker.start()
    try:
        wait_until(lambda: final(ch_client, "dim_orgs") == [(org_id, "Hooli", 0)])
        # A key is a change the engine must see (the config revision moves): synced
        # without waiting for the hour.
        with state.session_factory() as s:
            build.api_key(s, state.secrets, s.get_one(Org, org_id),
                          s.get_one(type(owner), owner.id), name="late")
            s.commit()
        wait_until(lambda: [r[3] for r in final(ch_client, "dim_keys")] == ["late"])
    finally:
        worker.stop()
    assert worker.failures == 0 and worker.syncs >= 2


def test_a_failing_sync_is_counted_and_retried(state: AppState, ch_client: Client) -> None:
    calls: list[int] = []

    def unreachable(query: Any) -> Any:
        calls.append(1)
        raise ConnectionError("ClickHouse down")

    worker = dimensions.DimensionSync(
        state.session_factory, unreachable, poll_s=0.05, interval_s=3600
    )
    worker.start()
    try:
        wait_until(lambda: worker.failures == 1)
        worker.notify()
        wait_until(lambda: worker.failures == 2)
    finally:
        worker.stop()
    # Between the failure and the wake, no retry at every poll.
    assert len(calls) == 2
