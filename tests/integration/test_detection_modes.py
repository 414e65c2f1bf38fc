"""pii_detect on publish: warn, encrypt, refuse — against a real Redis broker and worker."""

from __future__ import annotations

import functools
import logging

import pytest

from celery_pii import EncryptionFailed, Finding, get_pii
from celery_pii._sealer import MARKER

from .conftest import BACKEND_DB, message_bytes, queued_messages, redis_client
from .test_celery_roundtrip import CARD, EMAIL, assert_no_plaintext

# Detection must see a valid-format SSN; the 9xx-area test SSN is (rightly) not one.
SSN_FORMAT = "123-45-6789"

pytestmark = pytest.mark.integration

NOTE = f"call me at (415) 555-0134 or write to {EMAIL}"


class TestModes:
    """The three modes, per task and app-wide."""

    def test_warn_logs_counts_and_redacts_reprs(self, app, caplog):
        """warn publishes unchanged, logs path and category (never the value), counts, redacts argsrepr."""
        with caplog.at_level(logging.WARNING, logger="celery_pii"):
            app.tasks["t.detect_warn"].delay(NOTE, email=EMAIL)
        (message,) = queued_messages(app.conf.task_default_queue)
        body = message_bytes(message).decode()
        assert EMAIL in body.split("\n", 1)[1]  # the note itself travels in plaintext (warn)
        assert "[pii:redacted]" in message["headers"]["argsrepr"]
        assert_no_plaintext(message["headers"]["argsrepr"] + message["headers"]["kwargsrepr"])
        lines = [r.getMessage() for r in caplog.records if "undeclared PII" in r.getMessage()]
        # Named as pii_fields takes it (the parameter, not the message's args[0]).
        assert any("(email) at note published" in line for line in lines)
        assert any("(phone)" in line for line in lines)
        assert_no_plaintext("\n".join(lines))
        counts = get_pii(app).detections
        assert counts[("t.detect_warn", "email")] == 1
        assert counts[("t.detect_warn", "phone")] == 1

    def test_declared_fields_are_not_scanned_twice(self, app, caplog):
        """A declared field holding PII is sealed and not reported as undeclared."""
        with caplog.at_level(logging.WARNING, logger="celery_pii"):
            app.tasks["t.detect_warn"].delay("nothing here", email=EMAIL)
        assert not [r for r in caplog.records if "undeclared PII" in r.getMessage()]
        (message,) = queued_messages(app.conf.task_default_queue)
        assert_no_plaintext(message_bytes(message))

    def test_encrypt_seals_what_it_finds(self, app, worker):
        """encrypt seals detected values as if declared; the task still receives them exactly."""
        nested = {"contact": {"ssn": SSN_FORMAT, "label": "home"}, "cards": [CARD, "not a card"]}
        result = app.tasks["t.detect_encrypt"].delay(NOTE, extra=nested)
        assert result.get(timeout=20) == {"note": NOTE, "extra": nested}

    def test_a_task_declaring_a_mode_keeps_what_it_returns_sealed(self, app, worker, testapp_module):
        """A task whose arguments hold no PII but that returns some (docs/security.md, Outcomes).

        The app-wide mode does not make it a PII task; its own ``pii_detect`` does.
        """
        testapp_module.CUSTOMERS["c-17"] = {"card": CARD, "email": EMAIL, "tier": "gold"}
        try:
            result = app.tasks["t.lookup_customer"].delay("c-17")
            assert result.get(timeout=20) == {"card": CARD, "email": EMAIL, "tier": "gold"}
        finally:
            testapp_module.CUSTOMERS.clear()
        stored = redis_client(BACKEND_DB).get(f"celery-task-meta-{result.id}")
        assert MARKER.encode() in stored
        assert_no_plaintext(stored)

    def test_encrypt_leaves_no_plaintext_on_the_wire(self, app):
        """The raw message of an encrypt-mode task holds no detected value."""
        app.tasks["t.detect_encrypt"].delay(NOTE, extra={"contact": {"ssn": SSN_FORMAT}, "cards": [CARD]})
        (message,) = queued_messages(app.conf.task_default_queue)
        assert_no_plaintext(message_bytes(message), (*[CARD, EMAIL], SSN_FORMAT, "(415) 555-0134"))
        assert MARKER in message["headers"]["argsrepr"] or MARKER in message["headers"]["kwargsrepr"]

    def test_encrypt_finds_values_under_non_string_keys(self, app):
        """{1: card, None: email} travels as {"1": ..., "null": ...}: sealed there, delivered as plain Celery would.

        The places were named by the Python keys (1, "None"): an int read as a
        list index parked the message as tampered, the others failed to publish.
        """
        from celery.contrib.testing.worker import start_worker

        extra = {1: CARD, None: EMAIL, 2.5: "nothing"}
        result = app.tasks["t.detect_encrypt"].delay("note", extra=extra)
        (message,) = queued_messages(app.conf.task_default_queue)
        assert_no_plaintext(message_bytes(message))
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            delivered = result.get(timeout=20)
        assert delivered == {"note": "note", "extra": {"1": CARD, "null": EMAIL, "2.5": "nothing"}}

    def test_encrypt_refuses_what_it_finds_under_a_key_json_cannot_write(self, app):
        """{b"email": ...} (msgpack carries bytes keys): no field path names the place, so no envelope could.

        It failed with a bare ``KeyError`` naming neither the task nor the place.
        """
        with pytest.raises(
            EncryptionFailed, match=r"t\.detect_encrypt.*at extra\[.*sits under a dict key"
        ) as info:
            app.tasks["t.detect_encrypt"].delay("note", extra={b"contact": EMAIL})
        assert_no_plaintext(str(info.value))
        assert queued_messages(app.conf.task_default_queue) == []

    def test_encrypt_seals_everything_when_the_scan_is_truncated(self, app, worker):
        """Past the scan caps, encrypt mode seals every argument rather than guess."""
        huge = "x" * 1_100_000
        result = app.tasks["t.detect_encrypt"].delay(huge, extra=EMAIL)
        (message,) = queued_messages(app.conf.task_default_queue) or [None]
        if message is not None:
            assert EMAIL not in message_bytes(message).decode(errors="replace")
        assert result.get(timeout=30)["extra"] == EMAIL

    def test_truncated_scan_with_a_nested_declared_field_still_opens(self, app, worker):
        """An argument sealed whole (scan truncated) takes the declared field inside it along.

        Sealing both the argument and the field inside it would record places
        that cannot both be opened, and every such message would be quarantined.
        """
        customer = {"email": EMAIL, "tier": "gold"}
        result = app.tasks["t.detect_nested"].delay(customer, "x" * 1_100_000)
        assert result.get(timeout=30) == {"customer": customer, "length": 1_100_000}

    def test_refuse_raises_and_queues_nothing(self, app):
        """refuse raises EncryptionFailed naming path (as pii_fields takes it) and category; nothing is queued."""
        with pytest.raises(EncryptionFailed, match=r"at note \(email\)") as info:
            app.tasks["t.detect_refuse"].delay(NOTE)
        assert_no_plaintext(str(info.value))
        assert queued_messages(app.conf.task_default_queue) == []
        app.tasks["t.detect_refuse"].delay("a harmless note")
        assert len(queued_messages(app.conf.task_default_queue)) == 1

    @pytest.mark.parametrize("task", ["t.detect_refuse", "t.detect_encrypt"])
    def test_pii_in_a_custom_header_is_refused(self, app, task):
        """``apply_async(headers=...)`` is never sealed: refuse (and encrypt, which cannot seal it) refuse it.

        The same email in an argument was refused; in a custom header it went to the broker.
        """
        with pytest.raises(
            EncryptionFailed, match=r"custom header headers\.x-customer holds PII \(email\)"
        ) as info:
            app.tasks[task].apply_async(("a harmless note",), headers={"x-customer": EMAIL, "x-trace": "t-1"})
        assert_no_plaintext(str(info.value))
        assert queued_messages(app.conf.task_default_queue) == []
        app.tasks[task].apply_async(("a harmless note",), headers={"x-trace": "t-1"})
        assert len(queued_messages(app.conf.task_default_queue)) == 1

    @pytest.mark.parametrize("how", ["stamp", "stamped_headers"])
    def test_pii_in_a_stamp_is_refused_too(self, app, how):
        """Celery's stamps are headers too: the email went to the broker."""
        task = app.tasks["t.detect_refuse"]
        if how == "stamp":
            signature = task.s("a harmless note")
            signature.stamp(customer=EMAIL)
            publish = signature.apply_async
        else:
            publish = functools.partial(
                task.apply_async, ("a harmless note",), stamped_headers=["customer"], customer=EMAIL
            )
        with pytest.raises(EncryptionFailed, match=r"custom header headers\.customer holds PII \(email\)"):
            publish()
        assert queued_messages(app.conf.task_default_queue) == []

    @pytest.mark.parametrize("option", ["task_id", "group_id", "shadow"])
    def test_pii_in_an_id_or_shadow_name_the_caller_gives_is_refused(self, app, option):
        """Ids and the shadow name travel as headers, shown by events, ``inspect``, logs and backend keys.

        A ``task_id`` or ``shadow`` built from an email went to the broker
        under ``refuse``, unreported.
        """
        task = app.tasks["t.detect_refuse"]
        with pytest.raises(
            EncryptionFailed, match=rf"t\.detect_refuse'?: {option} holds PII \(email\)"
        ) as info:
            task.apply_async(("a harmless note",), **{option: f"welcome-{EMAIL}"})
        assert_no_plaintext(str(info.value))
        assert queued_messages(app.conf.task_default_queue) == []
        task.apply_async(("a harmless note",), **{option: "welcome-17"})
        assert len(queued_messages(app.conf.task_default_queue)) == 1

    def test_pii_in_a_task_id_is_reported_in_warn_mode(self, app, caplog):
        with caplog.at_level(logging.WARNING, logger="celery_pii"):
            app.tasks["t.detect_warn"].apply_async(("a harmless note",), task_id=f"welcome-{EMAIL}")
        (line,) = [r.getMessage() for r in caplog.records if "in task_id" in r.getMessage()]
        assert "PII (email) in task_id published in plaintext" in line
        assert_no_plaintext(line)
        assert get_pii(app).detections[("t.detect_warn", "email")] == 1

    def test_pii_in_a_custom_header_is_reported_in_warn_mode(self, app, caplog):
        with caplog.at_level(logging.WARNING, logger="celery_pii"):
            app.tasks["t.detect_warn"].apply_async(("a harmless note",), headers={"x-customer": EMAIL})
        (line,) = [r.getMessage() for r in caplog.records if "custom header" in r.getMessage()]
        assert "PII (email) in custom header headers.x-customer published in plaintext" in line
        assert_no_plaintext(line)
        assert get_pii(app).detections[("t.detect_warn", "email")] == 1

    def test_dict_keys_that_look_like_pii_are_not_printed(self, app, caplog):
        """The path of a finding under an email or card used as a dict key names neither.

        Keys are never PII to detection, yet the warning and the error print paths.
        """
        contacts = {"contacts": {EMAIL: NOTE, CARD: "primary"}}
        with caplog.at_level(logging.WARNING, logger="celery_pii"):
            app.tasks["t.detect_warn"].delay(contacts)
        lines = [r.getMessage() for r in caplog.records if "undeclared PII" in r.getMessage()]
        assert any('(email) at note.contacts["[pii:redacted]"]' in line for line in lines)
        assert_no_plaintext("\n".join(lines))
        with pytest.raises(EncryptionFailed, match=r"undeclared PII at note\.contacts") as info:
            app.tasks["t.detect_refuse"].delay(contacts)
        assert_no_plaintext(str(info.value))
        # A key longer than a field path may be: still the same error, naming no value.
        with pytest.raises(EncryptionFailed, match="undeclared PII") as info:
            app.tasks["t.detect_refuse"].delay({f"{EMAIL} " + "x" * 1100: NOTE})
        assert_no_plaintext(str(info.value))

    def test_app_wide_setting(self, make_app, caplog):
        """pii_detect set on the app applies to tasks without the option."""
        app = make_app(pii_detect="refuse")
        with pytest.raises(EncryptionFailed, match="undeclared PII"):
            app.tasks["t.plain"].delay({"x": SSN_FORMAT})

    def test_pii_detect_api(self, app):
        """pii.detect returns findings by field path and category."""
        findings = get_pii(app).detect({"rows": [{"note": NOTE}], "id": "ID123456789"})
        assert Finding("rows[0].note", "email") in findings
        assert Finding("rows[0].note", "phone") in findings
        assert all(f.path.startswith("rows") for f in findings)


@pytest.mark.parametrize("with_headers", [False, True], ids=["plain", "custom-headers"])
def test_a_refuse_mode_task_retries(make_app, with_headers):
    """A retry publishes the request's headers again (with celery-pii's envelope list): not PII."""
    from celery.contrib.testing.worker import start_worker

    app = make_app()
    attempts = []

    @app.task(shared=False, name="t.refuse_retries", bind=True, pii_detect="refuse", pii_fields=["email"])
    def refuse_retries(self, email, note):
        attempts.append(email)
        if len(attempts) == 1:
            raise self.retry(countdown=0)
        return {"email": email, "note": note}

    headers = {"x-trace": "t-1"} if with_headers else None
    sent = refuse_retries.apply_async((EMAIL, "a harmless note"), headers=headers)
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
        assert sent.get(timeout=20) == {"email": EMAIL, "note": "a harmless note"}
    assert attempts == [EMAIL, EMAIL]
