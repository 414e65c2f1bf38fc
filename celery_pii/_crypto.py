"""Authenticated encryption: the only module that imports ``cryptography.hazmat``.

Callers never choose a nonce, a mode or a key size: an :class:`Algorithm` and
a :class:`DataKey` are all they hold.  Nonces are 96 random bits from
``os.urandom`` per operation; keys rotate by message count long before random
nonces could collide (see ``pii_rotation_max_messages`` and docs/security.md).
"""

from __future__ import annotations

import enum
import os
import zlib
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .exceptions import DecryptionFailed

__all__ = [
    "KEY_SIZE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "Algorithm",
    "DataKey",
    "compress",
    "decompress",
    "new_key_material",
]

KEY_SIZE: Final = 32
NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16

# zlib level 1: on PII-sized JSON it compresses within a few percent of
# level 6 at under half the cost (benchmarks/compression.py measures it).
_COMPRESSION_LEVEL: Final = 1
# Ciphertexts shorter than this are sliced (copied) rather than viewed when opened.
_COPY_BELOW: Final = 4096


class Algorithm(enum.Enum):
    """AEAD algorithms for data keys; the value is the setting's spelling."""

    AES_256_GCM = "aes-256-gcm"
    CHACHA20_POLY1305 = "chacha20-poly1305"

    @property
    def code(self) -> int:
        """The byte that names this algorithm in an envelope."""
        return _CODES[self]

    @classmethod
    def from_code(cls, code: int) -> Algorithm:
        """The algorithm an envelope byte names; ``DecryptionFailed`` if none."""
        try:
            return _BY_CODE[code]
        except KeyError:
            raise DecryptionFailed from None


_CODES: Final = {Algorithm.AES_256_GCM: 1, Algorithm.CHACHA20_POLY1305: 2}
_BY_CODE: Final = {code: alg for alg, code in _CODES.items()}
_CIPHERS: Final[dict[Algorithm, type[AESGCM | ChaCha20Poly1305]]] = {
    Algorithm.AES_256_GCM: AESGCM,
    Algorithm.CHACHA20_POLY1305: ChaCha20Poly1305,
}


def new_key_material() -> bytes:
    """32 fresh random bytes for a data key."""
    return os.urandom(KEY_SIZE)


class DataKey:
    """One version of a data key, ready to seal and open.

    The cipher object is built once here: building an ``AESGCM`` costs more
    than an encryption, so the key cache holds these, not raw bytes.  The
    repr names the key id and version only, never material.
    """

    __slots__ = ("_cipher", "algorithm", "expires_at", "identity", "key_id", "usage_key", "version")

    def __init__(
        self,
        key_id: str,
        version: int,
        algorithm: Algorithm,
        material: bytes,
        *,
        expires_at: float | None = None,
    ) -> None:
        if len(material) != KEY_SIZE:
            msg = f"data key {key_id!r} v{version}: material must be {KEY_SIZE} bytes"
            raise ValueError(msg)
        self.key_id = key_id
        self.version = version
        self.algorithm = algorithm
        #: POSIX time of the retention deadline (the key's ``expires_at``), if any.
        self.expires_at = expires_at
        self.usage_key = (key_id, version)
        #: What names this key version anywhere in the process (two key stores may share ids).
        self.identity = (key_id, version, algorithm.value)
        self._cipher: AESGCM | ChaCha20Poly1305 = _CIPHERS[algorithm](material)

    def __repr__(self) -> str:
        return f"<DataKey {self.key_id!r} v{self.version} {self.algorithm.value}>"

    def seal(self, plaintext: bytes, associated_data: bytes) -> bytes:
        """Encrypt: returns ``nonce || ciphertext || tag``."""
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._cipher.encrypt(nonce, plaintext, associated_data)

    def open(self, sealed: bytes | memoryview, associated_data: bytes, start: int = 0) -> bytes:
        """Decrypt what :meth:`seal` returned (from offset ``start`` of ``sealed``).

        Raises:
            DecryptionFailed: any tampering, truncation or wrong key/AD.
        """
        if len(sealed) - start < NONCE_SIZE + TAG_SIZE:
            raise DecryptionFailed
        after_nonce = start + NONCE_SIZE
        # A view saves copying a large ciphertext; a short one is copied faster than viewed.
        body = sealed[after_nonce:] if len(sealed) < _COPY_BELOW else memoryview(sealed)[after_nonce:]
        try:
            return self._cipher.decrypt(sealed[start:after_nonce], body, associated_data)
        except InvalidTag:
            raise DecryptionFailed from None

    def _seal_with_nonce(self, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
        """Deterministic sealing, for known-answer tests only."""
        return nonce + self._cipher.encrypt(nonce, plaintext, associated_data)


def compress(data: bytes) -> bytes:
    """Compress sealed plaintext (before encryption)."""
    return zlib.compress(data, _COMPRESSION_LEVEL)


def decompress(data: bytes, *, max_size: int) -> bytes:
    """Inflate at most ``max_size`` bytes; a bomb or bad stream fails to open.

    Raises:
        DecryptionFailed: the stream is corrupt or inflates beyond ``max_size``.
    """
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, max_size)
    except zlib.error:
        raise DecryptionFailed from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise DecryptionFailed
    return out
