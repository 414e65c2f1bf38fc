"""The ``pii`` serializer's frame: which codec byte a body gets, and how each is read back."""

from __future__ import annotations

import uuid

import pytest

from celery_pii import _json
from celery_pii._serializer import FRAME_VERSION, PIISerializer, PublishTicket, publish_ticket
from celery_pii.exceptions import EncryptionFailed

SERIALIZER = PIISerializer("json")
RESULT = {"status": "SUCCESS", "result": {"total": 99.5, "items": ["a", "b"]}, "task_id": "id-1"}


def _refuse_checked_reads(monkeypatch):
    def checked(_data):
        pytest.fail("read with _json.loads's checks")

    monkeypatch.setattr(_json, "loads", checked)


def test_what_orjson_wrote_is_read_by_orjson_directly(monkeypatch):
    """With orjson installed, a plain body is framed "o" and read back without the read checks."""
    pytest.importorskip("orjson")
    frame = SERIALIZER.dumps(RESULT)
    assert frame[:2] == bytes((FRAME_VERSION,)) + b"o"
    _refuse_checked_reads(monkeypatch)
    assert SERIALIZER.loads(frame) == RESULT


def test_what_the_standard_library_wrote_is_read_with_the_checks(monkeypatch):
    """Without orjson a body is framed "j"; so is one orjson cannot write (a 70-bit integer)."""
    monkeypatch.setattr(_json, "orjson", None)
    frame = SERIALIZER.dumps(RESULT)
    assert frame[:2] == bytes((FRAME_VERSION,)) + b"j"
    assert SERIALIZER.loads(frame) == RESULT
    monkeypatch.undo()
    big = {"status": "SUCCESS", "result": 2**70, "task_id": "id-1"}
    frame = SERIALIZER.dumps(big)
    assert frame[:2] == bytes((FRAME_VERSION,)) + b"j"
    loaded = SERIALIZER.loads(frame)
    assert loaded == big
    assert type(loaded["result"]) is int


def test_msgpack_writes_canvas_and_subclasses_as_their_plain_values():
    """A group signature (a dict whose len() counts its tasks) in a body: the msgpack frame decodes.

    msgpack wrote a dict subclass's map header from len(): a chain holding a
    group did not decode, and the whole canvas was parked as undecodable.
    """
    import enum

    from celery import Celery, group

    app = Celery("serializer-test", set_as_current=False)

    @app.task(shared=False)
    def add(x):
        return x

    class Color(str, enum.Enum):
        RED = "red"

    class Size(enum.IntEnum):
        ONE = 1

    serializer = PIISerializer("msgpack")
    body = {"chain": [group(add.s(1), add.s(2))], "pair": (1, 2), "color": Color.RED, "size": Size.ONE}
    back = serializer.loads(serializer.dumps(body))
    assert [step["args"] for step in back["chain"][0]["kwargs"]["tasks"]] == [[1], [2]]
    assert back["pair"] == [1, 2]
    assert (back["color"], type(back["color"])) == ("red", str)
    assert (back["size"], type(back["size"])) == (1, int)
    with pytest.raises(TypeError):
        serializer.dumps({"when": object()})


def test_plain_json_outside_rollout_mode_is_refused_with_a_warning_that_says_what_it_is(caplog):
    """A result stored as ``json`` before the switch: refused, and the log says why, not "tampered"."""
    import logging

    from celery_pii.exceptions import DecryptionFailed

    serializer = PIISerializer("json")
    with caplog.at_level(logging.WARNING, logger="celery_pii"), pytest.raises(DecryptionFailed):
        serializer.loads(b'{"status": "SUCCESS", "result": "ann@example.com"}')
    assert "did not write (plain JSON" in caplog.text
    assert "pii_allow_plaintext" in caplog.text
    assert "ann@example.com" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="celery_pii"), pytest.raises(DecryptionFailed):
        serializer.loads(b"\xff\x00 damaged")
    assert caplog.text == ""


def test_msgpack_writes_keys_that_are_not_text_as_json_does():
    """``{1: "x"}`` reads back as ``{"1": "x"}``: msgpack wrote the number, which its reader refuses.

    A message holding one was parked at the worker as undecodable (audited as
    tampering), and a result holding one was stored unreadable.
    """
    pytest.importorskip("msgpack")
    serializer = PIISerializer("msgpack")
    value = {"totals": {1: 9.5, None: [{True: "x"}]}, "plain": ("a", 2)}
    assert serializer.loads(serializer.dumps(value)) == {
        "totals": {"1": 9.5, "null": [{"true": "x"}]},
        "plain": ["a", 2],
    }
    assert serializer.loads(serializer.dumps({"k": "v"})) == {"k": "v"}
    with pytest.raises(
        EncryptionFailed, match=r"^the dict at totals holds two keys JSON writes alike"
    ) as info:
        serializer.dumps({"totals": {1: "ann@example.com", "1": "bob@example.com"}})
    assert "example.com" not in str(info.value)


def _body(args, kwargs, name="t.charge"):
    """A task body as the publish step hands it to the serializer, with its ticket."""
    body = (args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
    publish_ticket.set(PublishTicket(body, name))
    return body


def test_msgpack_refuses_task_bodies_with_keys_that_paths_cannot_name():
    """A bytes key (redis-py's ``hgetall``): a declared field under it was not found, and left unsealed.

    The refusal names the task and where the dict is, never a key or value.
    Two keys JSON writes alike are refused in a body the same way.
    """
    pytest.importorskip("msgpack")
    serializer = PIISerializer("msgpack")
    refused = [
        ([1, {"customer": {b"email": "ann@example.com"}}], {}, r"args\[1\]\.customer holds a key JSON"),
        ([], {"c": [{b"ssn": "900-11-2222"}]}, r"kwargs\.c\[0\] holds a key JSON cannot"),
        ([{1: "ann@example.com", "1": "x"}], {}, r"args\[0\] holds two keys JSON writes alike"),
        ([{1: "ann@example.com", b"k": "x"}], {}, r"args\[0\] holds a key JSON cannot write"),
    ]
    for args, kwargs, where in refused:
        with pytest.raises(EncryptionFailed, match=rf"^task 't\.charge': the dict at {where}") as info:
            serializer.dumps(_body(args, kwargs))
        assert "example.com" not in str(info.value) and "900-" not in str(info.value)
        assert "email" not in str(info.value) and "ssn" not in str(info.value)
    # A key that is not text may be an account number: the place shows it redacted.
    with pytest.raises(EncryptionFailed) as info:
        serializer.dumps(_body([{"balances": {87654321: {b"k": 1}}}], {}))
    assert "87654321" not in str(info.value)
    assert 'args[0].balances["[pii:redacted]"] holds a key JSON cannot write' in str(info.value)
    # A task whose arguments no field path or detection looks into: published as plain Celery would.
    plain = (
        ["x", {b"counter": b"3"}],
        {},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    )
    publish_ticket.set(PublishTicket(plain, "t.plain", paths_matter=False))
    assert serializer.loads(serializer.dumps(plain))[0] == ["x", {b"counter": b"3"}]
    # What msgpack starts bytes with, in text and in a bytes value: not a key, so written as it is.
    fine = _body(["Łukasz Ćwik", b"\xc4\xc5\xc6 raw"], {"note": {"Ąę": b"x"}})
    assert serializer.loads(serializer.dumps(fine)) == [
        ["Łukasz Ćwik", b"\xc4\xc5\xc6 raw"],
        {"note": {"Ąę": b"x"}},
        fine[2],
    ]
    # A result is not named by field paths: bytes keys travel as msgpack carries them,
    # whatever other keys stand beside them.
    assert serializer.loads(serializer.dumps({"result": {b"k": 1}})) == {"result": {b"k": 1}}
    assert serializer.loads(serializer.dumps({"result": {b"k": 1, 2: 3}})) == {"result": {b"k": 1, "2": 3}}


def test_msgpack_names_the_task_and_place_of_a_value_it_does_not_write():
    """msgpack's own error named neither (``can not serialize 'datetime' object``).

    The message names the task, the place and the kind of value, never the value.
    """
    import datetime as dt
    from decimal import Decimal

    pytest.importorskip("msgpack")
    serializer = PIISerializer("msgpack")
    refused = [
        (
            [],
            {"u": {"when": [dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)]}},
            r"kwargs\.u\.when\[0\] is a datetime",
        ),
        ([1, 2**64], {}, r"args\[1\] is an integer beyond 64 bits"),
        ([{"ids": {3, 4}}], {}, r"args\[0\]\.ids is a set"),
        ([{87654321: Decimal("9.5")}], {}, r'args\[0\]\["\[pii:redacted\]"\] is a Decimal'),
    ]
    for args, kwargs, where in refused:
        with pytest.raises(
            EncryptionFailed, match=rf"^task 't\.charge': the value at {where}, which msgpack"
        ) as info:
            serializer.dumps(_body(args, kwargs))
        assert (
            "2026" not in str(info.value)
            and "9.5" not in str(info.value)
            and "87654321" not in str(info.value)
        )
    # What msgpack writes still travels, up to 64-bit integers both ways.
    fine = _body([2**64 - 1, -(2**63), 1.5, None, b"x"], {"nested": {"k": ["v"]}})
    assert serializer.loads(serializer.dumps(fine))[0] == [2**64 - 1, -(2**63), 1.5, None, b"x"]


@pytest.mark.timeout(20)
def test_msgpack_refuses_a_body_that_holds_itself_before_looking_for_bytes_keys():
    """The walk for bytes keys would not end: msgpack refuses such a body first (it hung publishing)."""
    pytest.importorskip("msgpack")
    serializer = PIISerializer("msgpack")
    looped: list[object] = ["x"]
    looped.append(looped)
    with pytest.raises(ValueError, match="recursion limit"):
        serializer.dumps(_body([looped], {}))


def test_lists_shaped_almost_like_a_join_entry_are_stored_as_they_are():
    """``[1, id, <not a state>, x]`` outside any task: not Redis' join entry, and no TypeError (a list is unhashable)."""
    from celery_pii._celery import _seal_result_hook

    for value in ([1, "order-7", ["a", "b"], 3], [1, "order-7", {"k": 1}, 3]):
        assert _seal_result_hook(value) is value


@pytest.mark.parametrize(
    ("inner", "beside"),
    [("json", None), ("json", uuid.UUID(int=1)), ("msgpack", None)],
    ids=["json", "kombu-typed-json", "msgpack"],
)
def test_two_keys_json_writes_alike_are_refused_by_either_inner_serializer(inner, beside):
    """``{1: a, "1": b}`` read back as ``{"1": b}`` with ``json``: the other value was lost, silently."""
    if inner == "msgpack":
        pytest.importorskip("msgpack")
    serializer = PIISerializer(inner)
    twins = {1: "ann@example.com", "1": "second", "beside": beside}
    with pytest.raises(
        EncryptionFailed, match=r"^the dict at result\.totals holds two keys JSON writes alike"
    ):
        serializer.dumps({"status": "SUCCESS", "result": {"totals": twins}})
    with pytest.raises(
        EncryptionFailed, match=r"^task 't\.charge': the dict at kwargs\.c\[0\] holds two keys"
    ):
        serializer.dumps(_body([], {"c": [twins]}))
    # Keys written differently are fine, as JSON writes them.
    apart = {1: "a", "2": "b"}
    assert serializer.loads(serializer.dumps({"result": apart})) == {"result": {"1": "a", "2": "b"}}
