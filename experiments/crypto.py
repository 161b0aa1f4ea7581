"""AES-256-GCM for partner keys, in the ``{iv, data, authTag}`` shape (SPEC §6).

``iv`` is 12 random bytes, ``data`` the ciphertext and ``authTag`` the 16-byte
GCM tag, each base64; Node's ``crypto`` produces and reads the same shape.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings

IV_BYTES = 12
TAG_BYTES = 16
FINGERPRINT_LABEL = b"model-experiments/encryption-key-fingerprint/v1"
FINGERPRINT_CHARS = 16


class EncryptionKeyError(Exception):
    """The server's encryption key is missing or malformed."""


class DecryptionError(Exception):
    """A stored ciphertext cannot be decrypted with the configured key."""


def generate_key() -> str:
    return base64.b64encode(os.urandom(32)).decode("ascii")


#: Said with every "no usable key" refusal: the advice that caused unexplained 503s.
NEW_KEY_WARNING = (
    "Every process (gateway, admin, manage.py) must use the key the running gateway uses, "
    "read from the same place. Generate a new key (`manage.py generate_encryption_key`) only "
    "for a new installation: it cannot decrypt the partner keys already stored."
)


def _key_bytes(key_b64: str | None = None) -> bytes:
    if key_b64 is None:
        raw, source = settings.BYOK_ENCRYPTION_KEY, settings.BYOK_ENCRYPTION_KEY_SOURCE
        if settings.BYOK_ENCRYPTION_KEY_PROBLEM:
            raise EncryptionKeyError(f"{settings.BYOK_ENCRYPTION_KEY_PROBLEM} {NEW_KEY_WARNING}")
    else:
        raw, source = key_b64, "the given key"
    if not raw:
        raise EncryptionKeyError(
            f"No encryption key: {source} is not set (nor BYOK_ENCRYPTION_KEY_FILE, and "
            f"{settings.DEFAULT_ENCRYPTION_KEY_FILE} does not exist). {NEW_KEY_WARNING}"
        )
    # The key itself is never part of a message.
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise EncryptionKeyError(
            f"The encryption key from {source} is not valid base64. {NEW_KEY_WARNING}"
        ) from None
    if len(key) != 32:
        raise EncryptionKeyError(
            f"The encryption key from {source} must decode to 32 bytes, not {len(key)}. "
            f"{NEW_KEY_WARNING}"
        )
    return key


def check_key() -> None:
    """Raise EncryptionKeyError unless a usable key is configured."""
    _key_bytes()


def key_fingerprint(key_b64: str | None = None) -> str:
    """A non-secret name of an encryption key, to tell keys apart in rows, pages and logs.

    The first 8 bytes (hex) of HMAC-SHA256 keyed by the encryption key over a fixed
    label. HMAC is a pseudo-random function of its key, so the value says nothing
    about the key beyond letting someone test a guess of all 256 bits; the label
    keeps it from equalling any other system's hash of the same key.
    """
    digest = hmac.new(_key_bytes(key_b64), FINGERPRINT_LABEL, hashlib.sha256).hexdigest()
    return digest[:FINGERPRINT_CHARS]


def can_decrypt(envelope: dict, *, key_b64: str | None = None) -> bool:
    """Whether the configured key opens this envelope (the plaintext is dropped at once)."""
    try:
        decrypt_api_key(envelope, key_b64=key_b64)
    except DecryptionError:
        return False
    return True


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
