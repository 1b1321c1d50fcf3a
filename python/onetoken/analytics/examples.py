"""The example queries of docs/analytics.md, kept once in examples.sql beside this module:
the page shows them and a test runs each against chDB with data."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Final

_FILE: Final = "examples.sql"
_HEADER = re.compile(r"^-- (name|columns|needs): (.+)$")


class ExampleError(ValueError):
    """examples.sql holds a block the page cannot show or the test cannot run."""


@dataclass(frozen=True)
class Example:
    name: str
    #: What it answers, in prose (the block's other comment lines, joined).
    description: str
    #: The names of the columns it returns, in order.
    columns: tuple[str, ...]
    #: Tables (database.table) it reads beyond call_log and security_log; a database
    #: without them cannot run it.
    needs: tuple[str, ...]
    #: The statement, without its final semicolon.
    sql: str


def _split(text: str, line_no: int) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    if not all(re.fullmatch(r"[a-z_][a-z0-9_.]*", n) for n in names):
        raise ExampleError(f"{_FILE} line {line_no}: expected names separated by commas")
    return names


def parse(text: str) -> list[Example]:
    """The `-- name:` blocks of an examples file, in order (the lines before the first one
    describe the file)."""
    blocks: list[tuple[int, list[str]]] = []
    for no, line in enumerate(text.splitlines(), 1):
        if line.startswith("-- name: "):
            blocks.append((no, []))
        if blocks:
            blocks[-1][1].append(line)
    examples: list[Example] = []
    for start, lines in blocks:
        fields: dict[str, str] = {}
        prose: list[str] = []
        body: list[str] = []
        for line in lines:
            if body or not line.startswith("--"):
                body.append(line)
            elif header := _HEADER.match(line):
                fields[header[1]] = header[2].strip()
            else:
                prose.append(line.removeprefix("--").strip())
        sql = "\n".join(body).strip()
        if not sql.endswith(";") or ";" in sql[:-1]:
            raise ExampleError(f"{_FILE} line {start}: one statement ending in ';' per block")
        if "columns" not in fields or not prose:
            raise ExampleError(f"{_FILE} line {start}: a block needs `-- columns:` and prose")
        examples.append(Example(
            name=fields["name"],
            description=" ".join(prose),
            columns=_split(fields["columns"], start),
            needs=_split(fields["needs"], start) if "needs" in fields else (),
            sql=sql[:-1].rstrip(),
        ))
    names = [e.name for e in examples]
    if len(set(names)) != len(names):
        raise ExampleError(f"{_FILE}: two blocks share a name")
    return examples


def load_examples() -> list[Example]:
    """The examples shipped with the package."""
    return parse(resources.files("onetoken.analytics").joinpath(_FILE).read_text("utf-8"))
