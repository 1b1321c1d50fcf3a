"""Prometheus metrics of the Python processes (`onetoken control`/`serve`, `onetoken
ingest`): the text exposition format 0.0.4, and the listener that serves it.

Values are read when Prometheus scrapes: a collector turns what a component already
counts (or what is on disk) into metric families then, so nothing on a request or
ingestion path pays for metrics. A collector that fails is left out of that scrape and
`onetoken_collector_up{collector=...}` says 0, so an alert on a missing series has a
series to watch.

Label values are ids of engine instances, consumers, route templates and status codes:
never an org, key or account id, never a path with an id in it (DESIGN.md §3; docs/
dashboards.md says who may read the listener).
"""

from __future__ import annotations

import http.server
import logging
import math
import socket
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger("onetoken.metrics")

Kind = Literal["counter", "gauge", "histogram"]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Metric:
    """One metric family and its samples, built at scrape time."""

    name: str
    kind: Kind
    help: str
    #: (name suffix such as "_bucket", labels, value)
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, suffix: str = "", **labels: str) -> Metric:
        self.samples.append((suffix, labels, value))
        return self


Collector = Callable[[], Iterable[Metric]]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value == int(value)):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def render(metrics: Iterable[Metric]) -> str:
    out: list[str] = []
    for m in metrics:
        out.append(f"# HELP {m.name} {m.help.replace(chr(92), chr(92) * 2)}")
        out.append(f"# TYPE {m.name} {m.kind}")
        for suffix, labels, value in m.samples:
            pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            out.append(f"{m.name}{suffix}{{{pairs}}} {_number(value)}" if pairs
                       else f"{m.name}{suffix} {_number(value)}")
    return "\n".join(out) + "\n"


class Registry:
    """The collectors of one process, by name."""

    def __init__(self) -> None:
        self._collectors: list[tuple[str, Collector]] = []

    def register(self, name: str, collector: Collector) -> None:
        self._collectors.append((name, collector))

    def collect(self) -> list[Metric]:
        families: list[Metric] = []
        up = Metric(
            "onetoken_collector_up",
            "gauge",
            "1 when the collector answered this scrape, 0 when it failed (its series are "
            "missing from this scrape)",
        )
        for name, collector in self._collectors:
            try:
                got = list(collector())
            except Exception as exc:
                log.warning("metrics.collector_failed",
                            extra={"collector": name, "exc_type": type(exc).__name__})
                up.add(0, collector=name)
                continue
            families.extend(got)
            up.add(1, collector=name)
        return [*families, up]

    def render(self) -> str:
        return render(self.collect())


# Seconds: the control API answers in milliseconds; an export or a SQL query may take
# tens of seconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# Any other method a client sends is counted as "other": label values must not come
# from the client unbounded.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestStats:
    """Requests an HTTP API answered, by method, route template and status code, and
    their duration. Thread-safe: the API counts on its event loop, scrapes read on the
    listener's thread."""

    def __init__(
        self,
        prefix: str,
        buckets: tuple[float, ...] = DURATION_BUCKETS,
        *,
        long_polls: frozenset[str] = frozenset(),
    ) -> None:
        self.prefix = prefix
        self._buckets = buckets
        # Routes held open until something changes: counted, but their duration would
        # drown the response times in the histogram.
        self._long_polls = long_polls
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, str], int] = {}
        self._bucket_counts = [0] * (len(buckets) + 1)
        self._sum = 0.0

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method if method in _METHODS else "other", route, str(status))
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
            if route in self._long_polls:
                return
            self._bucket_counts[bisect_left(self._buckets, seconds)] += 1
            self._sum += seconds

    def metrics(self) -> list[Metric]:
        with self._lock:
            counts = dict(self._counts)
            buckets = list(self._bucket_counts)
            total = self._sum
        requests = Metric(
            f"{self.prefix}_requests_total", "counter",
            "Requests answered, by method, route template and status code",
        )
        for (method, route, code), n in sorted(counts.items()):
            requests.add(n, method=method, route=route, code=code)
        duration = Metric(
            f"{self.prefix}_request_duration_seconds", "histogram",
            "Request duration, from the first byte in to the last byte out (long polls "
            "left out)",
        )
        running = 0
        for bound, n in zip((*self._buckets, math.inf), buckets, strict=True):
            running += n
            duration.add(running, "_bucket", le=_number(bound))
        duration.add(total, "_sum").add(running, "_count")
        return [requests, duration]


def _split(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"invalid metrics address {listen!r}: expected host:port")
    return host.strip("[]"), int(port)


class _Handler(http.server.BaseHTTPRequestHandler):
    registry: Registry

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404)
            return
        body = self.registry.render().encode()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # Scrapes every 15 s are not worth a log line each.
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """GET /metrics on `listen` (host:port; port 0 picks one), on daemon threads."""

    def __init__(self, registry: Registry, listen: str) -> None:
        host, port = _split(listen)
        handler = type("Handler", (_Handler,), {"registry": registry})
        server = _Server6 if ":" in host else _Server
        self._server = server((host, port), handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="onetoken-metrics", daemon=True
        )

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        host = str(host)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> str:
        self._thread.start()
        return self.address

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
