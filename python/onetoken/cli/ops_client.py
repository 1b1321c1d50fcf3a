"""The CLI's end of the ops channel: find the running control process and ask it.

Used only after the CLI failed to open chDB because another process holds it. The control
process is found through `<data_dir>/control.json` (written by that process), else at
ONETOKEN_CONTROL_LISTEN. Errors are OpsError with a message fit for the operator; none of
them carries a request value (the audit needle above all).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

import httpx

from onetoken.analytics.clickhouse import ChdbLockedError
from onetoken.kit import channel
from onetoken.ops import PREFIX, control_file
from onetoken.settings import Settings

# Reconcile and the audit scan read whole tables: give them time, but not forever.
_TIMEOUT: Final = httpx.Timeout(600.0, connect=5.0)
_BACKUP_TIMEOUT: Final = httpx.Timeout(6 * 3600.0, connect=5.0)


class OpsError(Exception):
    """The control process could not be reached, or refused or failed the request; `code`
    is the error code of its answer, when it gave one."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


def control_url(settings: Settings) -> str:
    """The control process's base URL: control.json's, else ONETOKEN_CONTROL_LISTEN's."""
    found = control_file.read(settings.data_dir)
    if found is not None:
        return found.url
    from onetoken.serve import url

    return url(settings.control_listen, settings.tls_cert is not None)


class OpsClient:
    """Calls /internal/ops/ on the control process that holds the chDB path."""

    def __init__(self, settings: Settings, locked: ChdbLockedError) -> None:
        self.url = control_url(settings)
        self._locked = locked
        token = channel.channel_token(settings.secret_key_bytes(), channel.OPS)
        self._http = httpx.Client(
            base_url=self.url + PREFIX,
            headers={"Authorization": f"Bearer {token}"},
            timeout=_TIMEOUT,
            # A self-signed control certificate is its own trust anchor.
            verify=str(settings.tls_cert) if settings.tls_cert else True,
            trust_env=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OpsClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise OpsError(
                f"{self._locked} No control process answered at {self.url} "
                f"({type(exc).__name__}): is it serving ONETOKEN_CONTROL_LISTEN's address?"
            ) from None
        if response.status_code == 401:
            raise OpsError(
                f"the control process at {self.url} refused the ops channel token: run this "
                "command with the server's ONETOKEN_SECRET_KEY (or its data dir)"
            )
        if response.status_code != 200:
            raise OpsError(
                f"the control process at {self.url} answered {response.status_code}: "
                f"{_error_message(response)}",
                code=_error_code(response),
            )
        return response.json()

    def reconcile(
        self, *, start: datetime | None, end: datetime | None, org: str | None
    ) -> list[dict[str, Any]]:
        params = _params(start=start, end=end, org=org)
        lines: list[dict[str, Any]] = self._call("GET", "/billing/reconcile", params=params)[
            "lines"
        ]
        return lines

    def audit_clickhouse(self, needle: str) -> dict[str, Any]:
        # In the body: a URL would carry the needle into access logs.
        result: dict[str, Any] = self._call("POST", "/audit/clickhouse", json={"needle": needle})
        return result

    def export_pages(self, org: str | None) -> Any:
        """Yield (columns, rows) page by page, oldest first."""
        after: str | None = None
        while True:
            page = self._call("GET", "/calls/export", params=_params(org=org, after=after))
            yield page["columns"], page["rows"]
            after = page["next_cursor"]
            if after is None:
                return

    def call_stats(
        self, *, org: str, start: datetime, end: datetime, group_by: str
    ) -> list[dict[str, Any]]:
        params = _params(org=org, start=start, end=end, group_by=group_by)
        rows: list[dict[str, Any]] = self._call("GET", "/calls/stats", params=params)["rows"]
        return rows

    def backup(self, name: str) -> None:
        """Have the serving process copy its stores into staging directory `name` (its
        manifest.json says what it holds)."""
        # A BACKUP copies every part of chDB: allow for a large one.
        self._call("POST", "/backup", json={"name": name}, timeout=_BACKUP_TIMEOUT)

    def sql(self, query: str, *, org: str | None) -> dict[str, Any]:
        """`onetoken sql` run by the control process; `org` None reads every org."""
        # In the body: the query may quote anything, and URLs end up in access logs.
        result: dict[str, Any] = self._call(
            "POST", "/sql", json={"query": query, "org": org, "all_orgs": org is None}
        )
        return result


def _error_code(response: httpx.Response) -> str | None:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


def _params(**values: datetime | str | None) -> dict[str, str]:
    return {
        name: value.isoformat() if isinstance(value, datetime) else value
        for name, value in values.items()
        if value is not None
    }


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return "no error detail"
