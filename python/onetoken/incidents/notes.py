"""What a handling note may hold: a short staff remark, never content.

A note is metadata about the handling ("rotated the key, customer told by phone"), not a
place for what a request carried. The rules make pasting content fail rather than rely on
good intentions:

- at most NOTE_MAX_CHARS characters (the column is no wider);
- one line of printable characters: no newlines or other control characters, so a
  multi-line body, a stack trace or a log excerpt does not fit;
- none of the characters payloads are written in (JSON and markup brackets, backticks);
- no run of more than MAX_WORD characters without a space: an API key (47), a session
  token, a hash or an encoded blob is refused.

A refusal names the rule, never the note.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

from onetoken.incidents.models import NOTE_MAX_CHARS
from onetoken.kit.errors import Unprocessable

MAX_WORD: Final = 40
PAYLOAD_CHARS: Final = frozenset("{}[]<>`")
_WORD = re.compile(r"\S+")


class NoteRefused(Unprocessable, code="note_refused"): ...


def check(text: str) -> str:
    """The note, stripped, or NoteRefused with a fixed message."""
    note = text.strip()
    if not note:
        raise NoteRefused("A note cannot be empty.", param="text")
    if len(note) > NOTE_MAX_CHARS:
        raise NoteRefused(f"A note holds at most {NOTE_MAX_CHARS} characters.", param="text")
    if any(unicodedata.category(ch)[0] == "C" for ch in note):
        raise NoteRefused(
            "A note is one line of printable text (no control characters).", param="text"
        )
    if any(ch in PAYLOAD_CHARS for ch in note):
        raise NoteRefused(
            "A note holds no brackets or backticks: notes are remarks, never payloads.",
            param="text",
        )
    if any(len(word) > MAX_WORD for word in _WORD.findall(note)):
        raise NoteRefused(
            f"A note holds no unbroken run over {MAX_WORD} characters (keys, tokens, "
            "encoded data).",
            param="text",
        )
    return note
