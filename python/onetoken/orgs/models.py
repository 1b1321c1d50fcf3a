"""Tables of the orgs domain: organizations, their accounts and admin sessions, the
gateway pools operators run, each org's commercial terms, and who accepted which version
of the terms of service."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from onetoken.db.base import Base, UTCDateTime, utcnow
from onetoken.security.principal import ROLES

# terminated: the contract ended and rights.termination ran (docs/retention.md); final.
ORG_STATUSES = ("active", "disabled", "terminated")
# How an org's usage is settled: prepaid credit, or invoiced per month or quarter. What the
# gateways let through is the balance plus the credit limit (billing.models.OrgBilling).
SETTLEMENT_PERIODS = ("prepaid", "monthly", "quarterly")
# Restriction of processing (policy XIII.4), per org and per account; the stricter of the
# two applies (onetoken.orgs.restriction, docs/retention.md).
RESTRICTION_MODES = ("clear", "restricted")


#: accounts.role's check (the control DB's migrations keep it in step).
ROLE_CHECK = "role IN (" + ",".join(f"'{r}'" for r in ROLES) + ")"


class Org(Base):
    __tablename__ = "orgs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    restriction: Mapped[str] = mapped_column(String(16), default="clear", server_default="clear")
    # Loaded with the org: every org answer says which gateway pool serves it.
    terms: Mapped[OrgTerms | None] = relationship(lazy="selectin", viewonly=True)

    @property
    def pool(self) -> str | None:
        """The gateway pool serving this org's keys (None: the shared gateways)."""
        return self.terms.pool if self.terms is not None else None


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)
    # Sign-in identifiers (any of the three): login_name always, email and mobile optional.
    login_name: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str | None] = mapped_column(String(254), unique=True, nullable=True)
    mobile: Mapped[str | None] = mapped_column(String(32), unique=True, nullable=True)
    display_name: Mapped[str] = mapped_column(String(100), default="")
    # None until an invited account sets its password.
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    role: Mapped[str] = mapped_column(String(16))
    # active | disabled
    status: Mapped[str] = mapped_column(String(16), default="active")
    # invited (no password yet) | password | totp (password and a second factor)
    auth_status: Mapped[str] = mapped_column(String(16), default="password")
    is_operator: Mapped[bool] = mapped_column(Boolean, default=False)
    # Fernet token under the key derived from ONETOKEN_SECRET_KEY; set from enrolment on.
    totp_secret_encrypted: Mapped[str | None] = mapped_column(String(512), nullable=True)
    # Last accepted TOTP time step: a code is accepted once.
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    invite_token_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    invite_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    restriction: Mapped[str] = mapped_column(String(16), default="clear", server_default="clear")

    __table_args__ = (
        CheckConstraint(ROLE_CHECK, name="role"),
    )


class AdminSession(Base):
    __tablename__ = "admin_sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # How it was opened: `password` or `sso` (an org turning passwords off ends the first).
    method: Mapped[str] = mapped_column(String(16), default="password",
                                        server_default="password")


class GatewayPool(Base):
    """A named pool of dedicated gateways (`onetoken gateway --pool NAME`), run by the
    operators. Orgs are pinned to one through their commercial terms (docs/pools.md)."""

    __tablename__ = "gateway_pools"

    # Lowercase letters, digits and dashes (orgs.terms.POOL_NAME): it names a spool
    # directory and goes into gateway configs as is.
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    description: Mapped[str] = mapped_column(String(200), default="")
    # The ClickHouse database its gateways' call metadata go to (`onetoken_<...>`, on the
    # control's ClickHouse); None: the shared `onetoken` database.
    clickhouse_database: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class OrgTerms(Base):
    """An org's commercial terms: set by operators, read by the org's members. One row
    per org that has any; an org without a row has the defaults (no dedicated pool)."""

    __tablename__ = "org_terms"

    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), primary_key=True)
    # The gateway pool serving the org's keys; None: the shared gateways.
    pool: Mapped[str | None] = mapped_column(
        ForeignKey("gateway_pools.name"), nullable=True, index=True
    )
    # The contract's reference in the operator's own records (free text, no content).
    contract_ref: Mapped[str | None] = mapped_column(String(100), nullable=True)
    settlement: Mapped[str] = mapped_column(
        String(16), default="prepaid", server_default="prepaid"
    )
    # When the data processing agreement was signed; None: not signed.
    dpa_signed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class TermsAcceptance(Base):
    """One account's acceptance of one version of the terms of service, on behalf of its
    organization (policy section XII.2): who, which version, for which org, when and from
    which address. Kept as the record of the acknowledgement; cancelling the account
    leaves it pseudonymous (the account id) and drops the address."""

    __tablename__ = "terms_acceptances"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey(Account.id))
    org_id: Mapped[str] = mapped_column(ForeignKey(Org.id))
    version: Mapped[str] = mapped_column(String(32))
    accepted_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # The client address of the request that accepted ("" when the test fixtures accept).
    source_ip: Mapped[str] = mapped_column(String(64), default="")

    __table_args__ = (
        # One acceptance per account and version: the gate's lookup, and a second accept
        # (a double click, two tabs) finds the first.
        UniqueConstraint("account_id", "version", name="uq_terms_acceptances_account_version"),
        Index("ix_terms_acceptances_org_id_accepted_at", "org_id", "accepted_at"),
    )


class PasswordReset(Base):
    """One self-service password reset sent by e-mail: the token is a keyed hash, it works
    once (`used_at`) and until `expires_at`. The rows of the last hour are the per-account
    limit on reset mails."""

    __tablename__ = "password_resets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey(Account.id))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        Index("ix_password_resets_account_id_created_at", "account_id", "created_at"),
    )


class OrgSso(Base):
    """An org's sign-in through its own identity provider (OpenID Connect, docs/sso.md):
    one row per org that set it up. Kept with the orgs because password sign-in reads
    `passwords_allowed`; the flow itself is onetoken.sso."""

    __tablename__ = "org_sso"

    org_id: Mapped[str] = mapped_column(ForeignKey(Org.id), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # The issuer identifier exactly as its discovery document states it (https://...).
    issuer: Mapped[str] = mapped_column(String(2048))
    client_id: Mapped[str] = mapped_column(String(255))
    # Fernet token under the key derived from ONETOKEN_SECRET_KEY; never returned.
    client_secret_encrypted: Mapped[str] = mapped_column(String(4096))
    # Lowercase e-mail domains whose people may sign in, comma-separated.
    allowed_domains: Mapped[str] = mapped_column(String(2048))
    # The ID token claim holding the person's groups (a list or one string).
    group_claim: Mapped[str] = mapped_column(String(64), default="groups")
    # [{"group": ..., "role": ...}, ...]: the highest role of the groups a person is in.
    role_map: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    # False: the org's members sign in through the identity provider only (operators keep
    # their password sign-in: the break-glass login).
    passwords_allowed: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SsoIdentity(Base):
    """Which account a person of the identity provider is (its `sub`), linked at their
    first sign-in: the e-mail address may change at the provider, the subject does not."""

    __tablename__ = "sso_identities"

    account_id: Mapped[str] = mapped_column(ForeignKey(Account.id), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey(Org.id))
    subject: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (
        UniqueConstraint("org_id", "subject", name="uq_sso_identities_org_subject"),
    )


class SsoFlow(Base):
    """One started sign-in: what the callback checks the provider's answer against. The
    state is stored as a keyed hash, bound to the browser that started it (a cookie whose
    keyed hash is `browser_hash`), used once (the callback deletes the row) and only
    until `expires_at`."""

    __tablename__ = "sso_flows"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey(Org.id))
    state_hash: Mapped[str] = mapped_column(String(64), unique=True)
    browser_hash: Mapped[str] = mapped_column(String(64))
    nonce: Mapped[str] = mapped_column(String(64))
    # The PKCE verifier, encrypted: it proves to the provider that whoever redeems the
    # code started the flow.
    code_verifier_encrypted: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
