"""`onetoken billing ...` operator commands: plans, redemption codes, order confirmation,
price versions (including the platform catalog's), org price factors, package expiry.

These are the platform operator's tools: whoever runs them holds the data directory (or
the database URL), which is more than any API role. A running server picks the changes up
within a second (they bump the config revision)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from onetoken.cli.common import CliError, action_group, instant, open_db, settings_from_env


# kit.money (pydantic) is imported where it is used: the `onetoken` parser registers these
# commands for every command, `onetoken gateway` included, which must stay slim.
def _money(value: str) -> int:
    from onetoken.kit.money import MoneyFormatError, parse_amount

    try:
        return parse_amount(value)
    except MoneyFormatError as exc:
        raise argparse.ArgumentTypeError(f"amount {exc}") from None


def _with_session(fn: Callable[[Any, Any, argparse.Namespace], int]) -> Callable[..., int]:
    def run(args: argparse.Namespace) -> int:
        state = open_db(settings_from_env())
        try:
            with state.session_factory() as session:
                return fn(state, session, args)
        finally:
            state.db_engine.dispose()

    return run


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, default=str) if getattr(args, "json", False) else text)


@_with_session
def cmd_plan_create(state: Any, session: Any, args: argparse.Namespace) -> int:
    from onetoken.billing import packages

    plan = packages.create_plan(
        session, name=args.name, price=args.price, credit=args.credit, validity_days=args.days
    )
    session.commit()
    _out(args, {"plan_id": plan.id, "name": plan.name}, f"created plan {plan.id}")
    return 0


@_with_session
def cmd_plan_list(state: Any, session: Any, args: argparse.Namespace) -> int:
    from onetoken.billing import packages
    from onetoken.kit.money import format_amount

    rows = [
        {
            "plan_id": p.id,
            "name": p.name,
            "price": format_amount(p.price),
            "credit": format_amount(p.credit),
            "validity_days": p.validity_days,
        }
        for p in packages.list_plans(session)
    ]
    _out(args, rows, "\n".join(f"{r['plan_id']}  {r['name']}  {r['price']}" for r in rows))
    return 0


@_with_session
def cmd_codes_create(state: Any, session: Any, args: argparse.Namespace) -> int:
    from onetoken.billing import orders

    made = orders.create_codes(
        session,
        state.secrets,
        count=args.count,
        credit=args.credit,
        plan_id=args.plan,
        expires_at=args.expires,
    )
    session.commit()
    # The only time the codes exist in plaintext: printed once, never stored.
    codes = [plaintext for _, plaintext in made]
    _out(args, {"codes": codes}, "\n".join(codes))
    return 0


@_with_session
def cmd_order_action(state: Any, session: Any, args: argparse.Namespace) -> int:
    from onetoken.billing import orders

    order = orders.get_order(session, None, args.order_id)
    action = {
        "confirm": orders.mark_paid,
        "fail": orders.mark_failed,
        "cancel": orders.cancel,
    }[args.order_command]
    action(session, order, actor=None)
    session.commit()
    orders.audit_change(order, None)
    _out(args, {"order_id": order.id, "status": order.status}, f"{order.id} {order.status}")
    return 0


@_with_session
def cmd_price(state: Any, session: Any, args: argparse.Namespace) -> int:
    from onetoken.billing import audit, prices
    from onetoken.providers.models import Model

    model = session.get(Model, args.model)
    if model is None:
        raise CliError("no such model id")
    version = prices.add_version(
        session,
        model.org_id,
        model.id,
        prices.Prices.listed(args.input, args.output, args.cached, args.request),
        effective_from=args.effective_from,
    )
    session.commit()
    audit.record("billing.price_version_added", org_id=model.org_id, actor=None, target=model.id)
    _out(
        args,
        {"price_id": version.id, "effective_from": version.effective_from.isoformat()},
        f"price {version.id} from {version.effective_from.isoformat()}",
    )
    return 0


@_with_session
def cmd_price_factor(state: Any, session: Any, args: argparse.Namespace) -> int:
    from onetoken.billing import audit, budgets
    from onetoken.orgs.service import find_org

    org = find_org(session, args.org)
    if org is None:
        raise CliError("no such org (give its id or name)")
    if not 0 <= args.ppm <= 10_000_000:
        raise CliError("--ppm must be 0 to 10000000 (1000000 = list price)")
    budgets.update_org_settings(session, org.id, price_factor_ppm=args.ppm)
    session.commit()
    audit.record("billing.price_factor_changed", org_id=org.id, actor=None, meta={"ppm": args.ppm})
    _out(args, {"org_id": org.id, "price_factor_ppm": args.ppm}, f"{org.id} {args.ppm}")
    return 0


@_with_session
def cmd_expire(state: Any, session: Any, args: argparse.Namespace) -> int:
    from onetoken.billing import packages, prices

    lapsed = packages.expire_due(session)
    applied = prices.apply_due(session)
    session.commit()
    _out(
        args,
        {"packages_expired": len(lapsed), "prices_applied": applied},
        f"{len(lapsed)} package(s) expired, {applied} price version(s) applied",
    )
    return 0


def _command(
    parent: Any, func: Callable[[argparse.Namespace], int], *args: Any, **kw: Any
) -> Any:
    """An operator command (`parent.add_parser(*args, **kw)`) that prints JSON with --json."""
    p = parent.add_parser(*args, **kw)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=func)
    return p


def register(billing: Any) -> None:
    """Add the operator commands to the `onetoken billing` sub-parsers."""
    plans = action_group(billing, "plans", "packages on sale", dest="plans_command")
    p = _command(plans, cmd_plan_create, "create", help="create a plan")
    p.add_argument("--name", required=True)
    p.add_argument("--price", type=_money, required=True, help="what it costs, e.g. 90.00")
    p.add_argument("--credit", type=_money, required=True, help="credit it grants, e.g. 100")
    p.add_argument("--days", type=int, required=True, help="validity in days")
    _command(plans, cmd_plan_list, "list", help="list active plans")

    codes = action_group(billing, "codes", "redemption codes", dest="codes_command")
    p = _command(codes, cmd_codes_create, "create", help="create single-use codes (printed once)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--credit", type=_money, help="credit per code")
    what.add_argument("--plan", help="plan id each code grants")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--expires", type=instant, default=None, help="ISO time")

    order = action_group(billing, "orders", "order payment status", dest="order_command")
    for action, help_text in (
        ("confirm", "payment received: mark paid, credit the org"),
        ("fail", "payment failed"),
        ("cancel", "cancel an unpaid order"),
    ):
        p = _command(order, cmd_order_action, action, help=help_text)
        p.add_argument("order_id")

    p = _command(billing, cmd_price, "price", help="add a price version to a model (any org's)")
    p.add_argument("--model", required=True, help="model (deployment) id")
    p.add_argument("--input", type=_money, required=True, help="per million input tokens")
    p.add_argument("--output", type=_money, required=True, help="per million output tokens")
    p.add_argument("--cached", type=_money, default=None, help="per million cached tokens")
    p.add_argument("--request", type=_money, default=0, help="per request")
    p.add_argument("--from", dest="effective_from", type=instant, default=None)

    p = _command(
        billing,
        cmd_price_factor,
        "price-factor",
        help="org discount or surcharge (parts per million)",
    )
    p.add_argument("--org", required=True, help="org id or name")
    p.add_argument("--ppm", type=int, required=True, help="900000 = 10%% off")

    _command(billing, cmd_expire, "expire", help="lapse due packages and apply due prices now")
