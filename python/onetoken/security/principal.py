"""The authenticated caller of the control API, as every service sees it."""

from __future__ import annotations

from dataclasses import dataclass, field

#: The roles an account holds in its organization (accounts.role).
#: analyst: reads call metadata and usage and runs read-only SQL over them; writes nothing.
ROLES = ("owner", "admin", "developer", "billing", "viewer", "analyst")


@dataclass(frozen=True, slots=True)
class Principal:
    account_id: str
    org_id: str
    role: str
    email: str
    # Platform staff (accounts.is_operator): hold the operator permissions in
    # onetoken.security.permissions across every org.
    is_operator: bool = False
    source_ip: str = ""
    user_agent: str = ""
    session_id: str = ""
    # Audit events the request already recorded (so the generic one is not added).
    audit_marks: list[str] = field(default_factory=list, compare=False)
