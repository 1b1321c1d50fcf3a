from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Response

from onetoken.billing import budgets, orders, packages, prices, service, statements
from onetoken.billing.models import Invoice, Order
from onetoken.billing.schemas import (
    BalanceResponse,
    BillingSettingsResponse,
    BillingSettingsUpdate,
    CallStatsResponse,
    CallStatsRow,
    CreditRequest,
    CreditResponse,
    IdempotencyKey,
    InvoiceCreate,
    InvoiceList,
    InvoiceResponse,
    LedgerEntryResponse,
    LedgerPage,
    OrderCreate,
    OrderEventResponse,
    OrderList,
    OrderResponse,
    OrderStatus,
    PackageResponse,
    PaymentInstructionsResponse,
    PlanResponse,
    PriceVersionCreate,
    PriceVersionResponse,
    RedeemRequest,
    RefundRequest,
    StatementResponse,
)
from onetoken.kit.errors import Forbidden, Unprocessable
from onetoken.orgs.service import target_org
from onetoken.security.principal import Principal
from onetoken.web.deps import (
    BillingMoneyDep,
    BillingReadDep,
    BillingWriteDep,
    CallsReadDep,
    ModelsReadDep,
    ModelsWriteDep,
    SessionDep,
    StateDep,
    call_log_sink,
)

router = APIRouter(prefix="/billing", tags=["billing"])



def _money_scope(principal: Principal) -> str | None:
    """Whose orders and invoices a money action may name by id: operators any org's
    (None), an owner holding it by the tenant setting only the own org's."""
    return None if principal.is_operator else principal.org_id


@router.get("/balance", response_model=BalanceResponse)
def get_balance(
    principal: BillingReadDep, session: SessionDep, state: StateDep
) -> BalanceResponse:
    total = service.balance(session, principal.org_id)
    held = packages.package_credit(session, principal.org_id)
    return BalanceResponse(
        org_id=principal.org_id,
        balance=total,
        currency=state.settings.currency,
        package_credit=held,
        prepaid=total - held,
    )


@router.post(
    "/credits",
    response_model=CreditResponse,
    responses={201: {"model": CreditResponse, "description": "Credited (a new entry)."}},
)
def credit(
    body: CreditRequest,
    principal: BillingMoneyDep,
    session: SessionDep,
    state: StateDep,
    response: Response,
    idempotency_key: Annotated[IdempotencyKey | None, Header()] = None,
) -> CreditResponse:
    """Add a recharge, grant, refund or (signed) adjustment entry to an org's ledger
    (operators; `org_id` names the org, default the caller's)."""
    key = body.idempotency_key or idempotency_key
    if key is None:
        raise Unprocessable(
            "An idempotency key is required (body field or Idempotency-Key header).",
            param="idempotency_key",
        )
    org_id = target_org(session, principal, body.org_id)
    entry, created = service.credit(
        session,
        org_id,
        amount=body.amount,
        kind=body.kind,
        idempotency_key=key,
        memo=body.memo,
        created_by=principal.account_id,
    )
    session.commit()
    if created:
        state.config_changed()
        from onetoken.billing import audit

        audit.record(
            "billing.credit_added",
            org_id=org_id,
            actor=principal.account_id,
            target=str(entry.id),
            severity="medium",
            meta={"kind": entry.kind, "amount": entry.amount},
        )
    response.status_code = 201 if created else 200
    return CreditResponse(
        entry=LedgerEntryResponse.model_validate(entry),
        created=created,
        balance=service.balance(session, org_id),
    )


@router.get("/ledger", response_model=LedgerPage)
def list_ledger(
    principal: BillingReadDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before_id: Annotated[int | None, Query(ge=1)] = None,
) -> LedgerPage:
    rows, has_more = service.list_entries(
        session, principal.org_id, limit=limit, before_id=before_id
    )
    return LedgerPage(data=[LedgerEntryResponse.model_validate(r) for r in rows], has_more=has_more)


def _reader(state: StateDep) -> Any:
    return call_log_sink(state).read


# -- settings and budgets ------------------------------------------------------------------


def _settings_response(
    session: SessionDep, state: StateDep, org_id: str
) -> BillingSettingsResponse:
    row = budgets.org_settings(session, org_id)
    return BillingSettingsResponse(
        org_id=org_id,
        currency=state.settings.currency,
        price_factor_ppm=row.price_factor_ppm,
        budget_day=row.budget_day,
        budget_month=row.budget_month,
        low_balance_threshold=row.low_balance_threshold,
    )


@router.get("/settings", response_model=BillingSettingsResponse)
def get_settings(
    principal: BillingReadDep, session: SessionDep, state: StateDep
) -> BillingSettingsResponse:
    return _settings_response(session, state, principal.org_id)


@router.patch("/settings", response_model=BillingSettingsResponse)
def update_settings(
    body: BillingSettingsUpdate, principal: BillingWriteDep, session: SessionDep, state: StateDep
) -> BillingSettingsResponse:
    """Org budgets per UTC day/month (the gateway answers 429 `budget_exceeded` once a
    request could cross one) and the low-balance threshold for the `balance_low` event.
    The price factor is a commercial term set by the operator (`onetoken billing
    price-factor`)."""
    changes = body.model_dump(exclude_unset=True)
    budgets.update_org_settings(session, principal.org_id, **changes)
    state.commit_change(session)
    from onetoken.billing import audit

    audit.record(
        "billing.settings_changed",
        org_id=principal.org_id,
        actor=principal.account_id,
        meta={"fields": ",".join(sorted(changes))},
    )
    return _settings_response(session, state, principal.org_id)


# -- prices ----------------------------------------------------------------------------------


@router.get("/prices", response_model=list[PriceVersionResponse])
def list_prices(
    principal: ModelsReadDep,
    session: SessionDep,
    model_id: Annotated[str, Query(min_length=1, max_length=32)],
) -> list[PriceVersionResponse]:
    """The price history of one of the org's models, newest first."""
    rows = prices.list_versions(session, principal.org_id, model_id)
    return [PriceVersionResponse.model_validate(r) for r in rows]


@router.post("/prices", response_model=PriceVersionResponse, status_code=201)
def add_price(
    body: PriceVersionCreate, principal: ModelsWriteDep, session: SessionDep, state: StateDep
) -> PriceVersionResponse:
    """New prices for one of the org's models from `effective_from` (default now) on.
    Requests already made keep the cost they were charged."""
    version = prices.add_version(
        session,
        principal.org_id,
        body.model_id,
        prices.Prices.listed(
            body.input_price, body.output_price, body.cached_input_price, body.request_price
        ).with_units(
            body.image_prices, body.audio_second_price, body.character_price,
            body.search_unit_price,
        ),
        effective_from=body.effective_from,
        created_by=principal.account_id,
    )
    state.commit_change(session)
    from onetoken.billing import audit

    audit.record(
        "billing.price_version_added",
        org_id=principal.org_id,
        actor=principal.account_id,
        target=body.model_id,
    )
    return PriceVersionResponse.model_validate(version)


# -- plans, packages -------------------------------------------------------------------------


@router.get("/plans", response_model=list[PlanResponse])
def list_plans(_: BillingReadDep, session: SessionDep) -> list[PlanResponse]:
    return [PlanResponse.model_validate(p) for p in packages.list_plans(session)]


@router.get("/packages", response_model=list[PackageResponse])
def list_packages(principal: BillingReadDep, session: SessionDep) -> list[PackageResponse]:
    return [
        PackageResponse.model_validate(p) for p in packages.list_packages(session, principal.org_id)
    ]


# -- orders ----------------------------------------------------------------------------------


def _order_response(session: SessionDep, order: Order) -> OrderResponse:
    out = OrderResponse.model_validate(order)
    out.events = [
        OrderEventResponse.model_validate(e) for e in orders.order_events(session, order.id)
    ]
    if order.status == "created" and order.payment_method in orders.PROVIDERS:
        i = orders.provider_for(order.payment_method).begin(order)
        out.instructions = PaymentInstructionsResponse(
            method=i.method, reference=i.reference, text=i.text
        )
    return out


@router.post("/orders", response_model=OrderResponse, status_code=201)
def create_order(
    body: OrderCreate, principal: BillingWriteDep, session: SessionDep, state: StateDep
) -> OrderResponse:
    """A recharge or a package purchase, paid by bank transfer: the response says how;
    an operator confirms it when the money arrives."""
    order = orders.create_order(
        session,
        principal.org_id,
        kind=body.kind,
        currency=state.settings.currency,
        amount=body.amount,
        plan_id=body.plan_id,
        payment_method=body.payment_method,
        created_by=principal.account_id,
    )
    session.commit()
    orders.audit_change(order, principal.account_id)
    return _order_response(session, order)


@router.get("/orders", response_model=OrderList)
def list_orders(
    principal: BillingReadDep,
    session: SessionDep,
    status: OrderStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    org_id: Annotated[str | None, Query(max_length=32)] = None,
) -> OrderList:
    """The org's orders, newest first (operators may name another org with `org_id`)."""
    target = target_org(session, principal, org_id)
    rows = orders.list_orders(session, target, limit=limit, status=status)
    return OrderList(data=[_order_response(session, o) for o in rows])


@router.get("/orders/{order_id}", response_model=OrderResponse)
def get_order(order_id: str, principal: BillingReadDep, session: SessionDep) -> OrderResponse:
    return _order_response(session, orders.get_order(session, principal.org_id, order_id))


def _order_step(
    session: SessionDep,
    state: StateDep,
    principal: Principal,
    order: Order,
    step: Callable[..., object],
    *,
    money_moved: bool,
    **kw: Any,
) -> OrderResponse:
    """Move `order` on by `step` (a onetoken.billing.orders function) as the principal,
    commit, audit the change, and answer the gateways' polls when money moved."""
    step(session, order, actor=principal.account_id, **kw)
    session.commit()
    orders.audit_change(order, principal.account_id)
    if money_moved:
        state.config_changed()
    return _order_response(session, order)


@router.post("/orders/{order_id}/confirm", response_model=OrderResponse)
def confirm_order(
    order_id: str, principal: BillingMoneyDep, session: SessionDep, state: StateDep
) -> OrderResponse:
    """Offline payment received (operators): the order becomes paid and its credit or
    package lands. Four eyes: the account that placed the order cannot confirm it."""
    order = orders.get_order(session, _money_scope(principal), order_id)
    if order.created_by == principal.account_id:
        raise Forbidden(
            "Another billing admin must confirm this order.", code="separation_of_duties"
        )
    return _order_step(session, state, principal, order, orders.mark_paid, money_moved=True)


@router.post("/orders/{order_id}/fail", response_model=OrderResponse)
def fail_order(
    order_id: str, principal: BillingMoneyDep, session: SessionDep, state: StateDep
) -> OrderResponse:
    """The payment did not arrive (operators)."""
    order = orders.get_order(session, _money_scope(principal), order_id)
    return _order_step(session, state, principal, order, orders.mark_failed, money_moved=False)


@router.post("/orders/{order_id}/cancel", response_model=OrderResponse)
def cancel_order(
    order_id: str, principal: BillingWriteDep, session: SessionDep, state: StateDep
) -> OrderResponse:
    order = orders.get_order(session, principal.org_id, order_id)
    return _order_step(session, state, principal, order, orders.cancel, money_moved=False)


@router.post("/orders/{order_id}/refund", response_model=OrderResponse)
def refund_order(
    order_id: str,
    body: RefundRequest,
    principal: BillingMoneyDep,
    session: SessionDep,
    state: StateDep,
) -> OrderResponse:
    """Pay a paid order back (operators)."""
    order = orders.get_order(session, _money_scope(principal), order_id)
    return _order_step(
        session, state, principal, order, orders.refund, money_moved=True, amount=body.amount
    )


@router.post("/redeem", response_model=OrderResponse, status_code=201)
def redeem_code(
    body: RedeemRequest, principal: BillingWriteDep, session: SessionDep, state: StateDep
) -> OrderResponse:
    """Spend a redemption code on the org (single use; the code is never stored or echoed)."""
    order = orders.redeem(
        session,
        state.secrets,
        principal.org_id,
        body.code,
        actor=principal.account_id,
        currency=state.settings.currency,
    )
    session.commit()
    orders.audit_redeemed(order, principal.account_id)
    state.config_changed()
    return _order_response(session, order)


# -- statements and invoices -------------------------------------------------------------


def _statement(
    principal: Principal, session: SessionDep, state: StateDep, period: str
) -> statements.Statement:
    p = statements.Period.parse(period)
    return statements.build_statement(
        session, _reader(state), principal.org_id, p, state.settings.currency
    )


@router.get("/statements/{period}", response_model=StatementResponse)
def get_statement(
    period: str, principal: BillingReadDep, session: SessionDep, state: StateDep
) -> StatementResponse:
    """A month (YYYY-MM, UTC) of the org's money: opening and closing balance, movement by
    ledger kind, recharges and other credits, and usage by model, key, day and
    application."""
    s = _statement(principal, session, state, period)
    # The statement's fields by name; the period as its label, the difference derived.
    return StatementResponse.model_validate(
        {**asdict(s), "period": s.period.label, "difference": s.difference}
    )


@router.get("/statements/{period}/csv")
def get_statement_csv(
    period: str, principal: BillingReadDep, session: SessionDep, state: StateDep
) -> Response:
    s = _statement(principal, session, state, period)
    return Response(
        statements.statement_csv(s),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="statement-{s.period.label}.csv"'},
    )


def _invoice_response(invoice: Invoice) -> InvoiceResponse:
    return InvoiceResponse.model_validate(invoice)


@router.post("/invoices", response_model=InvoiceResponse, status_code=201)
def create_invoice(
    body: InvoiceCreate, principal: BillingWriteDep, session: SessionDep, state: StateDep
) -> InvoiceResponse:
    """An invoice for one month's usage (lines per model, from the ledger)."""
    invoice = statements.create_invoice(
        session,
        principal.org_id,
        statements.Period.parse(body.period),
        title=body.title,
        tax_id=body.tax_id,
        address=body.address,
        currency=state.settings.currency,
        created_by=principal.account_id,
    )
    session.commit()
    from onetoken.billing import audit

    audit.record(
        "billing.invoice_requested",
        org_id=principal.org_id,
        actor=principal.account_id,
        target=invoice.id,
    )
    return _invoice_response(invoice)


@router.get("/invoices", response_model=InvoiceList)
def list_invoices(principal: BillingReadDep, session: SessionDep) -> InvoiceList:
    return InvoiceList(
        data=[_invoice_response(i) for i in statements.list_invoices(session, principal.org_id)]
    )


@router.get("/invoices/{invoice_id}", response_model=InvoiceResponse)
def get_invoice(
    invoice_id: str, principal: BillingReadDep, session: SessionDep
) -> InvoiceResponse:
    return _invoice_response(statements.get_invoice(session, principal.org_id, invoice_id))


@router.get("/invoices/{invoice_id}/document")
def invoice_document(invoice_id: str, principal: BillingReadDep, session: SessionDep) -> Response:
    invoice = statements.get_invoice(session, principal.org_id, invoice_id)
    return Response(
        statements.invoice_html(session, invoice),
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{invoice.number}.html"',
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
        },
    )


@router.get("/invoices/{invoice_id}/lines.csv")
def invoice_lines_csv(
    invoice_id: str, principal: BillingReadDep, session: SessionDep
) -> Response:
    invoice = statements.get_invoice(session, principal.org_id, invoice_id)
    return Response(
        statements.invoice_csv(invoice),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{invoice.number}.csv"'},
    )


@router.post("/invoices/{invoice_id}/{action}", response_model=InvoiceResponse)
def change_invoice(
    invoice_id: str,
    action: Annotated[str, Path(pattern="^(issue|void)$")],
    principal: BillingMoneyDep,
    session: SessionDep,
) -> InvoiceResponse:
    """Issue or void a requested invoice (operators)."""
    invoice = statements.get_invoice(session, _money_scope(principal), invoice_id)
    statements.set_invoice_status(session, invoice, "issued" if action == "issue" else "void")
    session.commit()
    from onetoken.billing import audit

    audit.record(
        f"billing.invoice_{invoice.status}",
        org_id=invoice.org_id,
        actor=principal.account_id,
        target=invoice.id,
    )
    return _invoice_response(invoice)


# -- call statistics -------------------------------------------------------------------------


@router.get("/call-stats", response_model=CallStatsResponse)
def call_stats(
    principal: CallsReadDep,
    state: StateDep,
    group_by: Annotated[str, Query(pattern="^(model|key|day|application)$")] = "model",
    start: datetime | None = None,
    end: datetime | None = None,
) -> CallStatsResponse:
    """The org's calls, errors, tokens, cost and latency per model, key, day or
    application (the one the key was in at the time; '' for none) over [start, end)
    (default: the last 30 days)."""
    hi = _aware(end) if end else datetime.now(UTC)
    lo = _aware(start) if start else hi - timedelta(days=30)
    if lo >= hi:
        raise Unprocessable("start must be before end.", param="start")
    rows = _reader(state)(lambda c: statements.call_stats(c, principal.org_id, lo, hi, group_by))
    return CallStatsResponse(
        org_id=principal.org_id,
        group_by=group_by,  # type: ignore[arg-type]
        start=lo,
        end=hi,
        data=[CallStatsRow(**r) for r in rows],
    )


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
