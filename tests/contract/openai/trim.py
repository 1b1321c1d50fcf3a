"""Rebuild openapi-schemas.json from a checkout of github.com/openai/openai-openapi:

    python tests/contract/openai/trim.py path/to/openai-openapi/openapi.json

Keeps only the component schemas the gateway's replies are checked against and those
they reference, verbatim, so the fixture stays small enough to review and diff.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOTS = [
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateEmbeddingResponse",
    "ListModelsResponse",
    "ErrorResponse",
    "Response",
    "ResponseStreamEvent",
]
PREFIX = "#/components/schemas/"


def _refs(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(PREFIX):
                found.add(value.removeprefix(PREFIX))
            else:
                _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def trim(document: dict[str, Any]) -> dict[str, Any]:
    schemas = document["components"]["schemas"]
    kept: set[str] = set()
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in kept:
            continue
        kept.add(name)
        found: set[str] = set()
        _refs(schemas[name], found)
        todo.extend(found - kept)
    return {
        "openapi": document["openapi"],
        "info": document["info"],
        "components": {"schemas": {name: schemas[name] for name in sorted(kept)}},
    }


if __name__ == "__main__":
    source = json.loads(Path(sys.argv[1]).read_text())
    out = Path(__file__).with_name("openapi-schemas.json")
    out.write_text(json.dumps(trim(source), indent=1, sort_keys=False) + "\n")
