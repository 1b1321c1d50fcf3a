"""Text rules shared by the API schemas."""

from __future__ import annotations

#: At least one character that survives `str.strip()`. Python strips more than the
#: regex `\s` of the OpenAPI document (U+0085 and U+001C..U+001F too), so those are
#: named here: a name the document calls valid is never refused once stripped.
NOT_BLANK = r"[^\s\x1c-\x1f\x85]"
