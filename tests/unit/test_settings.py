from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from onetoken.db.session import make_engine
from onetoken.settings import Settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATA_DIR", "GATEWAY_LISTEN", "CONTROL_LISTEN", "DATABASE_URL", "CLICKHOUSE_DSN"):
        monkeypatch.delenv(f"ONETOKEN_{name}", raising=False)
    s = Settings()
    assert s.data_dir == Path("./.onetoken")
    assert s.gateway_listen == "127.0.0.1:8080"
    assert s.control_listen == "127.0.0.1:8081"
    assert s.database_url == f"sqlite:///{Path('./.onetoken/control.db').resolve()}"
    assert s.clickhouse_dsn == f"chdb://{Path('./.onetoken/clickhouse').resolve()}"
    assert s.flush_interval_ms == 1000
    assert s.flush_max_rows == 50000
    assert s.call_log_ttl_days == 180
    assert s.spool_dir == Path("./.onetoken/spool")


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ONETOKEN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ONETOKEN_GATEWAY_LISTEN", "0.0.0.0:9000")
    monkeypatch.setenv("ONETOKEN_DATABASE_URL", "postgresql+psycopg://u:p@db/onetoken")
    monkeypatch.setenv("ONETOKEN_FLUSH_INTERVAL_MS", "50")
    s = Settings()
    assert s.data_dir == tmp_path
    assert s.gateway_listen == "0.0.0.0:9000"
    assert s.database_url == "postgresql+psycopg://u:p@db/onetoken"
    assert s.clickhouse_dsn == f"chdb://{tmp_path.resolve() / 'clickhouse'}"
    assert s.flush_interval_ms == 50


def test_production_requires_a_secret_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONETOKEN_SECRET_KEY", raising=False)
    monkeypatch.setenv("ONETOKEN_ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match="ONETOKEN_SECRET_KEY is required"):
        Settings()


def test_short_secret_key_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(secret_key=SecretStr("tooshort-value"))
    assert "tooshort-value" not in str(info.value.errors(include_input=False))


def test_generated_secret_is_private_and_stable(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "d")
    first = s.secret_key_bytes()
    path = tmp_path / "d" / "secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 32
    assert Settings(data_dir=tmp_path / "d").secret_key_bytes() == first


def test_explicit_secret_key_wins(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, secret_key=SecretStr("k" * 40))
    assert s.secret_key_bytes() == b"k" * 40
    assert not (tmp_path / "secret.key").exists()


def test_tls_needs_both_files() -> None:
    with pytest.raises(ValidationError):
        Settings(tls_cert=Path("/tmp/cert.pem"))


def test_transport_cidr_settings_are_parsed_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from onetoken.gateway.supervisor import engine_config
    from onetoken.kit.crypto import Secrets

    monkeypatch.setenv("ONETOKEN_UPSTREAM_PRIVATE_CIDRS", "127.0.0.1/8, 10.0.0.0/8")
    monkeypatch.setenv("ONETOKEN_GATEWAY_TRUSTED_PROXIES", "192.0.2.7")
    s = Settings(secret_key=SecretStr("x" * 16 + "abcdefghijklmnop"))
    cfg = engine_config(s, Secrets.from_settings(s))
    assert cfg["upstream_private_cidrs"] == ["127.0.0.0/8", "10.0.0.0/8"]
    assert cfg["trusted_proxies"] == ["192.0.2.7/32"]
    assert cfg["metrics_listen"] is None
    assert cfg["phase_timing"] is False
    monkeypatch.setenv("ONETOKEN_GATEWAY_PHASE_TIMING", "1")
    assert engine_config(Settings(), Secrets.from_settings(s))["phase_timing"] is True
    monkeypatch.setenv("ONETOKEN_GATEWAY_TRUSTED_PROXIES", "10.0.0.0/33")
    with pytest.raises(ValidationError, match="ONETOKEN_GATEWAY_TRUSTED_PROXIES"):
        Settings()


def test_data_dir_of_an_older_install_is_tightened(tmp_path: Path) -> None:
    """Directories and the SQLite file an older version left group-readable become
    private at the next start."""
    data_dir = tmp_path / "data"
    (data_dir / "spool").mkdir(parents=True, mode=0o755)
    os.chmod(data_dir, 0o755)  # noqa: S103 (an old install, on purpose)
    (data_dir / "control.db").touch(mode=0o644)
    os.chmod(data_dir / "control.db", 0o644)
    s = Settings(data_dir=data_dir)
    s.ensure_dirs()
    make_engine(s.database_url).dispose()
    for path, mode in ((data_dir, 0o700), (data_dir / "spool", 0o700),
                       (data_dir / "logs", 0o700), (data_dir / "control.db", 0o600)):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
