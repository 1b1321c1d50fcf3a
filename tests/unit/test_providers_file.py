"""The declarative providers file: formats, idempotence, credentials by environment
variable, pruning, and errors that never echo a value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from onetoken import cli
from onetoken.db.session import current_revision
from onetoken.gateway.snapshot import build_snapshot
from onetoken.orgs import service as orgs
from onetoken.providers.declarative import (
    ProvidersFileError,
    apply_file,
    load_file,
)
from onetoken.providers.models import Model, Provider, Route
from onetoken.settings import Settings
from onetoken.state import AppState

CRED = "sk-FILE-CREDENTIAL-4d5e6f"

DOC: dict[str, Any] = {
    "providers": [
        {
            "name": "openai",
            "preset": "openai",
            "api_key_env": "TEST_OPENAI_KEY",
            "models": [
                {"name": "gpt-x", "upstream_model": "gpt-x-2025", "input_price": "2.50",
                 "output_price": "10", "cached_input_price": "1.25"},
                {"name": "embed-x", "kind": "embedding", "upstream_model": "e",
                 "input_price": "0.02"},
            ],
        },
        {
            "name": "qwen",
            "preset": "qwen",
            "region": "cn-mainland",
            "max_concurrency": 16,
            "models": [{"name": "gpt-x", "upstream_model": "qwen-max", "input_price": "1",
                        "output_price": "3", "priority": 1}],
        },
    ],
    "routes": [{"name": "gpt-x", "strategy": "lowest_price", "aliases": ["default-chat"]}],
    "routing": {"max_attempts": 2},
}


def _write(tmp_path: Path, doc: dict[str, Any], fmt: str = "yaml") -> Path:
    path = tmp_path / f"providers.{fmt}"
    if fmt == "yaml":
        path.write_text(yaml.safe_dump(doc))
    elif fmt == "json":
        path.write_text(json.dumps(doc))
    else:
        path.write_text(_toml(doc))
    return path


def _toml(doc: dict[str, Any]) -> str:
    """Just enough TOML for DOC (arrays of tables, strings, numbers, lists)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return str(v)

    out: list[str] = []
    if "routing" in doc:
        out.append("[routing]")
        out += [f"{k} = {value(v)}" for k, v in doc["routing"].items()]
    for p in doc.get("providers", []):
        out.append("[[providers]]")
        out += [f"{k} = {value(v)}" for k, v in p.items() if k != "models"]
        for m in p.get("models", []):
            out.append("[[providers.models]]")
            out += [f"{k} = {value(v)}" for k, v in m.items()]
    for r in doc.get("routes", []):
        out.append("[[routes]]")
        out += [f"{k} = {value(v)}" for k, v in r.items()]
    return "\n".join(out) + "\n"


def _apply(state: AppState, path: Path, prune: bool = False) -> Any:
    with state.session_factory() as s:
        result = apply_file(s, state.secrets, load_file(path), prune=prune)
        s.commit()
    return result


@pytest.fixture(autouse=True)
def _credential(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_OPENAI_KEY", CRED)


@pytest.mark.parametrize("fmt", ["yaml", "toml", "json"])
def test_apply_creates_then_is_idempotent(state: AppState, tmp_path: Path, fmt: str) -> None:
    path = _write(tmp_path, DOC, fmt)
    first = _apply(state, path)
    assert sorted(first.created) == sorted([
        "provider:openai", "model:openai/gpt-x", "model:openai/embed-x", "provider:qwen",
        "model:qwen/gpt-x", "route:gpt-x",
    ])
    assert first.updated == ["routing"]
    with state.session_factory() as s:
        revision = current_revision(s)
        openai = s.scalars(select(Provider).where(Provider.name == "openai")).one()
        assert openai.org_id is None and openai.managed_by == "file"
        assert openai.base_url == "https://api.openai.com/v1" and openai.vendor == "openai"
        assert openai.credential_env == "TEST_OPENAI_KEY"
        assert openai.api_key_encrypted and CRED not in openai.api_key_encrypted
        assert state.secrets.decrypt(openai.api_key_encrypted) == CRED
        qwen = s.scalars(select(Provider).where(Provider.name == "qwen")).one()
        assert (qwen.max_concurrency, qwen.api_key_encrypted) == (16, None)
        gpt = s.scalars(select(Model).where(Model.provider_id == openai.id,
                                            Model.name == "gpt-x")).one()
        assert (gpt.input_price, gpt.output_price, gpt.cached_input_price) == (
            2_500_000_000, 10_000_000_000, 1_250_000_000
        )
        snap = build_snapshot(s, state.secrets, version=1, spent_marks={})
    assert snap["routing"]["max_attempts"] == 2
    assert snap["routes"] == [
        {"name": "gpt-x", "strategy": "lowest_price", "aliases": ["default-chat"]}
    ]
    second = _apply(state, path)
    assert (second.created, second.updated, second.deleted) == ([], [], [])
    assert second.unchanged == 7
    with state.session_factory() as s:
        assert current_revision(s) == revision  # nothing changed, nothing pushed


def test_changes_update_in_place(state: AppState, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _apply(state, _write(tmp_path, DOC))
    with state.session_factory() as s:
        ids = {p.name: p.id for p in s.scalars(select(Provider))}
    changed = json.loads(json.dumps(DOC))
    changed["providers"][0]["models"][0]["input_price"] = "3"
    changed["providers"][1]["region"] = "sg"
    monkeypatch.setenv("TEST_OPENAI_KEY", CRED + "-rotated")
    result = _apply(state, _write(tmp_path, changed))
    assert sorted(result.updated) == ["model:openai/gpt-x", "provider:openai", "provider:qwen"]
    with state.session_factory() as s:
        assert {p.name: p.id for p in s.scalars(select(Provider))} == ids
        openai = s.get(Provider, ids["openai"])
        assert openai is not None and openai.api_key_encrypted is not None
        assert state.secrets.decrypt(openai.api_key_encrypted) == CRED + "-rotated"
        assert s.get(Provider, ids["qwen"]).region == "sg"  # type: ignore[union-attr]


def test_prune_removes_only_file_managed_entries(state: AppState, tmp_path: Path) -> None:
    _apply(state, _write(tmp_path, DOC))
    with state.session_factory() as s:
        org = orgs.create_org(s, "Tenant")
        # Entries made through the API are never pruned.
        from onetoken.providers import service

        api_made = service.create_provider(s, state.secrets, None, name="by-hand",
                                           base_url="http://h.test/v1")
        s.commit()
        del org
    smaller = {"providers": [{**DOC["providers"][0],
                              "models": DOC["providers"][0]["models"][:1]}]}
    result = _apply(state, _write(tmp_path, smaller), prune=True)
    assert sorted(result.deleted) == sorted([
        "model:openai/embed-x", "model:qwen/gpt-x", "provider:qwen", "route:gpt-x",
    ])
    with state.session_factory() as s:
        names = {p.name for p in s.scalars(select(Provider))}
        assert names == {"openai", "by-hand"}
        assert s.get(Provider, api_made.id) is not None
        assert s.scalars(select(Route)).all() == []


def test_org_scope(state: AppState, tmp_path: Path) -> None:
    with state.session_factory() as s:
        org = orgs.create_org(s, "Tenant")
        s.commit()
        org_id = org.id
    doc = {"org": "Tenant", "providers": [{"name": "own", "base_url": "http://own.test/v1",
                                           "models": [{"name": "own-chat",
                                                       "upstream_model": "x",
                                                       "input_price": "1"}]}]}
    _apply(state, _write(tmp_path, doc))
    with state.session_factory() as s:
        p = s.scalars(select(Provider).where(Provider.name == "own")).one()
        assert p.org_id == org_id
        assert s.scalars(select(Model).where(Model.name == "own-chat")).one().org_id == org_id
    with pytest.raises(ProvidersFileError, match="no such organization"):
        _apply(state, _write(tmp_path, {**doc, "org": "Nobody"}))


@pytest.mark.parametrize(
    ("doc", "needle", "expect"),
    [
        ({"providers": [{"name": "x", "base_url": "http://x.test/v1",
                         "api_key": "sk-LITERAL-9q8w7e"}]}, "sk-LITERAL-9q8w7e", "unknown field"),
        ({"providers": [{"name": "x", "base_url": "http://u:pw-LEAK-1@x.test/v1"}]},
         "pw-LEAK-1", "providers.0.base_url"),
        ({"providers": [{"name": "x", "base_url": "http://x.test/v1", "models": [
            {"name": "m", "upstream_model": "u", "input_price": 7.25}]}]}, "7.25", "input_price"),
        ({"providers": [{"name": "x", "preset": "azure-openai"}]}, None, "base_url is required"),
        ({"providers": [{"name": "x", "base_url": "http://x.test/v1",
                         "api_key_env": "TEST_UNSET_VAR_ZZZ"}]}, None, "TEST_UNSET_VAR_ZZZ"),
        ({"providers": [{"name": "x", "base_url": "http://x.test/v1"},
                        {"name": "x", "base_url": "http://y.test/v1"}]}, None, "listed twice"),
    ],
)
def test_errors_name_fields_never_values(
    state: AppState, tmp_path: Path, doc: dict[str, Any], needle: str | None, expect: str
) -> None:
    path = _write(tmp_path, doc)
    with pytest.raises(ProvidersFileError) as exc:
        _apply(state, path)
    assert expect in str(exc.value)
    if needle:
        assert needle not in str(exc.value)
    with state.session_factory() as s:
        assert s.scalars(select(Provider)).all() == []  # nothing half-applied


def test_unparsable_file_does_not_quote_it(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("providers: [ {name: 'SECRET-IN-BROKEN-YAML'\n")
    with pytest.raises(ProvidersFileError) as exc:
        load_file(path)
    assert "SECRET-IN-BROKEN-YAML" not in str(exc.value)
    with pytest.raises(ProvidersFileError, match=r"use a \.yaml"):
        load_file(tmp_path / "p.ini")


def test_cli_apply_and_dry_run(
    settings: Settings, state: AppState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("ONETOKEN_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("ONETOKEN_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("ONETOKEN_SECRET_KEY", settings.secret_key.get_secret_value())  # type: ignore[union-attr]
    path = _write(tmp_path, DOC)
    assert cli.main(["providers", "apply", str(path), "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] is True and "provider:openai" in out["created"]
    with state.session_factory() as s:
        assert s.scalars(select(Provider)).all() == []
    assert cli.main(["providers", "apply", str(path)]) == 0
    assert "created provider:openai" in capsys.readouterr().out
    bad = _write(tmp_path, {"providers": [{"name": "x", "api_key": "sk-CLI-LEAK-55"}]})
    assert cli.main(["providers", "apply", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "sk-CLI-LEAK-55" not in captured.err + captured.out
