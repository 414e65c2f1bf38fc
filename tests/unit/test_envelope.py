"""Tests for celery_pii._envelope."""

from __future__ import annotations

import base64
import math
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_pii import _envelope, _json
from celery_pii._crypto import Algorithm, DataKey
from celery_pii._envelope import Kind, parse, seal
from celery_pii.exceptions import DecryptionFailed, EncryptionFailed

KEY = DataKey("orders", 2, Algorithm.AES_256_GCM, bytes(range(32)))
LOCATIONS = [("args", 0), ("kwargs", "customer", "email")]
VALUES = ["4111 1111 1111 1111", "ann@example.com"]


def _seal(**overrides):
    options = {"locations": LOCATIONS, "task_name": "shop.charge", "task_id": "id-1"}
    options.update(overrides)
    values = options.pop("values", VALUES)
    return seal(overrides.pop("key", KEY), values, **{k: v for k, v in options.items() if k != "key"})


def _open(token, key=KEY, task_name="shop.charge"):
    return parse(token).open(key, task_name=task_name)


class TestEnvelope:
    """Tests for sealing and opening envelopes."""

    @pytest.mark.parametrize(
        ("writer", "flags", "tag"),
        [
            ("orjson", "08", "6e534da2725438fe1b512131fe2c49e9de"),
            ("standard library", "00", "6e643ffc9052b13d16f1611ba9f7374dc6"),
        ],
    )
    def test_known_answer(self, writer, flags, tag, monkeypatch):
        """A fixed key and nonce give these exact bytes: the wire format is pinned.

        The flags say which JSON library wrote the values (only that byte and
        so the tag differ: both write the same JSON).
        """
        if writer == "orjson":
            pytest.importorskip("orjson")
        else:
            monkeypatch.setattr(_json, "orjson", None)
        token = _seal(_nonce=bytes(12))
        locations = b'[["args",0],["kwargs","customer","email"]]'
        header = (
            "01"  # envelope version
            + flags
            + "01"  # aes-256-gcm
            "00000002"  # key version
            "06"
            + b"orders".hex()  # key id
            + "04"
            + b"id-1".hex()  # bound task id
            + f"{len(locations):08x}"
            + locations.hex()
        )
        ciphertext_and_tag = (
            "559e81ef841da38c39999815291da0a8f272676219a34c0de1f0ddc3a0873c3b3e338392499dd524"
            "6e643ffc9052b13d16f1611ba9f7374dc6"[:-34]
            + tag
        )
        assert base64.b64decode(token).hex() == header + "00" * 12 + ciphertext_and_tag
        assert _open(token) == VALUES

    def test_only_values_orjson_wrote_skip_the_read_checks(self):
        """Flagged values are read by orjson directly; the rest (here a 70-bit int) with every check."""
        pytest.importorskip("orjson")
        assert parse(_seal())._prefix.read is _json.read_own
        big = [2**70, "ann@example.com"]
        token = seal(KEY, big, locations=LOCATIONS, task_name="shop.charge", task_id="id-1")
        assert not base64.b64decode(token)[1] & 0x08
        assert parse(token)._prefix.read is _json.loads
        assert _open(token) == big

    def test_round_trip_and_metadata(self):
        """Opening returns the values; the header names key, version, task id and locations."""
        token = _seal()
        envelope = parse(token)
        assert (envelope.key_id, envelope.key_version, envelope.task_id) == ("orders", 2, "id-1")
        assert envelope.locations == tuple(LOCATIONS)
        assert envelope.kind is Kind.TASK
        assert envelope.open(KEY, task_name="shop.charge") == VALUES

    def test_every_byte_is_protected(self):
        """Flipping any single bit of any byte makes the envelope fail to open."""
        raw = bytearray(base64.b64decode(_seal()))
        for i in range(len(raw)):
            tampered = bytearray(raw)
            tampered[i] ^= 0x01
            with pytest.raises(DecryptionFailed) as info:
                _open(base64.b64encode(bytes(tampered)).decode())
            assert str(info.value) == DecryptionFailed.MESSAGE

    def test_every_truncation_fails(self):
        """Every prefix of an envelope fails to open."""
        raw = base64.b64decode(_seal())
        for cut in range(len(raw)):
            with pytest.raises(DecryptionFailed):
                _open(base64.b64encode(raw[:cut]).decode())

    def test_bound_to_task_name(self):
        """An envelope moved to another task fails authentication."""
        with pytest.raises(DecryptionFailed):
            _open(_seal(), task_name="shop.refund")

    def test_wrong_key_version_or_material(self):
        """A key with another version, id or material does not open it."""
        token = _seal()
        for key in (
            DataKey("orders", 3, Algorithm.AES_256_GCM, bytes(range(32))),
            DataKey("other", 2, Algorithm.AES_256_GCM, bytes(range(32))),
            DataKey("orders", 2, Algorithm.AES_256_GCM, bytes(32)),
        ):
            with pytest.raises(DecryptionFailed):
                _open(token, key=key)

    def test_version_downgrade_rejected(self):
        """An envelope claiming another format version is refused before any key lookup."""
        raw = bytearray(base64.b64decode(_seal()))
        raw[0] = 0
        with pytest.raises(DecryptionFailed):
            parse(base64.b64encode(bytes(raw)).decode())

    @pytest.mark.parametrize(
        "garbage", ["", "!!!", "AAAA", 42, None, "A" * 1000, base64.b64encode(b"\x01" * 7)]
    )
    def test_garbage_is_decryption_failed(self, garbage):
        """Anything that is not an envelope raises DecryptionFailed."""
        with pytest.raises(DecryptionFailed):
            parse(garbage)

    @pytest.mark.parametrize("algorithm", list(Algorithm))
    def test_compression_flagged_and_transparent(self, algorithm):
        """Plaintext above the threshold is compressed, flagged, and opens the same."""
        key = DataKey("k", 1, algorithm, bytes(32))
        values = ["x" * 5000]
        small = seal(key, values, locations=[("a",)], task_name="t", task_id="")
        packed = seal(key, values, locations=[("a",)], task_name="t", task_id="", compression_threshold=1024)
        assert parse(packed).compressed and not parse(small).compressed
        assert len(packed) < len(small) / 10
        assert parse(packed).open(key, task_name="t") == values

    def test_result_kind(self):
        """Result envelopes are flagged as such (and the flag is authenticated)."""
        token = seal(KEY, [1], locations=[("result",)], task_name="t", task_id="i", kind=Kind.RESULT)
        assert parse(token).kind is Kind.RESULT

    def test_overlong_task_id_is_refused(self):
        """A task id that does not fit raises EncryptionFailed without the id."""
        with pytest.raises(EncryptionFailed) as info:
            _seal(task_id="x" * 300)
        assert "xxxx" not in str(info.value)

    ONE = (("args", 0),)

    def test_what_opening_refuses_is_not_sealed(self):
        """Values past opening's limits raise EncryptionFailed when sealed, compressed or not.

        A 65 MiB field sealed compressed into a small envelope every worker then
        refused (it inflates past ``MAX_PLAINTEXT_BYTES``).
        """
        for threshold in (1024, None):
            with pytest.raises(EncryptionFailed, match="larger than a worker opens"):
                _seal(
                    compression_threshold=threshold,
                    values=["x" * (_envelope.MAX_PLAINTEXT_BYTES + 1)],
                    locations=self.ONE,
                )
        # Within the plaintext limit, but not with the header and tag around it.
        with pytest.raises(EncryptionFailed, match="larger than a worker opens"):
            _seal(values=["x" * (_envelope.MAX_PLAINTEXT_BYTES - 10)], locations=self.ONE)
        assert _open(_seal(values=["x" * 2**20], locations=self.ONE, compression_threshold=1024)) == [
            "x" * 2**20
        ]

    def test_places_opening_refuses_are_not_sealed(self, monkeypatch):
        """A location deeper than opening reads (a 64-part path behind "args"), or too many: refused when sealed.

        Sealing took them and every worker refused the envelope as damaged,
        parking an untouched message as tampered with.
        """
        deepest = ("args", *(f"k{i}" for i in range(_envelope.MAX_LOCATION_DEPTH - 1)))
        assert _open(_seal(values=["x"], locations=(deepest,))) == ["x"]
        with pytest.raises(EncryptionFailed, match="deeper than a worker opens"):
            _seal(values=["x"], locations=((*deepest, "one more"),))
        monkeypatch.setattr(_envelope, "MAX_LOCATIONS", 3)
        places = tuple(("args", i) for i in range(4))
        with pytest.raises(EncryptionFailed, match="more places than a worker opens"):
            _seal(values=[1, 2, 3, 4], locations=places)
        monkeypatch.setattr(_envelope, "MAX_LOCATIONS_BYTES", 40)
        with pytest.raises(EncryptionFailed, match="more places than a worker opens"):
            _seal(values=[1, 2], locations=(("args", "a" * 20), ("args", "b" * 20)))

    def test_kombu_types_keep_their_type(self):
        """datetime, Decimal and nested mixes come back with their types."""
        values = [datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), Decimal("12.30"), {"a": [1, None]}]
        token = seal(KEY, values, locations=[("a",), ("b",), ("c",)], task_name="t", task_id="")
        assert parse(token).open(KEY, task_name="t") == values

    @pytest.mark.parametrize(
        "beside", [[], [datetime(2026, 1, 2, tzinfo=timezone.utc)]], ids=["json", "typed"]
    )
    @pytest.mark.parametrize(
        "twins",
        [{1: "a", "1": "b"}, {True: "a", "true": "b"}, {None: "a", "null": "b"}, {1.0: "a", "1.0": "b"}],
    )
    def test_two_keys_json_writes_alike_are_refused(self, twins, beside):
        """Written alike, two keys read back as one: the other value was lost, sealed and opened fine."""
        values = [*beside, {"nested": [twins]}]
        with pytest.raises(_envelope.TwinKeys, match="two keys JSON writes alike"):
            seal(KEY, values, locations=[("a",), ("b",)][: len(values)], task_name="t", task_id="")

    def test_non_str_keys_written_differently_still_seal(self):
        """Keys JSON writes as different texts are fine; they read back as those texts."""
        token = seal(KEY, [{1: "a", "2": "b", None: "c"}], locations=self.ONE, task_name="t", task_id="")
        assert parse(token).open(KEY, task_name="t") == [{"1": "a", "2": "b", "null": "c"}]


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def _same(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


class TestValueCodec:
    """Property tests: every JSON-like value comes back with the same type and value."""

    @settings(max_examples=300, deadline=None)
    @given(values=st.lists(JSON_VALUES, min_size=1, max_size=5), threshold=st.sampled_from([None, 0, 64]))
    def test_round_trip_exact(self, values, threshold):
        """str, big int, float (incl. -0.0), bool, None, dict, list and mixes round-trip exactly."""
        locations = [(f"f{i}",) for i in range(len(values))]
        token = seal(
            KEY,
            values,
            locations=locations,
            task_name="t",
            task_id="",
            compression_threshold=threshold,
        )
        opened = parse(token).open(KEY, task_name="t")
        assert _same(opened, values)

    @pytest.mark.parametrize(
        "values",
        [["\ud800", "ab\udfffcd", {"k": "x\ud83d"}], ["\udc80", Decimal("1.10")]],
        ids=["plain", "beside-typed"],
    )
    def test_lone_surrogates_round_trip(self, values):
        """Unpaired surrogates (a browser's broken escape, surrogateescape names) plain Celery carries too."""
        token = seal(
            KEY, values, locations=[(f"f{i}",) for i in range(len(values))], task_name="t", task_id=""
        )
        assert parse(token).open(KEY, task_name="t") == values

    def test_non_finite_floats(self):
        """inf and nan survive too."""
        token = seal(
            KEY,
            [math.inf, -math.inf, math.nan],
            locations=[("a",), ("b",), ("c",)],
            task_name="t",
            task_id="",
        )
        pos, neg, nan = parse(token).open(KEY, task_name="t")
        assert pos == math.inf and neg == -math.inf and math.isnan(nan)


def test_limits_are_defined():
    """The parser's bounds exist and are sane (used by the hostile-input tests)."""
    assert _envelope.MAX_LOCATIONS >= 100_000
    assert _envelope.MAX_ENVELOPE_BYTES >= 1024 * 1024


def test_size_constants_match_the_layout():
    """The sizes the parser uses as constants are those of the structs that write the layout."""
    assert _envelope._FIXED.size == _envelope._FIXED_SIZE
    assert _envelope._U32.size == _envelope._U32_SIZE


ALICE = DataKey("subject.a11ce", 1, Algorithm.AES_256_GCM, bytes(range(1, 33)))
BOB = DataKey("subject.b0b@20270101T000000Z", 4, Algorithm.CHACHA20_POLY1305, bytes(range(2, 34)))


def _open_with_co_keys(raw):
    return parse(base64.b64encode(raw).decode()).open(KEY, task_name="shop.charge", co_keys=[ALICE, BOB])


class TestCoKeys:
    """Values derived from several data subjects: sealed under each one's key, opened with all of them."""

    def test_every_key_is_needed(self):
        """Opened with all keys it names; without any one of them, or with another, it does not open."""
        envelope = parse(_seal(co_keys=[ALICE, BOB]))
        assert envelope.keys == (("orders", 2), ("subject.a11ce", 1), ("subject.b0b@20270101T000000Z", 4))
        assert envelope.open(KEY, task_name="shop.charge", co_keys=[ALICE, BOB]) == VALUES
        other = DataKey("subject.b0b@20270101T000000Z", 4, Algorithm.CHACHA20_POLY1305, bytes(32))
        for co_keys in ([], [ALICE], [BOB], [BOB, ALICE], [ALICE, other], [ALICE, BOB, BOB]):
            with pytest.raises(DecryptionFailed):
                envelope.open(KEY, task_name="shop.charge", co_keys=co_keys)

    def test_layers_are_real(self):
        """Each co-key encrypts a layer of its own: with the outer key alone, no value is readable."""
        raw = base64.b64decode(_seal(co_keys=[ALICE]))
        envelope = parse(base64.b64encode(raw).decode())
        associated_data = envelope.header + b"shop.charge"
        inner = KEY.open(raw, associated_data, len(envelope.header))
        assert b"ann@example.com" not in inner
        assert ALICE.open(inner, associated_data).decode() == '["4111 1111 1111 1111","ann@example.com"]'

    def test_open_task_asks_for_every_key(self):
        """The worker's path looks each key up (a destroyed one stops it) and returns them all."""
        token = _seal(co_keys=[ALICE, BOB])
        keys = {(key.key_id, key.version): key for key in (KEY, ALICE, BOB)}
        asked = []

        def key_for(key_id, version):
            asked.append((key_id, version))
            return keys[key_id, version]

        opened = _envelope.open_task(token, task_id="id-1", task_name="shop.charge", key_for=key_for)
        assert opened == (tuple(asked), tuple(LOCATIONS), VALUES)
        assert asked == [("orders", 2), ("subject.a11ce", 1), ("subject.b0b@20270101T000000Z", 4)]

        def bob_destroyed(key_id, version):
            if key_id == BOB.key_id:
                raise LookupError(key_id)
            return keys[key_id, version]

        with pytest.raises(LookupError):
            _envelope.open_task(token, task_id="id-1", task_name="shop.charge", key_for=bob_destroyed)

    def test_every_byte_is_protected(self):
        """Flipping any bit of an envelope with co-keys (their ids and versions included) fails it."""
        raw = bytearray(base64.b64decode(_seal(co_keys=[ALICE, BOB])))
        for i in range(len(raw)):
            tampered = bytearray(raw)
            tampered[i] ^= 0x01
            with pytest.raises(DecryptionFailed):
                _open_with_co_keys(bytes(tampered))

    def test_every_truncation_fails(self):
        """Every prefix of an envelope with co-keys fails to parse or open."""
        raw = base64.b64decode(_seal(co_keys=[ALICE, BOB]))
        for cut in range(len(raw)):
            with pytest.raises(DecryptionFailed):
                _open_with_co_keys(raw[:cut])

    def test_a_co_key_block_without_keys_is_refused(self):
        """The flag with a count of zero is not a format celery-pii writes."""
        raw = bytearray(base64.b64decode(_seal(co_keys=[ALICE])))
        start = 8 + len(b"orders")
        assert raw[start : start + 2] == b"\x00\x01"
        raw[start + 1] = 0
        with pytest.raises(DecryptionFailed):
            parse(base64.b64encode(bytes(raw)).decode())

    def test_results_and_compression_take_co_keys_too(self):
        """A result envelope, compressed, with a co-key: flags and layers combine."""
        token = _seal(co_keys=[BOB], kind=Kind.RESULT, compression_threshold=1)
        envelope = parse(token)
        assert (envelope.kind, envelope.compressed, envelope.co_keys) == (
            Kind.RESULT,
            True,
            (("subject.b0b@20270101T000000Z", 4),),
        )
        assert envelope.open(KEY, task_name="shop.charge", co_keys=[BOB]) == VALUES

    def test_without_co_keys_the_format_is_unchanged(self):
        """No co-keys: no flag, no block (envelopes of earlier builds and of later ones are alike)."""
        envelope = parse(_seal())
        assert envelope.co_keys == ()
        assert envelope.keys == (("orders", 2),)
        assert base64.b64decode(_seal())[1] & 0x10 == 0
