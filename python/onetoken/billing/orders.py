"""Orders, their payment-status state machine, payment providers, redemption codes and
refunds.

    created ──paid──▶ paid ──refund──▶ refunded
       │ └──failed──▶ failed
       └──cancel───▶ cancelled

Every transition is one conditional UPDATE (`WHERE status = <from>`), so two admins
confirming the same transfer at once move it once; the ledger entry it causes carries the
order id as its idempotency key, so it is written once whatever happens. Each transition
is written to order_events and to the security log.
"""

from __future__ import annotations

import logging
import secrets as pysecrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from onetoken.billing import audit, packages
from onetoken.billing.models import Order, OrderEvent, Package, RedemptionCode
from onetoken.billing.service import balance, check_entry_bounds, post_entry
from onetoken.db.base import new_id, utcnow
from onetoken.db.session import get_scoped
from onetoken.kit.crypto import Secrets, derive_secret, keyed_hash
from onetoken.kit.errors import Conflict, Unprocessable
from onetoken.kit.money import format_amount

log = logging.getLogger("onetoken.billing")

TRANSITIONS: dict[str, frozenset[str]] = {
    "created": frozenset({"paid", "failed", "cancelled"}),
    "paid": frozenset({"refunded"}),
    "failed": frozenset(),
    "refunded": frozenset(),
    "cancelled": frozenset(),
}

# Readable, unambiguous alphabet (no 0/O, 1/I/L) for references and codes people type.
_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
CODE_PREFIX = "OTR"
CODE_GROUPS = 5
CODE_GROUP_LEN = 4
REDEEM_CONTEXT = b"onetoken/redemption-code/v1"


class IllegalTransition(Conflict):
    code = "illegal_transition"


def _random(n: int) -> str:
    return "".join(pysecrets.choice(_ALPHABET) for _ in range(n))


# -- payment providers -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PaymentInstructions:
    method: str
    reference: str
    text: str


class PaymentProvider(Protocol):
    """How an order gets paid. `begin` tells the payer what to do; an online provider
    would confirm through its callback, the offline ones through a billing admin."""

    method: str

    def begin(self, order: Order) -> PaymentInstructions: ...


class BankTransfer:
    """Offline: the payer transfers the amount quoting the order's reference; a billing
    admin who sees the money arrive confirms the order (or marks it failed)."""

    method = "bank_transfer"

    def begin(self, order: Order) -> PaymentInstructions:
        return PaymentInstructions(
            method=self.method,
            reference=order.payment_reference,
            text=(
                f"Transfer {format_amount(order.amount)} {order.currency} quoting reference "
                f"{order.payment_reference}. A billing admin confirms the order on receipt."
            ),
        )


PROVIDERS: dict[str, PaymentProvider] = {"bank_transfer": BankTransfer()}


def provider_for(method: str) -> PaymentProvider:
    try:
        return PROVIDERS[method]
    except KeyError:
        raise Unprocessable("Unknown payment method.", param="payment_method") from None


# -- orders --------------------------------------------------------------------------------


def create_order(
    session: Session,
    org_id: str,
    *,
    kind: str,
    currency: str,
    amount: int | None = None,
    plan_id: str | None = None,
    payment_method: str = "bank_transfer",
    created_by: str | None,
) -> Order:
    if kind == "recharge":
        if amount is None or amount <= 0:
            raise Unprocessable("A recharge needs a positive amount.", param="amount")
        if plan_id is not None:
            raise Unprocessable("A recharge has no plan.", param="plan_id")
        price, credit = amount, amount
    elif kind == "package":
        if plan_id is None:
            raise Unprocessable("A package order needs a plan.", param="plan_id")
        if amount is not None:
            raise Unprocessable("A package order takes the plan's price.", param="amount")
        plan = packages.get_plan(session, plan_id)
        price, credit = plan.price, plan.credit
    else:
        raise Unprocessable("Unknown order kind.", param="kind")
    if payment_method != "redemption_code":
        provider_for(payment_method)
    # Refused now rather than when the money arrives and the credit could not land.
    check_entry_bounds(session, org_id, credit, "recharge")
    now = utcnow()
    order = Order(
        id=new_id("ord"),
        org_id=org_id,
        kind=kind,
        amount=price,
        credit=credit,
        currency=currency,
        plan_id=plan_id,
        status="created",
        payment_method=payment_method,
        payment_reference=f"OT-{_random(10)}",
        refunded_amount=0,
        created_by=created_by,
        created_at=now,
        updated_at=now,
    )
    session.add(order)
    session.flush()
    _event(session, order, None, "created", created_by)
    return order


def get_order(session: Session, org_id: str | None, order_id: str) -> Order:
    """`org_id` None: the operator (CLI), who may see any org's order."""
    orgs = None if org_id is None else (org_id,)
    return get_scoped(session, Order, order_id, orgs, "Order not found.")


def list_orders(
    session: Session, org_id: str, *, limit: int = 50, status: str | None = None
) -> Sequence[Order]:
    q = select(Order).where(Order.org_id == org_id)
    if status is not None:
        q = q.where(Order.status == status)
    return session.scalars(q.order_by(Order.created_at.desc(), Order.id).limit(limit)).all()


def order_events(session: Session, order_id: str) -> Sequence[OrderEvent]:
    return session.scalars(
        select(OrderEvent).where(OrderEvent.order_id == order_id).order_by(OrderEvent.id)
    ).all()


def _event(
    session: Session, order: Order, from_status: str | None, to_status: str, actor: str | None
) -> None:
    session.add(
        OrderEvent(
            order_id=order.id,
            org_id=order.org_id,
            from_status=from_status,
            to_status=to_status,
            actor=actor or "operator",
            at=utcnow(),
        )
    )
    session.flush()


def _transition(session: Session, order: Order, to_status: str, actor: str | None) -> str:
    """Move the order to `to_status` if the machine allows it from where it is now."""
    from_status = order.status
    if to_status not in TRANSITIONS.get(from_status, frozenset()):
        raise IllegalTransition(f"An order that is {from_status} cannot become {to_status}.")
    now = utcnow()
    values: dict[str, object] = {"status": to_status, "updated_at": now}
    if to_status == "paid":
        values["paid_at"] = now
    res = session.execute(
        update(Order)
        .where(Order.id == order.id, Order.status == from_status)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if getattr(res, "rowcount", 0) != 1:
        session.refresh(order)
        raise IllegalTransition(f"An order that is {order.status} cannot become {to_status}.")
    session.refresh(order)
    _event(session, order, from_status, to_status, actor)
    return from_status


def _audit(order: Order, kind: str, actor: str | None) -> None:
    audit.record(
        kind,
        org_id=order.org_id,
        actor=actor,
        target=order.id,
        meta={"order_kind": order.kind, "status": order.status, "amount": order.amount},
    )


def mark_paid(session: Session, order: Order, *, actor: str | None) -> Order:
    """Payment confirmed: credit the org (recharge) or grant the package. The caller
    commits, then calls `audit_change` and pushes the config."""
    _transition(session, order, "paid", actor)
    if order.kind == "recharge":
        post_entry(
            session,
            order.org_id,
            kind="recharge",
            amount=order.credit,
            idempotency_key=f"order:{order.id}",
            memo=f"order {order.id}",
            created_by=actor,
        )
    else:
        plan = packages.get_plan(session, order.plan_id or "", active_only=False)
        packages.grant_package(
            session,
            order.org_id,
            credit=order.credit,
            validity_days=plan.validity_days,
            idempotency_key=f"order:{order.id}",
            plan_id=plan.id,
            order_id=order.id,
            created_by=actor,
        )
    return order


def mark_failed(session: Session, order: Order, *, actor: str | None) -> Order:
    _transition(session, order, "failed", actor)
    return order


def cancel(session: Session, order: Order, *, actor: str | None) -> Order:
    _transition(session, order, "cancelled", actor)
    return order


def refund(
    session: Session, order: Order, *, actor: str | None, amount: int | None = None
) -> Order:
    """Pay a paid order back. A recharge refund takes `amount` (default: all of it) off
    the prepaid balance and may not take it below zero; a package refund revokes the
    package and takes off the credit it still holds (the money returned defaults to the
    same share of the price)."""
    if order.status != "paid":
        raise IllegalTransition(f"An order that is {order.status} cannot become refunded.")
    if order.kind == "recharge":
        money = order.amount if amount is None else amount
        if not 0 < money <= order.amount:
            raise Unprocessable(
                "Refund must be positive and at most the order amount.", param="amount"
            )
        prepaid = balance(session, order.org_id) - packages.package_credit(session, order.org_id)
        if money > prepaid:
            raise Conflict(
                "The prepaid balance is lower than the refund.", code="refund_exceeds_balance"
            )
        _transition(session, order, "refunded", actor)
        post_entry(
            session,
            order.org_id,
            kind="refund",
            amount=-money,
            idempotency_key=f"refund:{order.id}",
            memo=f"order {order.id}",
            created_by=actor,
        )
    else:
        package = session.scalars(select(Package).where(Package.order_id == order.id)).first()
        if package is None:
            raise Conflict("The order's package is missing.", code="package_missing")
        held = package.remaining if package.status == "active" else 0
        default = order.amount * held // order.credit if order.credit else 0
        money = default if amount is None else amount
        if not 0 <= money <= order.amount:
            raise Unprocessable("Refund must be at most the order amount.", param="amount")
        _transition(session, order, "refunded", actor)
        packages.revoke_package(
            session, package, idempotency_key=f"refund:{order.id}", created_by=actor
        )
    order.refunded_amount = money
    session.flush()
    return order


def audit_change(order: Order, actor: str | None) -> None:
    """After commit: the order's new state into the security log."""
    _audit(order, f"billing.order_{order.status}", actor)


# -- redemption codes ------------------------------------------------------------------


def _code_hash(secrets: Secrets, code: str) -> str:
    return keyed_hash(derive_secret(secrets.session, REDEEM_CONTEXT), code)


def normalize_code(text: str) -> str:
    return "".join(ch for ch in text.upper() if ch.isalnum())


def create_codes(
    session: Session,
    secrets: Secrets,
    *,
    count: int,
    credit: int | None = None,
    plan_id: str | None = None,
    expires_at: datetime | None = None,
) -> list[tuple[RedemptionCode, str]]:
    """Operator action: `count` single-use codes, each shown once. Only hashes are kept."""
    if not 1 <= count <= 10_000:
        raise Unprocessable("Count must be 1 to 10000.", param="count")
    if (credit is None) == (plan_id is None):
        raise Unprocessable("Give either a credit or a plan.", param="credit")
    if plan_id is not None:
        credit = packages.get_plan(session, plan_id).credit
    assert credit is not None
    if credit <= 0:
        raise Unprocessable("Credit must be positive.", param="credit")
    out: list[tuple[RedemptionCode, str]] = []
    for _ in range(count):
        groups = [_random(CODE_GROUP_LEN) for _ in range(CODE_GROUPS)]
        plaintext = "-".join([CODE_PREFIX, *groups])
        row = RedemptionCode(
            id=new_id("code"),
            code_hash=_code_hash(secrets, normalize_code(plaintext)),
            display=groups[-1],
            credit=credit,
            plan_id=plan_id,
            expires_at=expires_at,
            created_at=utcnow(),
        )
        session.add(row)
        out.append((row, plaintext))
    session.flush()
    audit.record("billing.codes_created", org_id=None, actor=None, meta={"count": count})
    return out


class CodeRejected(Unprocessable):
    code = "redemption_code_invalid"


def redeem(
    session: Session,
    secrets: Secrets,
    org_id: str,
    code: str,
    *,
    actor: str | None,
    currency: str,
) -> Order:
    """Spend a code on the org: an order paid by the code, and its credit or package.
    The error never repeats the code; every failure is audited."""
    now = utcnow()
    row = session.scalars(
        select(RedemptionCode).where(
            RedemptionCode.code_hash == _code_hash(secrets, normalize_code(code))
        )
    ).one_or_none()
    reason = None
    if row is None:
        reason = "unknown"
    elif row.redeemed_at is not None:
        reason = "used"
    elif row.expires_at is not None and row.expires_at <= now:
        reason = "expired"
    if reason is None and row is not None:
        res = session.execute(
            update(RedemptionCode)
            .where(RedemptionCode.id == row.id, RedemptionCode.redeemed_at.is_(None))
            .values(redeemed_at=now, redeemed_org_id=org_id, redeemed_by=actor)
            .execution_options(synchronize_session=False)
        )
        if getattr(res, "rowcount", 0) != 1:
            reason = "used"
    if reason is not None or row is None:
        session.rollback()
        audit.record(
            "billing.code_rejected",
            org_id=org_id,
            actor=actor,
            severity="medium",
            meta={"reason": reason or "unknown"},
        )
        messages = {
            "used": ("This code has already been redeemed.", "redemption_code_used"),
            "expired": ("This code has expired.", "redemption_code_expired"),
        }
        message, err = messages.get(reason or "", ("This code is not valid.", CodeRejected.code))
        raise CodeRejected(message, param="code", code=err)
    order = create_order(
        session,
        org_id,
        kind="package" if row.plan_id else "recharge",
        currency=currency,
        amount=None if row.plan_id else row.credit,
        plan_id=row.plan_id,
        payment_method="redemption_code",
        created_by=actor,
    )
    # Nothing was paid in money; the code stood for it.
    order.amount = 0
    order.credit = row.credit
    session.flush()
    row.order_id = order.id
    mark_paid(session, order, actor=actor)
    return order


def audit_redeemed(order: Order, actor: str | None) -> None:
    audit.record(
        "billing.code_redeemed",
        org_id=order.org_id,
        actor=actor,
        target=order.id,
        meta={"credit": order.credit},
    )
