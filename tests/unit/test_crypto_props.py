"""Properties of API key parsing and key hashing on generated input: every key of the
format is accepted, every one-character change and every other string is refused without
an exception, and the Python and Rust key hashes agree on any text."""

from __future__ import annotations

import zlib

from hypothesis import given
from hypothesis import strategies as st

from onetoken import _core
from onetoken.kit import crypto

random_parts = st.text(
    alphabet=crypto.BASE62, min_size=crypto.KEY_RANDOM_LEN, max_size=crypto.KEY_RANDOM_LEN
)


def _key(random_part: str) -> str:
    n = zlib.crc32(random_part.encode()) % 62**crypto.KEY_CHECKSUM_LEN
    check = ""
    for _ in range(crypto.KEY_CHECKSUM_LEN):
        n, r = divmod(n, 62)
        check = crypto.BASE62[r] + check
    return crypto.KEY_PREFIX + random_part + check


@given(random_parts)
def test_every_key_of_the_format_is_accepted_and_shown_briefly(random_part: str) -> None:
    key = _key(random_part)
    assert crypto.is_well_formed_api_key(key)
    shown = crypto.display_id(key)
    assert shown == key[:7] + "…" + key[-4:]
    assert random_part[4:-4] not in shown


@given(random_parts, st.integers(min_value=0, max_value=crypto.KEY_LEN - 1), st.characters())
def test_a_one_character_change_is_refused(random_part: str, pos: int, char: str) -> None:
    key = _key(random_part)
    changed = key[:pos] + char + key[pos + 1 :]
    if changed != key:
        assert not crypto.is_well_formed_api_key(changed)


@given(st.text())
def test_arbitrary_text_is_refused_unless_it_has_the_format(text: str) -> None:
    ok = crypto.is_well_formed_api_key(text)
    assert isinstance(ok, bool)
    if ok:
        assert text == _key(text[3:-4])


@given(random_parts, st.text(max_size=3))
def test_a_key_with_anything_around_it_is_refused(random_part: str, extra: str) -> None:
    key = _key(random_part)
    for text in (extra + key, key + extra, key + "\n"):
        if text != key:
            assert not crypto.is_well_formed_api_key(text)


@given(st.binary(max_size=64), st.text())
def test_python_and_rust_key_hashes_agree(secret: bytes, text: str) -> None:
    assert _core.hash_key(secret, text) == crypto.keyed_hash(secret, text)
