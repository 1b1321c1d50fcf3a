"""Outside --demo the server refuses a missing, placeholder or weak ONETOKEN_SECRET_KEY;
what --demo opens to loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from onetoken.serve import DEMO_PRIVATE_CIDRS, ServeError, check_secret, demo_settings
from onetoken.settings import Settings


@pytest.mark.parametrize(
    "value",
    [None, "changeme" + "x" * 30, "example-secret-value-for-the-docs-000", "a" * 48,
     "abababababababababababababababababab"],
)
def test_serve_refuses_a_missing_or_weak_secret(tmp_path: Path, value: str | None) -> None:
    settings = Settings(data_dir=tmp_path, secret_key=SecretStr(value) if value else None)
    with pytest.raises(ServeError) as info:
        check_secret(settings, demo=False)
    assert "ONETOKEN_SECRET_KEY" in str(info.value)
    if value:
        assert value not in str(info.value)
    check_secret(settings, demo=True)  # --demo generates one and goes on


def test_a_random_secret_passes(tmp_path: Path) -> None:
    check_secret(Settings(data_dir=tmp_path,
                          secret_key=SecretStr("Qm9sZC1yYW5kb20tc2VjcmV0LXZhbHVlLTEyMw")),
                 demo=False)


def test_production_refuses_a_placeholder(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, environment="production",
                 secret_key=SecretStr("changeme-changeme-changeme-changeme"))


def test_demo_opens_loopback_to_platform_providers_only(tmp_path: Path) -> None:
    demo = demo_settings(Settings(data_dir=tmp_path))
    assert demo.upstream_private_cidrs == DEMO_PRIVATE_CIDRS
    # An identity provider or webhook receiver on loopback is named by the operator.
    assert (demo.sso_private_cidrs, demo.webhook_private_cidrs) == ("", "")
    given = Settings(data_dir=tmp_path, sso_private_cidrs="127.0.0.1/32",
                     upstream_private_cidrs="10.0.0.0/8")
    assert demo_settings(given).sso_private_cidrs == "127.0.0.1/32"
    assert demo_settings(given).upstream_private_cidrs == "10.0.0.0/8"
