from __future__ import annotations

import hashlib
import hmac

import pytest

from onetoken import _core
from onetoken.kit import crypto
from tests.unit.conftest import contract


def test_generated_key_format_and_checksum() -> None:
    key = crypto.generate_api_key()
    assert key.startswith("ot-")
    assert len(key) == crypto.KEY_LEN == 47
    assert all(c in crypto.BASE62 for c in key[3:])
    assert crypto.is_well_formed_api_key(key)


def test_keys_are_unique() -> None:
    assert len({crypto.generate_api_key() for _ in range(200)}) == 200


def test_single_character_typo_is_rejected_offline() -> None:
    key = crypto.generate_api_key()
    for pos in range(3, len(key)):
        replacement = "A" if key[pos] != "A" else "B"
        typo = key[:pos] + replacement + key[pos + 1 :]
        assert not crypto.is_well_formed_api_key(typo), pos


@pytest.mark.parametrize("bad", ["", "ot-", "sk-" + "a" * 44, "ot-" + "a" * 43, "ot-" + "!" * 44])
def test_malformed_keys_are_rejected(bad: str) -> None:
    assert not crypto.is_well_formed_api_key(bad)


def test_display_id_shows_prefix_and_last_four_only() -> None:
    key = crypto.generate_api_key()
    display = crypto.display_id(key)
    assert display == key[:7] + "…" + key[-4:]
    assert key[7:-4] not in display


@pytest.mark.parametrize("vector", contract("key_hash_vectors.json")["vectors"])
def test_keyed_hash_matches_contract_vectors(vector: dict[str, str]) -> None:
    secret = bytes.fromhex(vector["secret_hex"])
    assert crypto.keyed_hash(secret, vector["key"]) == vector["hash_hex"]
    expected = hmac.new(secret, vector["key"].encode(), hashlib.sha256).hexdigest()
    assert expected == vector["hash_hex"]


@pytest.mark.parametrize("vector", contract("key_hash_vectors.json")["vectors"])
def test_core_hash_key_matches_contract_vectors(vector: dict[str, str]) -> None:
    secret = bytes.fromhex(vector["secret_hex"])
    assert _core.hash_key(secret, vector["key"]) == vector["hash_hex"]


def test_core_hash_key_matches_python_for_generated_keys() -> None:
    s = crypto.Secrets.from_master(b"x" * 40)
    key = crypto.generate_api_key()
    assert _core.hash_key(s.key_hash, key) == s.hash_api_key(key)


def test_derived_secrets_are_independent_and_deterministic() -> None:
    a = crypto.Secrets.from_master(b"m" * 40)
    b = crypto.Secrets.from_master(b"m" * 40)
    assert a.key_hash == b.key_hash
    assert a.key_hash != a.session
    assert a.key_hash == hmac.new(b"m" * 40, b"onetoken/key-hash/v1", hashlib.sha256).digest()
    assert crypto.Secrets.from_master(b"n" * 40).key_hash != a.key_hash
    assert "m" * 10 not in repr(a)


def test_password_hashing() -> None:
    h = crypto.hash_password("s3cret-password")
    assert h.startswith("$argon2")
    assert "s3cret-password" not in h
    assert crypto.verify_password(h, "s3cret-password")
    assert not crypto.verify_password(h, "wrong")
    assert not crypto.verify_password(None, "s3cret-password")
    assert not crypto.verify_password("not-a-hash", "x")


def test_encryption_round_trip_and_wrong_key() -> None:
    a = crypto.Secrets.from_master(b"a" * 40)
    token = a.encrypt("sk-upstream-credential")
    assert "sk-upstream-credential" not in token
    assert a.decrypt(token) == "sk-upstream-credential"
    with pytest.raises(crypto.DecryptionError):
        crypto.Secrets.from_master(b"b" * 40).decrypt(token)
