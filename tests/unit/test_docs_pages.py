"""/api/docs works without Internet access: Swagger UI comes from the package, served by
the control API itself, and the pages can be turned off."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from onetoken.control import create_app
from onetoken.settings import Settings
from tests.support import TEST_SECRET

# Every URL the page makes the browser load or call: attributes and JavaScript strings.
_REFERENCES = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|\burl:\s*'([^']+)'""")


def _client(tmp_path: Path, **env: object) -> TestClient:
    settings = Settings(data_dir=tmp_path / "data", secret_key=SecretStr(TEST_SECRET), **env)
    return TestClient(create_app(settings))


@pytest.fixture
def docs_on(tmp_path: Path) -> Iterator[TestClient]:
    with _client(tmp_path) as c:
        yield c


def test_docs_page_loads_only_assets_the_app_serves(docs_on: TestClient) -> None:
    page = docs_on.get("/api/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    # No host at all: neither a CDN nor the validator badge swagger-ui calls by default.
    assert re.search(r"https?:|//", html) is None, html
    refs = [a or b for a, b in _REFERENCES.findall(html)]
    assert refs, html
    for ref in refs:
        assert ref.startswith("/"), ref
        r = docs_on.get(ref)
        assert r.status_code == 200, ref
        assert r.content, ref
    assert {"/api/docs/assets/swagger-ui-bundle.js", "/api/docs/assets/swagger-ui.css",
            "/api/openapi.json"} <= set(refs)
    assert '"validatorUrl": null' in html
    assert docs_on.get("/api/docs/oauth2-redirect").status_code == 200


def test_docs_can_be_turned_off(tmp_path: Path) -> None:
    with _client(tmp_path, api_docs=False) as c:
        assert c.get("/api/docs").status_code == 404
        assert c.get("/api/docs/assets/swagger-ui-bundle.js").status_code == 404
        assert c.get("/api/openapi.json").status_code == 200
