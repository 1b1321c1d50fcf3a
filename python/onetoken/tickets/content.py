"""What an attachment is, decided from its bytes, and the name it is shown and served under.

The client's claimed type and file name never decide anything: a PNG uploaded as
`report.pdf` is a PNG (`report.png`, `image/png`), and bytes that are none of the kinds
below are refused, whatever they are called. Text must decode as UTF-8 and must not be
markup, so nothing a browser would render as a page is ever stored as text.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import quote


@dataclass(frozen=True, slots=True)
class Kind:
    content_type: str
    extension: str


PNG = Kind("image/png", "png")
JPEG = Kind("image/jpeg", "jpg")
GIF = Kind("image/gif", "gif")
WEBP = Kind("image/webp", "webp")
PDF = Kind("application/pdf", "pdf")
TEXT = Kind("text/plain; charset=utf-8", "txt")
KINDS = (PNG, JPEG, GIF, WEBP, PDF, TEXT)

# Control characters other than tab, line feed, form feed and carriage return: binary data
# that happens to be valid UTF-8 is not text.
_BINARY_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
# Openings a browser (or an XML reader) would treat as a document rather than text.
_MARKUP_OPENINGS = (
    "<!doctype", "<html", "<head", "<body", "<script", "<svg", "<?xml", "<iframe", "<!--",
    "<meta", "<object", "<embed", "<style", "<img", "<a ", "<div", "<form",
)


def detect(data: bytes) -> Kind | None:
    """The kind of `data`, or None when it is not one we accept."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if data.startswith(b"\xff\xd8\xff"):
        return JPEG
    if data.startswith((b"GIF87a", b"GIF89a")):
        return GIF
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return WEBP
    if data.startswith(b"%PDF-"):
        return PDF
    return TEXT if _is_plain_text(data) else None


def _is_plain_text(data: bytes) -> bool:
    if not data:
        return False
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return False
    if _BINARY_CONTROLS.search(text):
        return False
    opening = text.lstrip()[:16].lower()
    return not opening.startswith(_MARKUP_OPENINGS)


_UNSAFE_NAME_CHARS = re.compile(r"[^\w .()+-]", re.UNICODE)
_MAX_STEM = 100


def safe_filename(claimed: str, kind: Kind) -> str:
    """A display name: the claimed name's last path segment, reduced to letters, digits and
    a few punctuation marks, with the extension of the detected kind."""
    name = unicodedata.normalize("NFC", claimed or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    stem = _UNSAFE_NAME_CHARS.sub("_", stem).strip(" .")[:_MAX_STEM].strip(" .")
    return f"{stem or 'attachment'}.{kind.extension}"


def content_disposition(filename: str) -> str:
    """`attachment` with an ASCII fallback name and the UTF-8 one (RFC 6266, 5987)."""
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"
