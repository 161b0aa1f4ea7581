"""Partner-key encryption (SPEC §6): AES-256-GCM in the {iv, data, authTag} shape."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from experiments import crypto, services
from experiments.models import VariantVersion
from tests.factories import make_experiment, upstream_config

NODE = shutil.which("node") or "/usr/bin/node"
GCM_JS = Path(__file__).parent / "node" / "gcm.js"


def _node(mode: str, stdin: str, key_b64: str) -> str:
    env = {**os.environ, "BYOK_ENCRYPTION_KEY": key_b64}
    completed = subprocess.run(
        [NODE, str(GCM_JS), mode],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=30,
    )
    return completed.stdout


# --- envelope ------------------------------------------------------------------


def test_round_trip(canary_key):
    assert crypto.decrypt_api_key(crypto.encrypt_api_key(canary_key)) == canary_key


def test_round_trip_of_non_ascii_text():
    assert crypto.decrypt_api_key(crypto.encrypt_api_key("clé-ключ-鍵")) == "clé-ключ-鍵"


def test_envelope_shape_is_iv_data_auth_tag_in_base64(canary_key):
    envelope = crypto.encrypt_api_key(canary_key)
    assert set(envelope) == {"iv", "data", "authTag"}
    decoded = {name: base64.b64decode(value, validate=True) for name, value in envelope.items()}
    assert len(decoded["iv"]) == 12
    assert len(decoded["authTag"]) == 16
    assert len(decoded["data"]) == len(canary_key.encode())


def test_envelope_does_not_contain_the_plaintext(canary_key):
    assert canary_key not in json.dumps(crypto.encrypt_api_key(canary_key))


def test_every_encryption_uses_a_fresh_iv(canary_key):
    first, second = crypto.encrypt_api_key(canary_key), crypto.encrypt_api_key(canary_key)
    assert first["iv"] != second["iv"]
    assert first["data"] != second["data"]


def test_generated_key_is_base64_of_32_bytes():
    assert len(base64.b64decode(crypto.generate_key(), validate=True)) == 32


# --- refusing bad ciphertext -----------------------------------------------------


def _flip_first_byte(value: str) -> str:
    raw = bytearray(base64.b64decode(value))
    raw[0] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("field", ["data", "iv", "authTag"])
def test_tampered_envelope_is_a_decryption_error_without_the_ciphertext(field, canary_key):
    envelope = crypto.encrypt_api_key(canary_key)
    tampered = {**envelope, field: _flip_first_byte(envelope[field])}
    with pytest.raises(crypto.DecryptionError) as refusal:
        crypto.decrypt_api_key(tampered)
    message = str(refusal.value)
    assert all(value not in message for value in (*envelope.values(), *tampered.values()))
    assert canary_key not in message


@pytest.mark.parametrize(
    "envelope",
    [
        {},
        {"iv": "AAAA", "data": "AAAA"},
        {"iv": "not base64!", "data": "AAAA", "authTag": "AAAA"},
        {"iv": 12, "data": None, "authTag": []},
        "not-an-object",
    ],
    ids=["empty", "no-tag", "bad-base64", "wrong-types", "string"],
)
def test_malformed_envelope_is_a_decryption_error(envelope):
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt_api_key(envelope)


def test_decrypting_with_another_key_is_a_decryption_error(canary_key):
    envelope = crypto.encrypt_api_key(canary_key)
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt_api_key(envelope, key_b64=crypto.generate_key())


# --- the server key --------------------------------------------------------------

BAD_SERVER_KEYS = pytest.mark.parametrize(
    ("server_key", "reason"),
    [
        ("", "is not set"),
        ("this is not base64!", "not valid base64"),
        (base64.b64encode(b"k" * 16).decode(), "must decode to 32 bytes, not 16"),
    ],
    ids=["missing", "not-base64", "wrong-length"],
)


@BAD_SERVER_KEYS
def test_bad_server_key_refuses_encryption_with_a_clear_message(server_key, reason, settings):
    settings.BYOK_ENCRYPTION_KEY = server_key
    with pytest.raises(crypto.EncryptionKeyError, match=reason) as refusal:
        crypto.encrypt_api_key("sk-anything")
    assert "BYOK_ENCRYPTION_KEY" in str(refusal.value)
    if server_key:
        assert server_key not in str(refusal.value)


@pytest.mark.django_db
@BAD_SERVER_KEYS
@pytest.mark.parametrize("with_new_key", [True, False], ids=["new-key", "reused-key"])
def test_bad_server_key_refuses_hot_swap_and_writes_nothing(
    server_key, reason, with_new_key, settings
):
    variant = make_experiment().variants.first()
    versions_before = VariantVersion.objects.count()
    settings.BYOK_ENCRYPTION_KEY = server_key
    with pytest.raises(services.EncryptionUnavailable, match=reason):
        services.hot_swap(
            variant=variant,
            upstream=upstream_config(internal_id="rc-2"),
            api_key="sk-new" if with_new_key else None,
        )
    assert VariantVersion.objects.count() == versions_before


@pytest.mark.django_db
@BAD_SERVER_KEYS
def test_bad_server_key_refuses_key_rotation_and_writes_nothing(server_key, reason, settings):
    variant = make_experiment().variants.first()
    versions_before = VariantVersion.objects.count()
    settings.BYOK_ENCRYPTION_KEY = server_key
    with pytest.raises(services.EncryptionUnavailable, match=reason):
        services.rotate_key(variant=variant, api_key="sk-new")
    assert VariantVersion.objects.count() == versions_before


# --- interop with an independent implementation ------------------------------------


def test_envelope_made_by_node_decrypts_in_python(canary_key):
    key_b64 = crypto.generate_key()
    envelope = json.loads(_node("encrypt", canary_key, key_b64))
    assert set(envelope) == {"iv", "data", "authTag"}
    assert crypto.decrypt_api_key(envelope, key_b64=key_b64) == canary_key


def test_envelope_made_by_python_decrypts_in_node(canary_key):
    key_b64 = crypto.generate_key()
    envelope = crypto.encrypt_api_key(canary_key, key_b64=key_b64)
    assert _node("decrypt", json.dumps(envelope), key_b64) == canary_key


def test_node_refuses_an_envelope_tampered_in_python(canary_key):
    # Guards the interop tests themselves: Node really authenticates the tag.
    key_b64 = crypto.generate_key()
    envelope = crypto.encrypt_api_key(canary_key, key_b64=key_b64)
    tampered = {**envelope, "authTag": _flip_first_byte(envelope["authTag"])}
    with pytest.raises(subprocess.CalledProcessError):
        _node("decrypt", json.dumps(tampered), key_b64)
