"""AES-256-GCM for partner keys, in the ``{iv, data, authTag}`` shape (SPEC §6).

``iv`` is 12 random bytes, ``data`` the ciphertext and ``authTag`` the 16-byte
GCM tag, each base64; Node's ``crypto`` produces and reads the same shape.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings

IV_BYTES = 12
TAG_BYTES = 16


class EncryptionKeyError(Exception):
    """The server's encryption key is missing or malformed."""


class DecryptionError(Exception):
    """A stored ciphertext cannot be decrypted with the configured key."""


def generate_key() -> str:
    return base64.b64encode(os.urandom(32)).decode("ascii")


def _key_bytes(key_b64: str | None = None) -> bytes:
    raw = settings.BYOK_ENCRYPTION_KEY if key_b64 is None else key_b64
    if not raw:
        raise EncryptionKeyError(
            "BYOK_ENCRYPTION_KEY is not set; generate one with `manage.py generate_encryption_key`."
        )
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise EncryptionKeyError("BYOK_ENCRYPTION_KEY is not valid base64.") from None
    if len(key) != 32:
        raise EncryptionKeyError(f"BYOK_ENCRYPTION_KEY must decode to 32 bytes, not {len(key)}.")
    return key


def check_key() -> None:
    """Raise EncryptionKeyError unless a usable key is configured."""
    _key_bytes()


def encrypt_api_key(plaintext: str, *, key_b64: str | None = None) -> dict[str, str]:
    key = _key_bytes(key_b64)
    iv = os.urandom(IV_BYTES)
    sealed = AESGCM(key).encrypt(iv, plaintext.encode("utf-8"), None)
    return {
        "iv": base64.b64encode(iv).decode("ascii"),
        "data": base64.b64encode(sealed[:-TAG_BYTES]).decode("ascii"),
        "authTag": base64.b64encode(sealed[-TAG_BYTES:]).decode("ascii"),
    }


def decrypt_api_key(envelope: dict, *, key_b64: str | None = None) -> str:
    key = _key_bytes(key_b64)
    try:
        iv = base64.b64decode(envelope["iv"], validate=True)
        data = base64.b64decode(envelope["data"], validate=True)
        tag = base64.b64decode(envelope["authTag"], validate=True)
        if len(iv) != IV_BYTES or len(tag) != TAG_BYTES:
            raise ValueError("bad lengths")
        return AESGCM(key).decrypt(iv, data + tag, None).decode("utf-8")
    except (KeyError, TypeError, ValueError, binascii.Error, InvalidTag, UnicodeDecodeError):
        # Never echo the envelope: it is ciphertext.
        raise DecryptionError(
            "The stored partner key cannot be decrypted with the configured key."
        ) from None
