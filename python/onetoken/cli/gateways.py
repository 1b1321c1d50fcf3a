"""`onetoken gateways list|retire`: the engine instances sharing this control DB and
Redis, and writing off one whose journal was lost with its disk (docs/scale-out.md,
"Operating: gateways and lost journals").

The command opens the control DB and Redis itself, like the billing commands: neither is
held by the running control process, so the ops channel (which exists to reach the chDB
path that process holds) is not needed. Imports happen when a command runs (see
onetoken.cli)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from onetoken.cli.common import EXIT_OK, CliError, action_group, open_db, settings_from_env


def _money(amount: int) -> str:
    from onetoken.kit.money import format_amount

    return format_amount(amount)


def _age(ms: int | None) -> str:
    if ms is None:
        return "-"
    return f"{ms / 1000:.1f}s"


def cmd_list(args: argparse.Namespace) -> int:
    from onetoken.ingest.gateways import inventory, open_redis

    settings = settings_from_env()
    state = open_db(settings)
    client = open_redis(settings)
    try:
        found = inventory(settings, state.session_factory, client)
    finally:
        if client is not None:
            client.close()
        state.db_engine.dispose()
    rows = [found.instances[i].as_dict() for i in sorted(found.instances)]
    if args.json:
        print(json.dumps({"redis": found.redis, "redis_error": found.redis_error,
                          "instances": rows}))
        return EXIT_OK
    print(_table(rows))
    if found.redis_error is not None:
        print(f"Redis did not answer ({found.redis_error}): no heartbeats or leases shown",
              file=sys.stderr)
    elif not found.redis:
        print("Redis not configured (ONETOKEN_REDIS_URL): no heartbeats or leases shown",
              file=sys.stderr)
    return EXIT_OK


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("INSTANCE", "STATE", "HEARTBEAT", "JOURNAL", "INGESTED", "HELD", "ORGS")
    lines = [head]
    for r in rows:
        state = (
            "retired" if r["retired"]
            else "written-off" if r["written_off_at"]
            else "live" if r["live"]
            else "dead"
        )
        orgs = sorted(r["held"].keys() | r["ingested"].keys())
        lines.append((
            r["instance_id"],
            state,
            _age(r["heartbeat_age_ms"]),
            f"{r['journal']} ({r['segments']})" if r["segments"] else r["journal"],
            _money(sum(r["ingested"].values())),
            _money(r["held_total"]),
            ",".join(orgs) or "-",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def cmd_retire(args: argparse.Namespace) -> int:
    from onetoken.ingest.caps import CapPublisher
    from onetoken.ingest.gateways import Refused, open_redis, write_off
    from onetoken.security.audit import CliActor

    settings = settings_from_env()
    state = open_db(settings)
    client = open_redis(settings)
    try:
        try:
            result = write_off(
                settings, state.session_factory, client, args.instance,
                reason=args.reason, actor=CliActor(),
            )
        except Refused as exc:
            raise CliError(f"{exc}; nothing written off") from None
        published = False
        if result.done and client is not None:
            # The running control's publisher finishes it within a full round anyway; one
            # round here frees the leases now. Revisions make the two rounds safe together.
            try:
                CapPublisher(settings, state.session_factory, client=client).publish_all()
                published = True
            except Exception as exc:
                print(f"onetoken: the caps were not published from here ({type(exc).__name__}); "
                      "the control process's next full round does it", file=sys.stderr)
    finally:
        if client is not None:
            client.close()
        state.db_engine.dispose()
    out = {
        "instance_id": result.instance_id,
        "written_off": result.done,
        "published": published,
        "orgs": {o: {"held": h, "ingested": i} for o, (h, i) in result.orgs.items()},
    }
    if args.json:
        print(json.dumps(out))
    elif not result.done:
        print(f"nothing to write off: instance {args.instance} is retired or unknown")
    else:
        for org_id, (held, ingested) in result.orgs.items():
            print(f"{org_id}  lease released {_money(held)}  ingested {_money(ingested)}")
        print(f"instance {args.instance} written off")
    return EXIT_OK


def register(sub: Any) -> None:
    gw = action_group(sub, "gateways", "engine instances sharing the control DB and Redis",
                      dest="gateways_command")
    p = gw.add_parser("list", help="every engine instance the control DB, Redis and this "
                      "machine's spool dir know: heartbeat, journal, money ingested and held")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)
    p = gw.add_parser(
        "retire",
        help="write off an instance whose journal was lost with its disk (refused while it "
        "is live or its journal is here)",
        description="Write off an engine instance whose journal is gone: its money leases in "
        "Redis are released and its orgs' caps lowered by what the ledger ingested from it. "
        "The calls it served after its last ingested batch stay uncharged and out of the "
        "call log. Idempotent.",
    )
    p.add_argument("instance", help="the instance id (onetoken gateways list)")
    p.add_argument("--lost", action="store_true", required=True,
                   help="confirm that its journal is lost")
    p.add_argument("--reason", required=True, help="why, for the security log (a short label)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_retire)
