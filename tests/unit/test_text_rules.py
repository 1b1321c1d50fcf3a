"""The non-blank rule of names reads the same in the OpenAPI document as in validation."""

from __future__ import annotations

import re

from onetoken.kit.text import NOT_BLANK

# ECMAScript's `\s` (what JSON Schema validators and schemathesis use for `pattern`).
ECMA_SPACE = set("\t\n\v\f\r \u00a0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff") | {
    chr(c) for c in range(0x2000, 0x200B)
}


def test_every_character_python_strips_is_blank_under_the_document_pattern() -> None:
    # Read as ECMAScript reads it: `\s` is ECMA_SPACE, the rest of the class is literal.
    ecma = re.compile(NOT_BLANK.replace(r"\s", "".join(sorted(ECMA_SPACE)).replace("\\", "")))
    stripped = [chr(c) for c in range(0x110000) if chr(c).strip() == ""]
    assert "\x85" in stripped and "\x1c" in stripped
    assert [c for c in stripped if ecma.search(c)] == []
    assert ecma.search("a") and re.search(NOT_BLANK, "a")
