"""Tests for celery_pii._crypto."""

from __future__ import annotations

import os
import zlib

import pytest

from celery_pii._crypto import Algorithm, DataKey, compress, decompress, new_key_material
from celery_pii.exceptions import DecryptionFailed

# RFC 8439 §2.8.2 (ChaCha20-Poly1305) and the GCM specification's test case 16
# (AES-256-GCM with associated data): independent known answers.
VECTORS = [
    (
        Algorithm.CHACHA20_POLY1305,
        bytes(range(0x80, 0xA0)),
        "070000004041424344454647",
        "50515253c0c1c2c3c4c5c6c7",
        (
            b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
            b"for the future, sunscreen would be it."
        ).hex(),
        (
            "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69da92728b"
            "1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
            "3ff4def08e4b7a9de576d26586cec64b61161ae10b594f09e26a7e902ecbd0600691"
        ),
    ),
    (
        Algorithm.AES_256_GCM,
        bytes.fromhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308"),
        "cafebabefacedbaddecaf888",
        "feedfacedeadbeeffeedfacedeadbeefabaddad2",
        (
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525"
            "b16aedf5aa0de657ba637b39"
        ),
        (
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838"
            "c5f61e6393ba7a0abcc9f66276fc6ece0f4e1768cddf8853bb2d551b"
        ),
    ),
]


class TestDataKey:
    """Tests for DataKey."""

    @pytest.mark.parametrize(("algorithm", "key", "nonce", "ad", "plaintext", "expected"), VECTORS)
    def test_known_answers(self, algorithm, key, nonce, ad, plaintext, expected):
        """Sealing with a fixed nonce reproduces the published vector, and it opens."""
        data_key = DataKey("kat", 1, algorithm, key)
        sealed = data_key._seal_with_nonce(bytes.fromhex(nonce), bytes.fromhex(plaintext), bytes.fromhex(ad))
        assert sealed[12:].hex() == expected
        assert data_key.open(sealed, bytes.fromhex(ad)) == bytes.fromhex(plaintext)

    @pytest.mark.parametrize("algorithm", list(Algorithm))
    def test_round_trip_with_fresh_nonces(self, algorithm):
        """Every seal uses a new nonce and opens back to the plaintext."""
        key = DataKey("k", 1, algorithm, new_key_material())
        first, second = key.seal(b"secret", b"ad"), key.seal(b"secret", b"ad")
        assert first[:12] != second[:12]
        assert key.open(first, b"ad") == key.open(second, b"ad") == b"secret"

    @pytest.mark.parametrize("algorithm", list(Algorithm))
    def test_wrong_key_or_ad_fails_with_one_message(self, algorithm):
        """A wrong key, wrong associated data or short input all raise DecryptionFailed."""
        key = DataKey("k", 1, algorithm, new_key_material())
        other = DataKey("k", 1, algorithm, new_key_material())
        sealed = key.seal(b"secret", b"ad")
        errors = []
        for attempt in (
            lambda: other.open(sealed, b"ad"),
            lambda: key.open(sealed, b"xx"),
            lambda: key.open(sealed[:20], b"ad"),
        ):
            with pytest.raises(DecryptionFailed) as info:
                attempt()
            errors.append(str(info.value))
        assert set(errors) == {DecryptionFailed.MESSAGE}

    def test_repr_shows_no_material(self):
        """The repr names id, version and algorithm only."""
        material = bytes(range(32))
        key = DataKey("orders", 3, Algorithm.AES_256_GCM, material)
        assert repr(key) == "<DataKey 'orders' v3 aes-256-gcm>"
        assert material.hex() not in repr(key)

    def test_bad_material_length(self):
        """A key that is not 32 bytes is refused without echoing it."""
        with pytest.raises(ValueError, match="32 bytes") as info:
            DataKey("k", 1, Algorithm.AES_256_GCM, b"x" * 16)
        assert "xxxx" not in str(info.value)


class TestAlgorithm:
    """Tests for Algorithm codes."""

    def test_codes_round_trip(self):
        """Each algorithm's envelope byte maps back to it."""
        for algorithm in Algorithm:
            assert Algorithm.from_code(algorithm.code) is algorithm

    def test_unknown_code(self):
        """An unknown algorithm byte is a decryption failure, not a KeyError."""
        with pytest.raises(DecryptionFailed):
            Algorithm.from_code(99)


class TestCompression:
    """Tests for compress/decompress."""

    def test_round_trip(self):
        """Compressed data inflates back."""
        data = b"ann@example.com " * 200
        packed = compress(data)
        assert len(packed) < len(data)
        assert decompress(packed, max_size=len(data)) == data

    def test_bomb_is_refused(self):
        """Inflating past max_size fails instead of allocating."""
        bomb = zlib.compress(b"\0" * 10_000_000)
        with pytest.raises(DecryptionFailed):
            decompress(bomb, max_size=1_000_000)

    def test_garbage_and_truncation(self):
        """A corrupt or truncated stream fails to open."""
        packed = compress(os.urandom(100) * 5)
        for bad in (b"not zlib", packed[:-3]):
            with pytest.raises(DecryptionFailed):
                decompress(bad, max_size=10_000)
