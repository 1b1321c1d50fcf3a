"""E-mail (docs/operations.md, "E-mail"): invitations, password resets, low-balance and
budget alerts and security alerts, sent over SMTP from an outbox by one background
worker.

The process that serves installs its `MailWorker` (`install`) when ONETOKEN_SMTP_URL is
set; without one nothing is queued and nothing is sent, and invite tokens are shown only
to the inviter, as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onetoken.mail.outbox import MailWorker

_worker: MailWorker | None = None


def install(worker: MailWorker | None) -> None:
    """Make `worker` the one the alerts go to (None uninstalls)."""
    global _worker
    _worker = worker


def current() -> MailWorker | None:
    return _worker
