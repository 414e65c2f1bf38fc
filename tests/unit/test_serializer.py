"""The ``pii`` serializer's frame: which codec byte a body gets, and how each is read back."""

from __future__ import annotations

import pytest

from celery_pii import _json
from celery_pii._serializer import FRAME_VERSION, PIISerializer

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
