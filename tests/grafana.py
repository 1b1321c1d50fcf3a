"""What Grafana and its ClickHouse plugin (grafana-clickhouse-datasource) do to a panel's
SQL before ClickHouse sees it, so that tests can run the dashboards' queries as Grafana
would (tests/unit/test_grafana_dashboards.py).

Three steps, in the plugin's order:

1. ``$__conditionalAll(condition, $var)`` (the plugin's front end, applyConditionalAll):
   ``1=1`` when the variable is set to All, else the condition as written. Arguments are
   split at the commas outside parentheses.
2. Template variables (Grafana's templateSrv with the plugin's format function):
   ``$var``, ``${var}``, ``${var:format}`` and ``[[var]]``. A multi-value variable becomes
   its values quoted and joined, ``'a','b'``; a single value is inserted as it is. All
   stands for every option's value (the dashboards set no custom all value).
3. The backend's macros (pkg/macros/macros.go), for a time range and interval:
   ``$__timeFilter(col)`` -> ``col >= toDateTime(from) AND col <= toDateTime(to)``,
   ``$__timeFilter_ms(col)`` with ``fromUnixTimestamp64Milli``, ``$__dateFilter(col)``
   with ``toDate('YYYY-MM-DD')``, ``$__fromTime`` / ``$__toTime`` -> ``toDateTime(unix)``,
   ``$__fromTime_ms`` / ``$__toTime_ms``, ``$__timeInterval(col)`` ->
   ``toStartOfInterval(toDateTime(col), INTERVAL <s> second)``, ``$__timeInterval_ms(col)``
   and ``$__interval_s`` -> the interval in whole seconds, at least 1.

Anything left that looks like a variable or macro is an error: Grafana would send it to
ClickHouse as it is and the panel would fail.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

#: Grafana's value of a multi-value variable set to All.
ALL = "$__all"

_VARIABLE = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?::([^}]+))?\}"
)
_LEFTOVER = re.compile(r"\$(?:\{|\w)|\[\[")
_CONDITIONAL_ALL = "$__conditionalAll("


@dataclass(frozen=True)
class Variable:
    """A template variable's current selection, and every option it offers (what All
    stands for)."""

    selected: Sequence[str]
    options: Sequence[str]
    multi: bool = True

    @property
    def is_all(self) -> bool:
        return list(self.selected) == [ALL]

    def values(self) -> list[str]:
        return list(self.options) if self.is_all else list(self.selected)


@dataclass(frozen=True)
class TimeRange:
    start: datetime
    end: datetime
    #: Grafana's $__interval for the panel (the range over its data points), seconds.
    interval_s: float


def _macro_args(sql: str, open_paren: int) -> tuple[list[str], int]:
    """Arguments of the call whose '(' is at `open_paren`, and the index after its ')'."""
    depth = 0
    args: list[str] = []
    start = open_paren + 1
    for i in range(open_paren, len(sql)):
        ch = sql[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                args.append(sql[start:i])
                return args, i + 1
        elif ch == "," and depth == 1:
            args.append(sql[start:i])
            start = i + 1
    raise ValueError(f"unbalanced parentheses after {sql[open_paren - 20:open_paren + 1]!r}")


def _variable_name(arg: str) -> str:
    match = re.search(r"\$\{(\w+)\}|\$(\w+)", arg)
    if match is None:
        raise ValueError(f"$__conditionalAll needs a variable as its 2nd argument: {arg!r}")
    return match[1] or match[2]


def conditional_all(sql: str, variables: Mapping[str, Variable]) -> str:
    index = sql.rfind(_CONDITIONAL_ALL)
    while index != -1:
        args, end = _macro_args(sql, index + len(_CONDITIONAL_ALL) - 1)
        if len(args) != 2:
            raise ValueError(f"$__conditionalAll takes 2 arguments, got {args!r}")
        variable = variables[_variable_name(args[1])]
        phrase = "1=1" if variable.is_all or list(variable.selected) == [""] else args[0]
        sql = sql[:index] + phrase + sql[end:]
        index = sql.rfind(_CONDITIONAL_ALL)
    return sql


def _format(variable: Variable, fmt: str | None) -> str:
    values = variable.values()
    if fmt not in (None, "raw"):
        raise ValueError(f"variable format {fmt!r} is not one the dashboards use")
    if variable.multi or variable.is_all:
        return "'" + "','".join(values) + "'"
    return values[0]


def template_variables(sql: str, variables: Mapping[str, Variable]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match[1] or match[2] or match[4]
        if name.startswith("__"):
            # Grafana's own ($__interval ...) and the backend's macros: not ours to expand.
            return match[0]
        if name not in variables:
            raise KeyError(f"the query uses ${name}, which the dashboard does not define")
        return _format(variables[name], match[3] or match[5])

    return _VARIABLE.sub(replace, sql)


def _datetime(t: datetime) -> str:
    return f"toDateTime({int(t.timestamp())})"


def _datetime64(t: datetime) -> str:
    return f"fromUnixTimestamp64Milli({int(t.timestamp() * 1000)})"


def _date(t: datetime) -> str:
    return f"toDate('{t.astimezone(UTC):%Y-%m-%d}')"


def _between(column: str, low: str, high: str) -> str:
    return f"{column} >= {low} AND {column} <= {high}"


def _macros(r: TimeRange) -> dict[str, Callable[[list[str]], str]]:
    seconds = max(int(r.interval_s), 1)
    millis = max(int(r.interval_s * 1000), 1)
    return {
        "fromTime": lambda a: _datetime(r.start),
        "toTime": lambda a: _datetime(r.end),
        "fromTime_ms": lambda a: _datetime64(r.start),
        "toTime_ms": lambda a: _datetime64(r.end),
        "timeFilter": lambda a: _between(a[0], _datetime(r.start), _datetime(r.end)),
        "timeFilter_ms": lambda a: _between(a[0], _datetime64(r.start), _datetime64(r.end)),
        "dateFilter": lambda a: _between(a[0], _date(r.start), _date(r.end)),
        "timeInterval": lambda a: (
            f"toStartOfInterval(toDateTime({a[0]}), INTERVAL {seconds} second)"
        ),
        "timeInterval_ms": lambda a: (
            f"toStartOfInterval(toDateTime64({a[0]}, 3), INTERVAL {millis} millisecond)"
        ),
        "interval_s": lambda a: str(seconds),
    }


#: Macros that take one argument; the rest take none.
_WITH_ARGUMENT = frozenset({"timeFilter", "timeFilter_ms", "dateFilter", "timeInterval",
                            "timeInterval_ms"})


def backend_macros(sql: str, time_range: TimeRange) -> str:
    macros = _macros(time_range)
    # Longest names first: $__timeFilter must not eat the start of $__timeFilter_ms.
    pattern = re.compile(
        r"\$__(" + "|".join(sorted(map(re.escape, macros), key=len, reverse=True)) + r")\b"
    )
    out: list[str] = []
    pos = 0
    for match in pattern.finditer(sql):
        if match.start() < pos:
            continue
        name = match[1]
        out.append(sql[pos : match.start()])
        args: list[str] = []
        end = match.end()
        if name in _WITH_ARGUMENT:
            if end >= len(sql) or sql[end] != "(":
                raise ValueError(f"$__{name} needs its column in parentheses")
            args, end = _macro_args(sql, end)
            args = [a.strip() for a in args]
            if len(args) != 1:
                raise ValueError(f"$__{name} takes 1 argument, got {args!r}")
        elif end < len(sql) and sql[end] == "(":
            # The plugin accepts an empty argument list: $__fromTime().
            args, end = _macro_args(sql, end)
            if [a.strip() for a in args] != [""]:
                raise ValueError(f"$__{name} takes no argument, got {args!r}")
        out.append(macros[name](args))
        pos = end
    out.append(sql[pos:])
    return "".join(out)


def _outside_string_literals(sql: str) -> str:
    return re.sub(r"'(?:[^'\\]|\\.|'')*'", "''", sql)


def expand(sql: str, variables: Mapping[str, Variable], time_range: TimeRange) -> str:
    """The SQL the plugin sends to ClickHouse for this query, selection and time range."""
    expanded = backend_macros(
        template_variables(conditional_all(sql, variables), variables), time_range
    )
    leftover = _LEFTOVER.search(_outside_string_literals(expanded))
    if leftover is not None:
        raise ValueError(f"unexpanded variable or macro near {expanded[leftover.start():][:40]!r}")
    return expanded
