"""Every ONETOKEN_* setting and its default, in one place."""

from __future__ import annotations

import logging
import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("onetoken.settings")

SECRET_KEY_FILE = "secret.key"  # noqa: S105 (a file name)
# Anything shorter is too weak to derive the key-hash and encryption secrets from.
MIN_SECRET_KEY_LEN = 32


class Settings(BaseSettings):
    """Deployment settings read from the environment (prefix ONETOKEN_).

    `database_url` and `clickhouse_dsn` are filled in from `data_dir` when unset, so
    every consumer reads a resolved value.
    """

    model_config = SettingsConfigDict(env_prefix="ONETOKEN_", extra="ignore", validate_default=True)

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path("./.onetoken")
    gateway_listen: str = "127.0.0.1:8080"
    control_listen: str = "127.0.0.1:8081"
    database_url: str = ""
    clickhouse_dsn: str = ""
    secret_key: SecretStr | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    demo_upstream: str | None = None
    currency: str = "USD"

    flush_interval_ms: int = Field(default=200, ge=10, le=60_000)
    flush_max_rows: int = Field(default=50_000, ge=1, le=1_000_000)
    call_log_ttl_days: int = Field(default=180, ge=1)

    # Engine knobs (tests/contract/engine_config.json).
    worker_threads: int = Field(default=2, ge=1, le=256)
    queue_capacity: int = Field(default=100_000, ge=1)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)

    session_ttl_hours: int = Field(default=12, ge=1, le=24 * 30)
    config_watch_interval_ms: int = Field(default=500, ge=50)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _resolve(self) -> Self:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'control.db').resolve()}"
        if not self.clickhouse_dsn:
            self.clickhouse_dsn = f"chdb://{(self.data_dir / 'clickhouse').resolve()}"
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("ONETOKEN_TLS_CERT and ONETOKEN_TLS_KEY must be set together")
        if self.secret_key is not None:
            if len(self.secret_key.get_secret_value()) < MIN_SECRET_KEY_LEN:
                raise ValueError(
                    f"ONETOKEN_SECRET_KEY must be at least {MIN_SECRET_KEY_LEN} characters"
                )
        elif self.environment == "production":
            raise ValueError("ONETOKEN_SECRET_KEY is required when ONETOKEN_ENVIRONMENT=production")
        return self

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def ensure_dirs(self) -> None:
        for path in (self.data_dir, self.spool_dir, self.log_dir):
            path.mkdir(parents=True, exist_ok=True)

    def secret_key_bytes(self) -> bytes:
        """The master secret: ONETOKEN_SECRET_KEY, else one generated once per data dir.

        The generated file is created with O_EXCL so two processes starting together
        (CLI and server) end up with the same secret.
        """
        if self.secret_key is not None:
            return self.secret_key.get_secret_value().encode()
        path = self.data_dir / SECRET_KEY_FILE
        try:
            return _read_secret_file(path)
        except FileNotFoundError:
            pass
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return _read_secret_file(path)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
        log.warning("secret_key.generated", extra={"path": str(path)})
        return _read_secret_file(path)


def _read_secret_file(path: Path) -> bytes:
    value = path.read_text().strip().encode()
    if len(value) < MIN_SECRET_KEY_LEN:
        raise RuntimeError(f"{path} holds a secret shorter than {MIN_SECRET_KEY_LEN} characters")
    return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
