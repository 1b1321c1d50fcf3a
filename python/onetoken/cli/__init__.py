"""The `onetoken` command (also `python -m onetoken.cli`).

Only the standard library at import time: `onetoken gateway` must not load FastAPI,
SQLAlchemy or pydantic (tests/unit/test_gateway_runner.py); every other command imports
what it needs when it runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from onetoken.cli.common import (
    EXIT_ERROR,
    EXIT_FOUND,
    EXIT_OK,
    CliError,
    action_group,
    instant,
    open_db,
    settings_from_env,
)
from onetoken.kit.files import restrict_umask

if TYPE_CHECKING:
    from onetoken.settings import Settings

def cmd_serve(args: argparse.Namespace) -> int:
    return _run_control(demo=args.demo, gateway=True)


def cmd_control(_: argparse.Namespace) -> int:
    return _run_control(demo=False, gateway=False)


def _run_control(*, demo: bool, gateway: bool) -> int:
    from onetoken.serve import ServeError, run

    try:
        return run(settings_from_env(), demo=demo, gateway=gateway)
    except ServeError as exc:
        raise CliError(str(exc)) from None
    except ImportError as exc:
        raise CliError(f"the gateway extension is not available: {exc}") from None


def cmd_gateway(args: argparse.Namespace) -> int:
    from onetoken.gateway.runner import main as gateway_main

    try:
        return gateway_main(pool=args.pool)
    except ImportError as exc:
        raise CliError(f"the gateway extension is not available: {exc}") from None


def cmd_migrate(_: argparse.Namespace) -> int:
    state = open_db(settings_from_env())
    state.db_engine.dispose()
    print("control database is up to date")
    return EXIT_OK


def cmd_analytics_ddl(args: argparse.Namespace) -> int:
    """The packaged ClickHouse migrations in order, for preparing a server by hand; with
    --cluster, rewritten for a sharded, replicated cluster (onetoken.analytics.cluster)."""
    from onetoken.analytics.clickhouse import load_migrations
    from onetoken.analytics.cluster import (
        SOURCE_DATABASE,
        ClusterDdlError,
        cluster_ddl,
        rename_database,
    )

    try:
        if args.cluster:
            print("-- Validated, not run: chDB parses these statements and runs them without")
            print("-- ON CLUSTER and Keeper paths; no ClickHouse cluster or Keeper has executed")
            print("-- them. See docs/clickhouse-cluster.md.")
            for text in cluster_ddl(args.cluster, args.database):
                print(text)
            return EXIT_OK
        for migration in load_migrations():
            print(f"-- {migration.name}")
            if args.database == SOURCE_DATABASE:
                print(migration.sql.rstrip("\n"))
            else:
                for statement in migration.statements():
                    print(f"{rename_database(statement, args.database)};")
    except ClusterDdlError as exc:
        raise CliError(str(exc)) from None
    return EXIT_OK


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from onetoken.bootstrap import bootstrap

    state = open_db(settings_from_env())
    try:
        with state.session_factory() as session:
            result = bootstrap(session, state.secrets)
    finally:
        state.db_engine.dispose()
    out: dict[str, Any] = {
        "created": result.created,
        "org_id": result.org_id,
        "admin_email": result.admin_email,
    }
    if result.created:
        out["admin_password"] = result.admin_password
        out["api_key"] = result.api_key
    if args.json:
        print(json.dumps(out))
    elif result.created:
        print(f"created org {result.org_id}")
        print(f"admin email:    {result.admin_email}")
        print(f"admin password: {result.admin_password}   (shown once)")
        print(f"api key:        {result.api_key}   (shown once)")
    else:
        print(f"already bootstrapped: org {result.org_id}, admin {result.admin_email}")
    return EXIT_OK


def cmd_keys_create(args: argparse.Namespace) -> int:
    from onetoken.keys.service import create_key
    from onetoken.orgs.service import find_org, org_owner
    from onetoken.security.audit import CliActor

    name = args.name.strip()
    if not name or len(name) > 100:
        raise CliError("--name must be 1 to 100 characters")
    state = open_db(settings_from_env())
    try:
        with state.session_factory() as session:
            org = find_org(session, args.org)
            if org is None:
                raise CliError("no such org (give its id or name)")
            owner = org_owner(session, org.id)
            if owner is None:
                raise CliError("the org has no active owner account to own the key")
            key, plaintext = create_key(
                session, state.secrets, org_id=org.id, created_by=owner.id, name=name,
                actor=CliActor(org_id=org.id),
            )
            session.commit()
    finally:
        state.db_engine.dispose()
    out = {
        "key_id": key.id,
        "org_id": key.org_id,
        "name": key.name,
        "display": key.display,
        "api_key": plaintext,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{plaintext}\n(key {key.id}; shown once; a running server picks it up within a second)"
        )
    return EXIT_OK


def cmd_orgs_terminate(args: argparse.Namespace) -> int:
    """Terminate an org at contract end, or resume a termination that stopped half-way."""
    from pathlib import Path

    from onetoken.orgs.service import find_org
    from onetoken.rights import termination
    from onetoken.security import audit
    from onetoken.security.audit import CliActor

    reason = args.reason.strip()
    if not reason or len(reason) > 500:
        raise CliError("--reason must be 1 to 500 characters")
    state = open_db(settings_from_env())
    try:
        with state.session_factory() as session:
            org = find_org(session, args.org)
            if org is None:
                raise CliError("no such org (give its id or name)")
            org_id = org.id
        result = termination.terminate(
            state, org_id, reason=reason, requested_by=None,
            export_path=Path(args.export) if args.export else None,
        )
        if result.ran:
            audit.event(CliActor(org_id=org_id), "admin.org_terminated", "high",
                        subject_id=org_id, org_id=org_id,
                        detail={"steps": ",".join(result.ran), "reason": reason})
    finally:
        state.db_engine.dispose()
    out = {"org_id": result.org_id, "export_path": result.export_path, "ran": list(result.ran),
           "steps": result.steps,
           "completed_at": result.completed_at.isoformat() if result.completed_at else None}
    if args.json:
        print(json.dumps(out))
    else:
        done = ", ".join(result.ran) if result.ran else "nothing left to do"
        print(f"{org_id} terminated ({done}); export: {result.export_path}")
    return EXIT_OK


def cmd_orgs_decrypt_export(args: argparse.Namespace) -> int:
    """Decrypt a termination export for its hand-over to the org."""
    import os
    from pathlib import Path

    from onetoken.kit.files import PRIVATE_FILE_MODE
    from onetoken.kit.sealed import BackupFileError
    from onetoken.rights import termination

    try:
        raw = Path(args.export).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read the export: {exc.strerror or exc}") from None
    try:
        document = termination.open_export(raw, settings_from_env().secret_key_bytes())
    except BackupFileError as exc:
        raise CliError(str(exc)) from None
    if args.out == "-":
        sys.stdout.buffer.write(document)
        return EXIT_OK
    try:
        # Never over another file, and readable by this user only: it is the org's data.
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        raise CliError(f"{args.out} exists: the export is never written over a file") from None
    with os.fdopen(fd, "wb") as out:
        out.write(document)
    print(f"{args.out}: the export in clear ({len(document)} bytes); delete it once handed over")
    return EXIT_OK


def cmd_providers_apply(args: argparse.Namespace) -> int:
    """Apply a declarative providers file (see onetoken.providers.declarative)."""
    from pathlib import Path

    from onetoken.providers.declarative import ProvidersFileError, apply_file, load_file

    state = open_db(settings_from_env())
    try:
        doc = load_file(Path(args.file))
        with state.session_factory() as session:
            result = apply_file(session, state.secrets, doc, prune=args.prune)
            if args.dry_run:
                session.rollback()
            else:
                session.commit()
    except ProvidersFileError as exc:
        raise CliError(str(exc)) from None
    finally:
        state.db_engine.dispose()
    if args.json:
        print(json.dumps({**result.as_dict(), "dry_run": args.dry_run}))
    else:
        for verb, items in (("created", result.created), ("updated", result.updated),
                            ("deleted", result.deleted)):
            for item in items:
                print(f"{verb} {item}")
        print(f"{result.unchanged} unchanged{' (dry run, nothing saved)' if args.dry_run else ''}")
    return EXIT_OK


def cmd_mock_upstream(args: argparse.Namespace) -> int:
    try:
        from onetoken import _core
    except ImportError as exc:
        raise CliError(f"the gateway extension is not available: {exc}") from None
    options = {
        k: v
        for k, v in (
            ("chunks", args.chunks),
            ("delay_ms", args.delay_ms),
            ("latency_ms", args.latency_ms),
        )
        if v is not None
    }
    try:
        _core.serve_mock_upstream(args.listen, **options)
    except _core.OnetokenError as exc:
        raise CliError(f"mock upstream: {exc}") from None
    return EXIT_OK


def cmd_audit_retention(args: argparse.Namespace) -> int:
    from onetoken.audit import audit

    if not args.needle:
        raise CliError("--needle must not be empty")
    settings = settings_from_env()
    report = audit(settings, args.needle, clickhouse_scan=_audit_through_control(settings))
    print(report.render())
    if report.found:
        print(f"FOUND in {len(report.findings)} location(s)", file=sys.stderr)
    elif report.problems:
        # Not finding it proves nothing about what could not be read (e.g. the embedded
        # ClickHouse held by a server that did not answer): say so and fail, never report
        # clean.
        print("incomplete: some stores could not be scanned", file=sys.stderr)
    elif report.ticket_findings:
        # The one exception to "no content" (docs/tickets.md): not a retention failure.
        print(
            f"only in tickets ({len(report.ticket_findings)} location(s)): content customers "
            "submitted to work orders, kept by design; none in call data",
            file=sys.stderr,
        )
    else:
        print("clean: not found in any persisted data", file=sys.stderr)
    return report.exit_code


def _audit_through_control(settings: Settings) -> Any:
    """audit()'s `clickhouse_scan` when a running control process holds the chDB path (it
    scans, this process still scans the files under the data dir); None otherwise."""
    from onetoken.analytics.clickhouse import chdb_locked_elsewhere
    from onetoken.cli.ops_client import OpsClient, OpsError

    locked = chdb_locked_elsewhere(settings)
    if locked is None:
        return None

    def scan(needle: str, report: Any) -> None:
        try:
            with OpsClient(settings, locked) as ops:
                result = ops.audit_clickhouse(needle)
        except OpsError as exc:
            report.problems.append(f"ClickHouse: {exc}")
            return
        report.findings.extend(result["findings"])
        report.problems.extend(result["problems"])
        report.columns_scanned += int(result["columns_scanned"])

    return scan


def _call_log_reader(settings: Settings) -> Any:
    """A ClickHouse client opened here, or, when a running control process holds the
    embedded chDB path, an OpsClient that asks that process (onetoken.ops)."""
    from onetoken.analytics.clickhouse import (
        AnalyticsError,
        ChdbLockedError,
        chdb_locked_elsewhere,
        open_client,
    )
    from onetoken.cli.ops_client import OpsClient

    locked = chdb_locked_elsewhere(settings)
    if locked is not None:
        return OpsClient(settings, locked)
    try:
        return open_client(settings)
    except ChdbLockedError as raced:  # a server started between the probe and the open
        return OpsClient(settings, raced)
    except AnalyticsError as exc:
        raise CliError(f"cannot open ClickHouse: {exc}") from None


def cmd_calls_export(args: argparse.Namespace) -> int:
    """Every call_log row (metadata only) as JSON lines, oldest first, from the stores or
    through the running control process."""
    from onetoken.analytics.columns import CALL_LOG_COLUMNS, CALL_LOG_READ
    from onetoken.cli.ops_client import OpsClient, OpsError

    settings = settings_from_env()
    reader = _call_log_reader(settings)
    if isinstance(reader, OpsClient):
        try:
            with reader:
                for columns, rows in reader.export_pages(args.org):
                    if tuple(columns) != CALL_LOG_COLUMNS:
                        raise CliError("the running server has another call_log schema: "
                                       "run the same onetoken version as the server")
                    for row in rows:
                        print(json.dumps(dict(zip(CALL_LOG_COLUMNS, row, strict=True))))
        except OpsError as exc:
            raise CliError(str(exc)) from None
        return EXIT_OK
    where = " WHERE org_id = {org:String}" if args.org else ""
    selected = ", ".join(
        "toUnixTimestamp64Micro(ts)" if c == "ts" else c for c in CALL_LOG_COLUMNS
    )
    try:
        with reader.query_row_block_stream(
            f"SELECT {selected} FROM {CALL_LOG_READ} FINAL{where} ORDER BY ts, request_id",  # noqa: S608
            parameters={"org": args.org or ""},
        ) as stream:
            for block in stream:
                for row in block:
                    print(json.dumps(dict(zip(CALL_LOG_COLUMNS, row, strict=True))))
    finally:
        reader.close()
    return EXIT_OK


def cmd_calls_stats(args: argparse.Namespace) -> int:
    """An org's calls, errors, tokens, cost and latency per model, key or day (what the
    control API's /billing/call-stats gives an org admin)."""
    from onetoken.billing.statements import call_stats
    from onetoken.cli.ops_client import OpsClient, OpsError
    from onetoken.kit.money import format_amount

    end = args.end or datetime.now(UTC)
    start = args.start or end - timedelta(days=30)
    if start >= end:
        raise CliError("--from must be before --to")
    settings = settings_from_env()
    reader = _call_log_reader(settings)
    try:
        if isinstance(reader, OpsClient):
            rows = reader.call_stats(org=args.org, start=start, end=end, group_by=args.by)
        else:
            rows = call_stats(reader, args.org, start, end, args.by)
    except OpsError as exc:
        raise CliError(str(exc)) from None
    finally:
        reader.close()
    if args.json:
        print(json.dumps({"org_id": args.org, "group_by": args.by, "start": start.isoformat(),
                          "end": end.isoformat(), "data": rows}))
    else:
        for r in rows:
            print(f"{r['group']}  calls {r['calls']}  errors {r['errors']}  "
                  f"prompt {r['prompt_tokens']}  completion {r['completion_tokens']}  "
                  f"cached {r['cached_tokens']}  cost {format_amount(r['cost'])}  "
                  f"p50 {r['latency_p50_us']}us  p99 {r['latency_p99_us']}us")
    print(f"{sum(r['calls'] for r in rows)} call(s) from {start.isoformat()} to "
          f"{end.isoformat()}", file=sys.stderr)
    return EXIT_OK


def cmd_sql(args: argparse.Namespace) -> int:
    """Read-only SQL over call metadata for an operator: in this process when nothing holds
    the stores, else through the running control process; the same function, refusals and
    limits either way (onetoken.security.sqlaudit, docs/sql.md)."""
    from onetoken.analytics.sqlaccess import SqlQueryError, limits_from
    from onetoken.cli.ops_client import OpsClient, OpsError
    from onetoken.security import log as security_log
    from onetoken.security.audit import CliActor
    from onetoken.security.sqlaudit import run_audited

    org = None if args.all_orgs else args.org
    settings = settings_from_env()
    reader = _call_log_reader(settings)
    try:
        if isinstance(reader, OpsClient):
            answer = reader.sql(args.query, org=org)
        else:
            # The audit event goes to the spool; the server writes it to the security log.
            security_log.install(security_log.SecurityLog(settings.spool_dir))
            result = run_audited(CliActor(org_id=org or ""), reader, args.query, org_id=org,
                                 limits=limits_from(settings))
            answer = {"columns": result.columns, "types": result.types, "rows": result.rows,
                      "row_count": result.row_count, "truncated": result.truncated,
                      "elapsed_ms": result.elapsed_ms, "org": org}
    except SqlQueryError as exc:
        raise CliError(f"{exc.code}: {exc.message}") from None
    except OpsError as exc:
        raise CliError(f"{exc.code}: {exc}" if exc.code else str(exc)) from None
    finally:
        reader.close()
    _print_sql(answer, args.format)
    note = " (truncated at ONETOKEN_SQL_MAX_RESULT_ROWS)" if answer["truncated"] else ""
    print(f"{answer['row_count']} row(s) in {answer['elapsed_ms']} ms{note}", file=sys.stderr)
    return EXIT_OK


def _print_sql(answer: dict[str, Any], fmt: str) -> None:
    columns: list[str] = answer["columns"]
    rows: list[list[Any]] = answer["rows"]
    if fmt == "json":
        print(json.dumps(answer))
        return
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([_cell(v) for v in row] for row in rows)
        return
    lines = [columns, *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    return value if isinstance(value, str) else json.dumps(value)


# How often a waiting `onetoken ingest` looks at the control DB's schema again: a
# migration takes seconds, and the journal it has not ingested meanwhile stays on disk.
SCHEMA_POLL_S = 2.0


def _wait_for_schema(engine: Any, *, once: bool, stop: threading.Event) -> bool:
    """Hold ingestion until the control DB is at this release's schema; False when stopped
    while waiting.

    Ingest never migrates: in a rollout its sidecar of the new release may start before the
    control plane's one migrate step, and two processes running alembic at once can fail
    midway. It waits rather than exiting because a sidecar that exits is restarted with a
    growing back-off, which would delay the catch-up long after the migration landed; with
    --once (a one-shot job) it exits with the reason instead. A schema newer than this
    release is a rollout under way (the old pods still running ingest into it already), so
    it is ingested into, with a warning.
    """
    import logging

    from sqlalchemy.exc import OperationalError

    from onetoken.db.migrate import schema_state

    log = logging.getLogger("onetoken.ingest")
    said = ""
    while True:
        try:
            schema = schema_state(engine)
        except OperationalError as exc:
            kind = "unreachable"
            reason = f"the control database is unreachable ({type(exc).__name__})"
            fields = {"kind": kind}
        else:
            kind, reason = schema.kind, schema.describe()
            fields = {"kind": kind, "version": ",".join(schema.current) or "none",
                      "revision": ",".join(schema.expected)}
        if kind == "current":
            if said:
                # At the waiting line's level, so whoever saw that one sees it end.
                log.warning("db.schema_ready", extra=fields)
            return True
        if kind == "ahead":
            log.warning("db.schema_newer_than_release", extra=fields)
            return True
        if once:
            raise CliError(f"{reason}: run `onetoken migrate` first (ingest never migrates)")
        if reason != said:
            print(f"onetoken ingest: {reason}; waiting for `onetoken migrate` (the control "
                  "plane's migrate step): ingest never migrates", file=sys.stderr, flush=True)
            log.warning("db.waiting_for_migration", extra=fields)
            said = reason
        if stop.wait(SCHEMA_POLL_S):
            return False


def cmd_ingest(args: argparse.Namespace) -> int:
    """Ingest the journals in this data dir's spool into ClickHouse and the ledger until
    SIGTERM/SIGINT (or once with --once): ingestion as its own process, one per node. The
    control DB must be at this release's schema (_wait_for_schema)."""
    import signal

    from onetoken.analytics.clickhouse import parse_dsn
    from onetoken.control import ingest_metrics
    from onetoken.ingest.ingestor import Ingestor
    from onetoken.serve import ServeError, start_metrics, url

    settings = settings_from_env()
    if parse_dsn(settings.clickhouse_dsn, settings.data_dir).kind == "chdb":
        raise CliError(
            "onetoken ingest needs a ClickHouse server (ONETOKEN_CLICKHOUSE_DSN=http://...): "
            "embedded chDB allows one process per data path, and on the embedded default "
            "the control process (onetoken control / serve) ingests the journals itself"
        )
    state = open_db(settings, migrate=False)
    done = threading.Event()
    if not args.once:
        # Before the wait, so a pod stopped while waiting exits at once and cleanly.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
    try:
        if not _wait_for_schema(state.db_engine, once=args.once, stop=done):
            return EXIT_OK
        ingestor = Ingestor(settings, state.session_factory)
        metrics = None
        try:
            if args.once:
                ingested = ingestor.catch_up()
                print(f"{ingested} record(s) ingested", file=sys.stderr)
                return EXIT_OK
            listen = args.metrics_listen or settings.ingest_metrics_listen
            if listen:
                try:
                    metrics = start_metrics(
                        ingest_metrics(settings, state.session_factory, ingestor), listen
                    )
                except ServeError as exc:
                    raise CliError(str(exc)) from None
                print(f"metrics: {url(metrics.address)}", flush=True)
            ingestor.start()
            done.wait()
            return EXIT_OK
        finally:
            # Up while the last catch-up runs: a scrape then still sees the backlog go.
            ingestor.stop()
            if metrics is not None:
                metrics.stop()
    finally:
        state.db_engine.dispose()


def cmd_billing_reconcile(args: argparse.Namespace) -> int:
    """Ledger usage against call_log cost per org; exit 1 on any difference."""
    from onetoken.billing.reconcile import OrgReconciliation, reconcile
    from onetoken.cli.ops_client import OpsClient, OpsError
    from onetoken.kit.money import format_amount

    settings = settings_from_env()
    reader = _call_log_reader(settings)
    if isinstance(reader, OpsClient):
        try:
            with reader:
                lines = [
                    OrgReconciliation(
                        r["org_id"],
                        date.fromisoformat(r["day"]),
                        int(r["ledger_usage"]),
                        int(r["call_log_cost"]),
                        int(r["ledger_calls"]),
                        int(r["call_log_calls"]),
                    )
                    for r in reader.reconcile(start=args.start, end=args.end, org=args.org)
                ]
        except OpsError as exc:
            raise CliError(str(exc)) from None
    else:
        try:
            state = open_db(settings)
        except BaseException:
            reader.close()
            raise
        try:
            with state.session_factory() as session:
                lines = reconcile(session, reader, start=args.start, end=args.end)
                if args.org:
                    lines = [r for r in lines if r.org_id == args.org]
        finally:
            reader.close()
            state.db_engine.dispose()
    if args.json:
        print(json.dumps([
            {"org_id": r.org_id, "day": r.day.isoformat(), "ledger_usage": r.ledger_usage,
             "call_log_cost": r.call_log_cost, "difference": r.difference,
             "ledger_calls": r.ledger_calls, "call_log_calls": r.call_log_calls}
            for r in lines
        ]))
    else:
        for r in lines:
            print(f"{r.org_id}  {r.day}  ledger {format_amount(r.ledger_usage)} "
                  f"({r.ledger_calls} calls)  call_log {format_amount(r.call_log_cost)} "
                  f"({r.call_log_calls} calls)  difference {format_amount(r.difference)}")
    bad = [r for r in lines if r.difference != 0 or r.calls_difference != 0]
    print(f"{len(lines)} org-day(s), {len(bad)} with a difference", file=sys.stderr)
    return EXIT_FOUND if bad else EXIT_OK


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onetoken",
        description="API relay and model gateway that never stores what was asked or answered.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the control process and one gateway it supervises")
    p.add_argument(
        "--demo",
        action="store_true",
        help="bundled fake provider, demo models, a funded org and a printed API key",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "control", help="run the control API, ingestion and background work (no gateway)"
    )
    p.set_defaults(func=cmd_control)

    p = sub.add_parser(
        "gateway",
        help="run a gateway: the engine serving /v1 on the control process's config "
        "(ONETOKEN_CONTROL_URL, ONETOKEN_GATEWAY_TOKEN or the master secret)",
    )
    p.add_argument(
        "--pool",
        metavar="NAME",
        help="serve the orgs pinned to this dedicated gateway pool only (default: "
        "ONETOKEN_GATEWAY_POOL, else the shared gateways); docs/pools.md",
    )
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("bootstrap", help="create the first org, owner account and API key")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("migrate", help="upgrade the control database schema")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "analytics-ddl",
        help="print the ClickHouse migrations in order (the service applies them at start)",
        description="Print the ClickHouse migrations in order. With --cluster, print them as "
        "DDL for a sharded, replicated cluster: Replicated* <table>_local tables and "
        "Distributed <table> tables ON CLUSTER, sharded by request/event id. The cluster "
        "DDL is validated, not run: chDB parses it and runs it without ON CLUSTER and Keeper "
        "paths, and the analytics queries are checked over two local stand-in shards; no "
        "ClickHouse cluster has executed it "
        "(docs/clickhouse-cluster.md).",
    )
    p.add_argument(
        "--cluster", metavar="NAME", help="cluster name from remote_servers (validated, not run)"
    )
    p.add_argument(
        "--database", default="onetoken", metavar="NAME",
        help="database to create (default %(default)s, the one the control plane reads)",
    )
    p.set_defaults(func=cmd_analytics_ddl)

    p = sub.add_parser("mock-upstream", help="run the bundled fake model provider")
    p.add_argument("--listen", default="127.0.0.1:9009", help="host:port (default %(default)s)")
    p.add_argument("--chunks", type=_positive, default=None, help="stream chunks per response")
    p.add_argument("--delay-ms", type=_positive, default=None, help="delay between chunks")
    p.add_argument("--latency-ms", type=_positive, default=None, help="delay before responding")
    p.set_defaults(func=cmd_mock_upstream)

    p = sub.add_parser(
        "audit-retention",
        help="scan every persisted byte for a string (exit 1 when found outside tickets)",
    )
    p.add_argument("--needle", required=True, help="the string to look for")
    p.set_defaults(func=cmd_audit_retention)

    keys = action_group(sub, "keys", "manage API keys", dest="keys_command")
    p = keys.add_parser("create", help="create an API key (printed once)")
    p.add_argument("--org", required=True, help="org id or name")
    p.add_argument("--name", required=True, help="a label for the key")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_keys_create)

    orgs = action_group(sub, "orgs", "organizations", dest="orgs_command")
    p = orgs.add_parser(
        "terminate",
        help="at contract end: export the org's data, revoke its keys, anonymize its members, "
        "delete its callbacks and providers (resumable: run it again after a failure)",
    )
    p.add_argument("org", help="org id or name")
    p.add_argument("--reason", required=True, help="why (the contract's end); audited")
    p.add_argument("--export", default=None, metavar="PATH",
                   help="where to write the data export (default: exports/ in the data dir; "
                   "fixed by the first run)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_orgs_terminate)
    p = orgs.add_parser(
        "decrypt-export",
        help="decrypt a termination export (sealed with the master secret) for its hand-over",
    )
    p.add_argument("export", help="the sealed export file")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="where to write the JSON document (0600, never over a file; - for stdout)")
    p.set_defaults(func=cmd_orgs_decrypt_export)

    prov = action_group(sub, "providers", "providers, models and routes", dest="providers_command")
    p = prov.add_parser("apply", help="apply a declarative YAML/TOML/JSON file (idempotent; "
                        "a running server picks it up within a second)")
    p.add_argument("file", help="the file")
    p.add_argument("--prune", action="store_true",
                   help="delete file-managed entries the file no longer lists")
    p.add_argument("--dry-run", action="store_true", help="report changes, save nothing")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_providers_apply)

    p = sub.add_parser("ingest", help="ingest the gateways' journals into ClickHouse and the "
                       "ledger (needs a ClickHouse server; the control process does it on chDB)")
    p.add_argument("--once", action="store_true", help="catch up once and exit")
    p.add_argument(
        "--metrics-listen", metavar="HOST:PORT", default=None,
        help="serve Prometheus /metrics here: journal depth, ingestion lag, the spools "
        "(default ONETOKEN_INGEST_METRICS_LISTEN; unset: none; docs/dashboards.md)",
    )
    p.set_defaults(func=cmd_ingest)

    calls = action_group(sub, "calls", "call metadata", dest="calls_command")
    p = calls.add_parser("export", help="print call_log rows as JSON lines, oldest first")
    p.add_argument("--org", default=None, help="only this org id")
    p.set_defaults(func=cmd_calls_export)
    p = calls.add_parser("stats", help="an org's calls, errors, tokens, cost and latency per "
                         "model, key or day")
    p.add_argument("--org", required=True, help="org id")
    p.add_argument("--by", choices=("model", "key", "day", "application"), default="model")
    p.add_argument("--from", dest="start", type=instant, default=None,
                   help="ISO start (incl.; default 30 days before --to)")
    p.add_argument("--to", dest="end", type=instant, default=None,
                   help="ISO end (excl.; default now)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_calls_stats)

    p = sub.add_parser("sql", help="run one read-only SELECT over call metadata (docs/sql.md)")
    p.add_argument("query", help="one SELECT statement")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("--org", default=None, help="only this org's rows (org id)")
    scope.add_argument("--all-orgs", action="store_true", help="every org's rows")
    p.set_defaults(func=cmd_sql)

    billing = action_group(sub, "billing", "billing operations", dest="billing_command")
    p = billing.add_parser("reconcile", help="ledger usage vs call_log cost per org (exit 1 "
                           "on any difference)")
    p.add_argument("--from", dest="start", type=instant, default=None, help="ISO start (incl.)")
    p.add_argument("--to", dest="end", type=instant, default=None, help="ISO end (excl.)")
    p.add_argument("--org", default=None, help="only this org id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_billing_reconcile)
    from onetoken.cli.billing import register as register_billing

    register_billing(billing)
    from onetoken.cli.gateways import register as register_gateways

    register_gateways(sub)
    from onetoken.cli.backup import register as register_backup

    register_backup(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    # Every command may create files in the data dir, some through chDB or SQLite, which
    # would take the umask's mode: the service's files are private whatever the caller's.
    restrict_umask()
    try:
        return func(args)
    except CliError as exc:
        print(f"onetoken: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Only a command that loaded onetoken.kit.errors can raise its errors.
        errors = sys.modules.get("onetoken.kit.errors")
        if errors is not None and isinstance(exc, errors.OnetokenError):
            print(f"onetoken: error: {exc.message}", file=sys.stderr)
            return EXIT_ERROR
        raise

