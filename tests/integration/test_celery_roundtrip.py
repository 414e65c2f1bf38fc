"""Publishing and running PII tasks through a real Redis broker and worker: exact round trips."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import re
import time
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from typing import ClassVar

import pytest
from celery import chain, chord, group, xmap, xstarmap
from kombu import serialization
from kombu.exceptions import EncodeError

from celery_pii import ConfigurationError, EncryptionFailed, _context, _envelope, get_pii
from celery_pii._sealer import EMBED_KEY, MARKER, Sealer

from .conftest import BACKEND_DB, EventCapture, RedisMonitor, message_bytes, queued_messages, redis_client

pytestmark = pytest.mark.integration

CARD = "4111 1111 1111 1111"
CARD2 = "5555555555554444"
EMAIL = "ann.example@example.com"
EMAIL2 = "bob@example.org"
SSN = "912-34-5678"
SECRETS = (CARD, CARD2, EMAIL, EMAIL2, SSN, "4111111111111111")


def _envelopes_of(message):
    """The sealed envelopes a raw Redis message carries (its body: the frame, then JSON)."""
    body = base64.b64decode(message["body"])
    return json.loads(body[2:])[2].get(EMBED_KEY)


def assert_no_plaintext(data, secrets=SECRETS):
    """None of the known values appears in data (bytes or str)."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
    for secret in secrets:
        assert secret not in text, "plaintext PII found"


class TestRoundTrip:
    """What the task receives is exactly what the caller passed."""

    def test_positional_keyword_nested_wildcard(self, app, worker):
        """Positional and keyword, nested and [*] fields come back exact; the caller's data is untouched."""
        customer = {"email": EMAIL, "tier": "gold"}
        items = [{"serial": "SN-1", "sku": 1}, {"serial": "SN-2", "sku": 2}]
        by_position = app.tasks["t.charge"].delay(CARD, 99.5, customer, items)
        by_name = app.tasks["t.charge"].apply_async(
            kwargs={"card_number": CARD, "amount": 1, "customer": customer}
        )
        assert by_position.get(timeout=20) == {
            "card_number": CARD,
            "amount": 99.5,
            "customer": customer,
            "items": items,
        }
        assert by_name.get(timeout=20)["card_number"] == CARD
        assert customer == {"email": EMAIL, "tier": "gold"}
        assert items[0]["serial"] == "SN-1"

    def test_a_task_whose_signature_was_lost_receives_its_arguments(self, app, worker):
        """Sealed whole by position (see TestWire), the arguments come back exact, by position or by name."""
        wrapped = app.tasks["t.wrapped"]
        assert wrapped.delay(CARD, 10).get(timeout=20) == {"card_number": CARD, "amount": 10}
        by_name = wrapped.delay(card_number=CARD, amount=11)
        assert by_name.get(timeout=20) == {"card_number": CARD, "amount": 11}

    @pytest.mark.parametrize(
        "value",
        [
            "ünïcødé ✓ 名前",
            "ab\udfffcd",  # a lone surrogate (a browser's broken escape): plain Celery carries it too
            2**100,
            -7,
            3.25,
            True,
            False,
            None,
            {"a": [1, {"b": None}]},
            [1, "x", 2.5],
            "",
        ],
    )
    def test_types(self, app, worker, value):
        """Sealed values keep their type: str, big int, float, bool, None, dict, list; in the result too."""
        result = app.tasks["t.echo"].delay(value).get(timeout=20)
        assert result["value"] == value
        assert result["type"] == type(value).__name__

    def test_msgpack_carries_number_keys_as_text_as_json_does(self, key_store_url, queue_name, tmp_path):
        """With the msgpack inner serializer a dict keyed by numbers runs, and a result so keyed reads back.

        The message was parked by the worker as undecodable (audited as
        tampering), and the result could not be read.  A bytes key, which no
        field path names, is refused at publish: a declared field under one
        was published unsealed.  (In a process of its own: the inner
        serializer is one per process.)
        """
        printed = _run_msgpack_app(
            tmp_path,
            key_store_url,
            queue_name,
            """
            from celery.contrib.testing.worker import start_worker

            try:  # a declared field under a bytes key: found by no path, it was published unsealed
                app.tasks["t.charge"].delay({CARD!r}, 1, {{b"email": {EMAIL!r}}})
            except Exception as error:
                refused = str(error)
            with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
                plain = app.tasks["t.plain"].delay({{1: "a", "b": {{2: None}}}}).get(timeout=20)
                charged = app.tasks["t.charge"].delay({CARD!r}, 1, {{"email": {EMAIL!r}, 7: "y"}}).get(timeout=20)
            print(json.dumps({{"plain": plain, "customer": charged["customer"], "refused": refused}}))
            """,
            worker_hijack_root_logger=False,
        )
        assert printed.pop("refused").startswith(
            "task 't.charge': the dict at args[2] holds a key JSON cannot"
        )
        assert printed == {"plain": {"1": "a", "b": {"2": None}}, "customer": {"email": EMAIL, "7": "y"}}
        assert queued_messages(f"{queue_name}.quarantine") == []

    def test_msgpack_eager_calls_take_declared_values_a_worker_takes(
        self, key_store_url, queue_name, tmp_path
    ):
        """With msgpack and task_always_eager, declared datetime, Decimal, UUID and big int values run.

        They travel sealed (as typed JSON) to a worker, but an eager call had
        msgpack write them as they are: kombu's EncodeError, naming no field,
        and the task did not run.  An undeclared one is still refused, as a
        worker's message would be.  (In a process of its own: the inner
        serializer is one per process.)
        """
        printed = _run_msgpack_app(
            tmp_path,
            key_store_url,
            queue_name,
            """
            from datetime import datetime, timezone
            from decimal import Decimal
            from uuid import UUID

            values = [datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), Decimal("9.99"), UUID(int=7), 2**70]
            came = [app.tasks["t.echo"].delay(value).get() for value in values]
            same = [got["value"] == value and type(got["value"]) is type(value) for got, value in zip(came, values)]
            try:
                app.tasks["t.echo"].delay({CARD!r}, label=Decimal("1.5"))
                undeclared = "accepted"
            except Exception as error:
                undeclared = type(error).__name__
            print(json.dumps({{"same": same, "undeclared": undeclared}}))
            """,
            task_always_eager=True,
        )
        assert printed == {
            "same": [True] * 4,
            "undeclared": "EncodeError",
        }

    @pytest.mark.parametrize(
        "label",
        [uuid.UUID(int=7), datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), Decimal("9.99"), (1, "two")],
    )
    def test_plain_arguments_keep_kombu_json_types(self, app, worker, label):
        """Non-PII arguments arrive as kombu's json would deliver them (UUIDs stay UUIDs, not strings)."""
        result = app.tasks["t.echo"].delay(CARD, label=label).get(timeout=20)
        expected = list(label) if isinstance(label, tuple) else label
        assert result["label"] == expected
        assert type(result["label"]) is type(expected)

    def test_reused_signature_is_not_sealed_twice(self, app, worker):
        """Sending one signature twice seals two copies; its own kwargs stay plaintext."""
        signature = app.tasks["t.echo"].s(value=CARD)
        first, second = signature.delay(), signature.delay()
        assert signature.kwargs == {"value": CARD}
        assert first.get(timeout=20)["value"] == second.get(timeout=20)["value"] == CARD

    @pytest.mark.parametrize(
        "call",
        [
            {"args": [CARD], "kwargs": {"label": "x"}},
            {"args": [], "kwargs": {"value": CARD}},
            {"args": [MARKER, "y"], "kwargs": {}},
            {"args": [], "kwargs": {"label": "no value"}},
        ],
        ids=["positional", "keyword", "already-sealed", "absent"],
    )
    def test_the_direct_path_seals_as_the_general_path_does(self, app, call):
        """A task with simple fields is sealed directly; the general path gives the same envelope."""
        app.finalize()  # tasks are registered (and given their specs) when the app is finalized
        sealer = get_pii(app).sealer
        _, spec = sealer.lookup("t.echo")
        assert spec.simple_sealing
        general_spec = dataclasses.replace(spec)
        object.__setattr__(general_spec, "simple_sealing", False)
        general_sealer = Sealer(sealer.keys, sealer.settings, lambda _name: (True, general_spec))
        root = {**call, "callbacks": None, "errbacks": None, "chain": None, "chord": None}
        direct = sealer.seal_message("t.echo", "id-1", root, keep_markers=True)
        general = general_sealer.seal_message("t.echo", "id-1", root, keep_markers=True)
        if general is None:
            assert direct is None
            return
        assert direct.root == general.root
        assert (direct.locations, direct.step_tokens) == (general.locations, general.step_tokens)
        assert _envelope.parse(direct.token).header == _envelope.parse(general.token).header
        for sealed in (direct, general):
            opened = {**sealed.root, "args": list(sealed.root["args"]), "kwargs": dict(sealed.root["kwargs"])}
            sealer.open_message("t.echo", "id-1", opened, [sealed.token])
            assert opened == root

    def test_the_marker_is_refused_where_every_argument_is_sealed_too(self, app):
        """send_task to a task this process does not know seals every argument: the marker is refused there too."""
        with pytest.raises(EncryptionFailed, match=r"t\.elsewhere.*args\[1\] holds"):
            app.send_task("t.elsewhere", args=(CARD, MARKER))
        assert queued_messages(app.conf.task_default_queue) == []

    def test_a_value_that_cannot_be_encoded_is_named_by_its_place(self, app):
        """Among several declared fields, the error says which one as pii_fields does (never its value).

        Passed by position, it was named by its place in the message (``args[2].email``).
        """
        customer = {"email": {"a set of", "values"}}
        with pytest.raises(EncryptionFailed, match=r"t\.charge.*value at customer\.email cannot") as info:
            app.tasks["t.charge"].apply_async((CARD, 1, customer))
        assert "a set of" not in str(info.value)

    @pytest.mark.parametrize("twins", [{1: EMAIL, "1": "second"}, {True: EMAIL, "true": "second"}])
    def test_a_value_holding_two_keys_json_writes_alike_is_refused(self, app, twins):
        """Sealed as one JSON value, ``{1: a, "1": b}`` read back as ``{"1": b}``: the other value was lost."""
        with pytest.raises(
            EncryptionFailed, match=r"t\.echo.*value at value: a dict holding two keys"
        ) as info:
            app.tasks["t.echo"].delay(twins)
        assert EMAIL not in str(info.value)
        assert queued_messages(app.conf.task_default_queue) == []

    @pytest.mark.parametrize("compressed", [True, False])
    def test_values_larger_than_a_worker_opens_are_not_published(self, app, compressed):
        """65 MiB in a declared field: refused when published, not parked by every worker as tampered.

        Sealing took it (compressed to 0.4 MB), and every worker refused it
        (64 MiB is what opening inflates or reads), parking it with a false
        ``tamper_detected`` record.
        """
        size = 65 * 2**20
        value = "4" * size if compressed else base64.b64encode(os.urandom(size * 3 // 4)).decode()
        with pytest.raises(EncryptionFailed, match=r"t\.echo.*larger than a worker opens \(64 MiB\)"):
            app.tasks["t.echo"].delay(value)
        assert queued_messages(app.conf.task_default_queue) == []

    def test_already_sealed_values_are_left_alone(self, app, worker):
        """A value that is already the sealed marker, its envelope carried along, is not sealed again."""
        root = {"args": [MARKER], "kwargs": {}}
        assert get_pii(app).sealer.seal_message("t.echo", "id-1", root, keep_markers=True) is None

    @pytest.mark.parametrize(
        ("task", "args", "kwargs", "shown"),
        [
            ("t.echo", (MARKER,), {}, "value"),  # the direct path
            ("t.charge", (CARD, 1), {"items": [{"serial": "S1"}, {"serial": MARKER}]}, "items[1].serial"),
        ],
        ids=["direct", "general"],
    )
    def test_a_caller_value_that_is_the_marker_is_refused_at_publish(self, app, task, args, kwargs, shown):
        """The caller typed "[pii:sealed]": refused with the field named, not parked by the worker as forged.

        It was published unsealed (taken for a value sealed already) and the
        worker, finding no envelope for it, parked it as tampering.
        """
        with pytest.raises(EncryptionFailed, match=rf"{task}.*{re.escape(shown)} holds '\[pii:sealed\]'"):
            app.tasks[task].apply_async(args, kwargs)
        assert queued_messages(app.conf.task_default_queue) == []
        # Called eagerly, the arguments never travel: the text is the caller's, and the task runs on it.
        assert app.tasks[task].apply(args, kwargs).get() is not None

    def test_eager_mode(self, make_app):
        """task_always_eager runs through the serializer and returns plaintext."""
        app = make_app(task_always_eager=True)
        assert app.tasks["t.charge"].delay(CARD, 5).get()["card_number"] == CARD

    def test_eager_failures_are_scrubbed_too(self, make_app, caplog):
        """An eager call is never sealed, yet its failure's text, stored result and logs hide the card."""
        app = make_app(task_always_eager=True, task_store_eager_result=True)
        with caplog.at_level(logging.DEBUG):
            result = app.tasks["t.fail"].delay(CARD)
        with pytest.raises(ValueError, match=r"card \[pii:redacted\] declined") as info:
            result.get()
        assert_no_plaintext(str(info.value))
        assert_no_plaintext(result.traceback or "")
        with redis_client(BACKEND_DB) as client:
            assert_no_plaintext(client.get(f"celery-task-meta-{result.id}"))
        assert_no_plaintext(caplog.text)

    def test_eager_map_and_starmap_of_a_pii_task(self, make_app, caplog):
        """They call the PII task as a function: their success lines and stored results showed its values.

        On a worker the built-in task opens the sealed items and runs as a PII task.
        """
        app = make_app(task_always_eager=True, task_store_eager_result=True, result_extended=True)
        with caplog.at_level(logging.INFO):
            mapped = app.tasks["t.echo"].map([CARD]).delay()
            starmapped = app.tasks["t.charge"].starmap([(CARD2, 1)]).delay()
        assert mapped.get()[0]["value"] == CARD
        assert starmapped.get()[0]["card_number"] == CARD2
        assert "succeeded" in caplog.text
        assert_no_plaintext(caplog.text)
        with redis_client(BACKEND_DB) as client:
            for result in (mapped, starmapped):
                stored = client.get(f"celery-task-meta-{result.id}")
                assert stored is not None
                assert_no_plaintext(stored)
        assert app.AsyncResult(mapped.id).get()[0]["value"] == CARD

    def test_a_task_run_inside_a_pii_task(self, make_app):
        """An inner task (eager) gives the outer one its context back; without PII options it shares it.

        Before the fix the inner task's end cleared the context, so the outer
        task's result was stored in plaintext; the inner one's too.
        """
        app = make_app(task_always_eager=True, task_store_eager_result=True)
        contexts = {}

        @app.task(shared=False, name="t.inner_plain")
        def inner_plain(value):
            contexts["inner"] = _context.running.get()
            return value

        @app.task(shared=False, name="t.outer", pii_fields=["card_number"])
        def outer(card_number):
            contexts["before"] = _context.running.get()
            inner = inner_plain.delay(card_number)
            contexts["after"] = _context.running.get()
            return {"card_number": card_number, "inner": inner.id}

        result = outer.delay(CARD)
        assert contexts["before"] is not None
        assert contexts["inner"] is contexts["after"] is contexts["before"]
        assert _context.running.get() is None  # nothing is left running after the outer task
        with redis_client(BACKEND_DB) as client:
            outer_meta = client.get(f"celery-task-meta-{result.id}")
            inner_meta = client.get(f"celery-task-meta-{result.get()['inner']}")
        assert MARKER.encode() in outer_meta
        assert MARKER.encode() in inner_meta
        assert_no_plaintext(outer_meta)
        assert_no_plaintext(inner_meta)
        assert app.AsyncResult(result.get()["inner"]).get() == CARD

    def test_an_inner_pii_task_has_its_own_context_that_hides_the_outer_values(self, make_app):
        """In a worker, a PII task applied inside a PII task gets its own context, hiding both tasks' values."""
        from celery.contrib.testing.worker import start_worker

        app = make_app()
        contexts = {}

        @app.task(shared=False, name="t.inner_pii", pii_fields=["email"])
        def inner_pii(email):
            contexts["inner"] = _context.running.get()

        @app.task(shared=False, name="t.outer_pii", pii_fields=["card_number"])
        def outer_pii(card_number):
            contexts["outer"] = _context.running.get()
            inner_pii.apply(args=(EMAIL,))
            contexts["after"] = _context.running.get()

        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            outer_pii.delay(CARD).get(timeout=20)
        assert contexts["outer"].values == [CARD]
        assert contexts["inner"] is not contexts["outer"]
        assert contexts["inner"].name == "t.inner_pii"
        # Its own value (applied directly, so never sealed), then the outer task's.
        assert contexts["inner"].values == [EMAIL, CARD]
        assert contexts["after"] is contexts["outer"]


class TestWire:
    """What sits in the broker: ciphertext and redacted headers."""

    def test_message_has_no_plaintext_and_redacted_reprs(self, app):
        """Body, decoded body, headers and properties hold no PII; argsrepr marks the sealed fields."""
        with EventCapture(app) as events:
            app.tasks["t.charge"].delay(CARD, 10, {"email": EMAIL, "tier": "gold"})
        (message,) = queued_messages(app.conf.task_default_queue)
        assert_no_plaintext(message_bytes(message))
        headers = message["headers"]
        assert headers["argsrepr"] == f"('{MARKER}', 10, {{'email': '{MARKER}', 'tier': 'gold'}})"
        assert headers["kwargsrepr"] == "{}"
        assert message["content-type"] == "application/x-celery-pii"
        (sent,) = events.of_type("task-sent")
        assert MARKER in sent["args"]
        assert_no_plaintext(repr(sent))

    @pytest.mark.parametrize("whose", ["the-message's", "the-step's"])
    def test_a_carried_steps_shadow_hides_the_sealed_values(self, app, whose):
        """``sig.set(shadow=...)`` on a chain step travels in the carrying message's body."""
        from celery_pii._redact import REDACTED

        if whose == "the-step's":
            step = app.tasks["t.echo"].si(EMAIL).set(shadow=f"notify {EMAIL}")
            shown = f"notify {REDACTED}"
        else:
            step = app.tasks["t.plain"].si("x").set(shadow=f"refund {CARD}")
            shown = f"refund {REDACTED}"
        chain(app.tasks["t.echo"].si(CARD), step).delay()
        (message,) = queued_messages(app.conf.task_default_queue)
        assert_no_plaintext(message_bytes(message))
        (carried,) = json.loads(base64.b64decode(message["body"])[2:])[2]["chain"]
        assert carried["options"]["shadow"] == shown
        assert step.options["shadow"] != shown  # the caller's signature is left as it was

    def test_celery_settings_changed_after_setup_pii_apply(self, app):
        """Celery reads its publishing settings when it first publishes: setup_pii must not read them early.

        Wrapping Celery's task sender at setup built it then: compression and
        delivery mode set afterwards were ignored.
        """
        app.conf.task_compression = "zlib"
        app.conf.task_default_delivery_mode = "transient"
        app.tasks["t.echo"].delay(CARD)
        (message,) = queued_messages(app.conf.task_default_queue)
        assert message["headers"]["compression"] == "application/x-gzip"
        assert message["properties"]["delivery_mode"] == 1

    @pytest.mark.parametrize("given", ["shadow_name", "shadow"])
    def test_a_shadow_name_made_from_a_declared_value_hides_it(self, app, given, caplog):
        """``shadow_name`` sees the arguments before sealing: its name went out in the header, logs, events."""
        from celery.contrib.testing.worker import start_worker

        from celery_pii._redact import REDACTED

        def shadow_name(task, args, kwargs, options):
            return f"notify-{args[0]}"

        options = {"shadow_name": shadow_name} if given == "shadow_name" else {}

        @app.task(shared=False, name="t.shadowed", pii_fields=["email"], **options)
        def shadowed(email):
            return email

        sent = shadowed.apply_async((EMAIL,), shadow=f"notify-{EMAIL}" if given == "shadow" else None)
        (message,) = queued_messages(app.conf.task_default_queue)
        assert message["headers"]["shadow"] == f"notify-{REDACTED}"
        assert_no_plaintext(message_bytes(message))
        worker = start_worker(
            app, pool="solo", perform_ping_check=False, shutdown_timeout=20, loglevel="INFO"
        )
        with caplog.at_level(logging.INFO), EventCapture(app) as events, worker:
            assert sent.get(timeout=20) == EMAIL
        assert f"notify-{REDACTED}[{sent.id}] received" in caplog.text
        assert_no_plaintext(caplog.text)
        assert_no_plaintext(repr(events.of_type("task-received")))

    @pytest.mark.parametrize("asked", ["json", "yaml"])
    def test_a_call_asking_for_another_serializer_is_written_by_pii(self, app, asked):
        """``apply_async(serializer="json")`` (and ``celery call``, json by default) still runs.

        The sealed body was written as json: workers refused the content type
        and parked the message, and the caller's result never came.
        """
        from celery.contrib.testing.worker import start_worker

        result = app.tasks["t.echo"].apply_async((CARD,), serializer=asked)
        (message,) = queued_messages(app.conf.task_default_queue)
        assert message["content-type"] == "application/x-celery-pii"
        assert_no_plaintext(message_bytes(message))
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            assert result.get(timeout=20)["value"] == CARD

    def test_a_callers_own_argsrepr_does_not_reach_the_broker(self, app):
        """``apply_async(argsrepr=..., kwargsrepr=...)``, Celery's way to hide arguments, written from them.

        celery-pii replaced the headers, but Celery also handed the options on
        as message properties: Redis kept the card and email there in plaintext.
        """
        app.tasks["t.charge"].apply_async(
            (CARD, 3),
            {"customer": {"email": EMAIL}},
            argsrepr=f"({CARD!r}, 3)",
            kwargsrepr=f"{{'email': {EMAIL!r}}}",
        )
        (message,) = queued_messages(app.conf.task_default_queue)
        assert_no_plaintext(message_bytes(message))
        assert "argsrepr" not in message["properties"]
        assert MARKER in message["headers"]["argsrepr"]

    def test_a_field_given_as_an_apply_async_option_is_refused(self, app):
        """``charge.apply_async((card, 3), customer={...})``: an option, not an argument, sent as a property.

        Celery takes it (``customer`` has a default) and hands it to the broker
        as a message property: Redis kept the email in plaintext, and the task
        ran without a customer.  Celery's own options pass, whatever fields are named.
        """
        with pytest.raises(EncryptionFailed, match=r"'customer' was given as an apply_async option") as info:
            app.tasks["t.charge"].apply_async((CARD, 3), customer={"email": EMAIL})
        assert_no_plaintext(str(info.value))
        assert queued_messages(app.conf.task_default_queue) == []
        app.tasks["t.headers_field"].apply_async((EMAIL,), {"headers": {"auth": "x"}}, headers={"trace": "1"})
        (message,) = queued_messages(app.conf.task_default_queue)
        assert_no_plaintext(message_bytes(message))
        assert message["headers"]["trace"] == "1"

    def test_a_task_registered_past_the_hook_is_sealed_and_opened(self, app, caplog):
        """A task put in the registry with ``dict.__setitem__`` (another extension's registry, say).

        Its pii_fields were never read: it was published with the card in
        plaintext, argsrepr included, without a warning.
        """
        from celery import Task
        from celery.contrib.testing.worker import start_worker

        class Late(Task):
            name = "t.late"
            pii_fields = ("card_number",)

            def run(self, card_number):
                return {"ends": card_number[-4:]}

        late = Late()
        late.bind(app)
        dict.__setitem__(app._tasks, late.name, late)
        with caplog.at_level(logging.WARNING):
            result = app.tasks["t.late"].delay(CARD)
        assert "t.late was registered past celery-pii's hook" in caplog.text
        (message,) = queued_messages(app.conf.task_default_queue)
        assert_no_plaintext(message_bytes(message))
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            assert result.get(timeout=20) == {"ends": CARD[-4:]}

    def test_a_field_of_a_task_whose_signature_was_lost_is_sealed_by_position_too(self, app):
        """A decorator without functools.wraps leaves ``(*args, **kwargs)``: the card, given by position, is sealed.

        Which extra positional argument is the declared field cannot be told,
        so all of them are sealed.
        """
        app.tasks["t.wrapped"].delay(CARD, 10)
        (message,) = queued_messages(app.conf.task_default_queue)
        assert_no_plaintext(message_bytes(message))
        assert message["headers"]["argsrepr"] == f"('{MARKER}', '{MARKER}')"

    def test_a_subject_of_a_task_whose_signature_was_lost_must_come_by_name(self, app):
        """Its key must be the subject's own: given by position it cannot be told, and nothing is published.

        The first extra positional argument was taken for it (the email here), so
        forgetting the real subject left the message readable.
        """
        profile = app.tasks["t.wrapped_profile"]
        with pytest.raises(EncryptionFailed, match="pii_subject 'user_id' is absent"):
            profile.delay(EMAIL, "user-42")
        assert queued_messages(app.conf.task_default_queue) == []
        profile.delay(EMAIL, user_id="user-42")
        (message,) = queued_messages(app.conf.task_default_queue)
        key_id = _envelope.parse(_envelopes_of(message)[0]).key_id
        assert key_id == get_pii(app).keys.subject_key_id("user-42")[0]

    @pytest.mark.parametrize(
        ("name", "call", "argsrepr"),
        [
            # The wrapper gives the function a first argument: the caller's first is the card.
            ("t.with_session", (CARD, 10), f"('{MARKER}', '{MARKER}')"),
            # The wrapper takes a first argument of its own: the caller's second is the card.
            ("t.for_tenant", ("acme", CARD, 10), f"('acme', '{MARKER}', '{MARKER}')"),
        ],
    )
    def test_a_decorator_that_changes_the_call_seals_by_the_callers_arguments(
        self, app, name, call, argsrepr
    ):
        """Bound by the wrapper Celery calls, not the function behind ``__wrapped__``; the task gets its values.

        ``functools.wraps`` points ``__wrapped__`` at the inner function, whose
        positions are not the caller's here: the card went out in plaintext and
        the argument beside it was sealed.
        """
        from celery.contrib.testing.worker import start_worker

        result = app.tasks[name].apply_async(call)
        (message,) = queued_messages(app.conf.task_default_queue)
        assert_no_plaintext(message_bytes(message))
        assert message["headers"]["argsrepr"] == argsrepr
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            assert result.get(timeout=20)["card_number"] == CARD

    def test_a_subject_behind_a_decorator_that_changes_the_call_must_come_by_name(self, app):
        """By position it could be another argument (the email here), and forgetting the subject missed it."""
        from celery.contrib.testing.worker import start_worker

        profile = app.tasks["t.with_session_profile"]
        with pytest.raises(EncryptionFailed, match=r"pii_subject 'user_id' is absent.*pass it by keyword"):
            profile.delay("user-42", EMAIL)
        assert queued_messages(app.conf.task_default_queue) == []
        result = profile.delay(user_id="user-42", email=EMAIL)
        (message,) = queued_messages(app.conf.task_default_queue)
        assert_no_plaintext(message_bytes(message))
        assert (
            _envelope.parse(_envelopes_of(message)[0]).key_id
            == get_pii(app).keys.subject_key_id("user-42")[0]
        )
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            assert result.get(timeout=20) == {"session": "session-1", "user_id": "user-42", "email": EMAIL}

    def test_a_field_inside_a_value_of_another_shape_is_sealed_with_it(self, app):
        """``customer.email`` with the customer as JSON text or a namedtuple: the customer is sealed whole.

        Plain Celery takes both (a namedtuple is written as a list); the path
        found no dict, counted as absent, and the email went out in plaintext.
        """
        from typing import NamedTuple

        from celery.contrib.testing.worker import start_worker

        class Customer(NamedTuple):
            email: str
            tier: str

        customer = Customer(EMAIL, "gold")
        as_text = json.dumps({"email": EMAIL, "tier": "gold"})
        items = [{"serial": "SN-1"}, f"serial {CARD}"]
        results = [
            app.tasks["t.charge"].delay(CARD, 1, as_text, items),
            app.tasks["t.charge"].delay(CARD, 2, customer=customer),
        ]
        messages = queued_messages(app.conf.task_default_queue)
        for message in messages:
            assert_no_plaintext(message_bytes(message))
        assert [m["headers"]["argsrepr"] for m in messages] == [
            f"('{MARKER}', 1, '{MARKER}', [{{'serial': '{MARKER}'}}, '{MARKER}'])",
            f"('{MARKER}', 2)",
        ]
        assert messages[1]["headers"]["kwargsrepr"] == f"{{'customer': '{MARKER}'}}"
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            assert results[0].get(timeout=20) == {
                "card_number": CARD,
                "amount": 1,
                "customer": as_text,
                "items": items,
            }
            assert results[1].get(timeout=20)["customer"] == [EMAIL, "gold"]  # a list, as without celery-pii

    def test_a_decorator_declaring_its_signature_seals_only_the_fields(self, app):
        """A wrapper that passes its arguments on unchanged and sets ``__signature__`` is bound by it."""
        from celery.contrib.testing.worker import start_worker

        result = app.tasks["t.passed_through"].delay(CARD, 10)
        (message,) = queued_messages(app.conf.task_default_queue)
        assert_no_plaintext(message_bytes(message))
        assert message["headers"]["argsrepr"] == f"('{MARKER}', 10)"
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            assert result.get(timeout=20) == {"card_number": CARD, "amount": 10}

    def test_serializer_refuses_unsealed_task_bodies(self, app):
        """A task body that did not pass setup_pii's publish step is refused, not sent."""
        body = ((CARD,), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
        with pytest.raises(EncodeError, match="setup_pii") as info:
            serialization.dumps(body, serializer="pii")
        assert_no_plaintext(str(info.value))

    def test_app_without_setup_cannot_publish_plaintext(self, app):
        """Another app in the process using the pii serializer without setup_pii cannot publish."""
        from celery import Celery

        other = Celery("other", broker=app.conf.broker_url, set_as_current=False)
        other.conf.update(task_serializer="pii", task_default_queue=app.conf.task_default_queue)
        with pytest.raises(EncodeError):
            other.send_task("t.charge", args=(CARD, 1))
        assert queued_messages(app.conf.task_default_queue) == []

    def test_control_messages_pass_through(self, app, worker):
        """inspect/control messages are encoded by the same serializer and still work."""
        # A broadcast sent before the worker's control consumer is bound is dropped
        # (fanout): ask again rather than fail on start-up timing.
        replies = None
        for _ in range(3):
            replies = app.control.inspect(timeout=5, limit=1).ping()  # one worker: its reply ends the wait
            if replies:
                break
        assert replies and all(reply == {"ok": "pong"} for reply in replies.values())


class TestTypedLookalikes:
    """A dict shaped like kombu's typed JSON beside a date is refused when sealed, not read as forged.

    With a datetime (Decimal, UUID, bytes) in the same envelope, the values
    travel as kombu's typed JSON, whose reader takes ``{"__type__": ...,
    "__value__": ...}`` for a typed value: an authentic message was parked as
    tampered (or the dict came back a datetime).
    """

    LOOKALIKE: ClassVar = {"__type__": "datetime", "__value__": "soon"}

    def test_a_message_is_refused_naming_the_task(self, app):
        import datetime as dt

        with pytest.raises(
            EncryptionFailed, match=r"^task 't\.charge': the PII values hold a dict of exactly"
        ):
            app.tasks["t.charge"].delay(self.LOOKALIKE, 1, {"email": dt.date(2024, 1, 1)})
        assert not queued_messages(app.conf.task_default_queue)

    def test_alone_it_seals_and_opens_as_given(self, app):
        """Without a typed value beside it, plain JSON carries it: nothing reads it as a type."""
        sealer = get_pii(app).sealer
        root = {"args": [self.LOOKALIKE, 1, {"email": EMAIL}], "kwargs": {}}
        sealed = sealer.seal_message("t.charge", "l-1", root)
        opened = {"args": [*sealed.root["args"]], "kwargs": {}}
        opened["args"][2] = dict(opened["args"][2])
        sealer.open_message("t.charge", "l-1", opened, [sealed.token])
        assert opened["args"][0] == self.LOOKALIKE

    def test_a_result_is_refused_when_sealed(self, app):
        import datetime as dt

        from celery_pii._keys import KeySpec

        meta = {"status": "SUCCESS", "result": [self.LOOKALIKE, dt.date(2024, 1, 1)], "task_id": "l-2"}
        with pytest.raises(EncryptionFailed, match="would not read back as given"):
            get_pii(app).sealer.seal_result(meta, task_id="l-2", key_spec=KeySpec("default"))


class TestCompression:
    """Only the task's declared fields are compressed together (pii_compression_threshold).

    Compressed beside values a caller controls, a secret's ciphertext length
    tells it a character at a time (CRIME): a crypto review recovered an SSN
    from the length of a stored result (result_extended seals every argument
    with it).  Envelopes holding more than the declared fields are not compressed.
    """

    BIG = "note " * 400  # compresses well, and is over the 1024-byte threshold

    @staticmethod
    def _compressed(token):
        from celery_pii._envelope import parse

        return parse(token).compressed

    def test_declared_fields_alone_are_compressed(self, app):
        """The task's declared fields alone: as before (the user chose what to declare together)."""
        sealed = get_pii(app).sealer.seal_message(
            "t.charge", "c-1", {"args": [self.BIG, 1, {"email": EMAIL}], "kwargs": {}}
        )
        assert self._compressed(sealed.token)

    @pytest.mark.parametrize("case", ["every argument", "with a canvas step", "found by detection"])
    def test_envelopes_holding_more_are_not_compressed(self, app, case):
        """Every argument (published by a PII task, or a task not known here), a step's, detection's."""
        sealer = get_pii(app).sealer
        if case == "every argument":
            sealed = sealer.seal_message(
                "t.charge", "c-2", {"args": [self.BIG, 1, {"email": EMAIL}], "kwargs": {}}, seal_all=True
            )
        elif case == "with a canvas step":
            step = dict(app.tasks["t.charge"].s(CARD, 2, {"email": EMAIL}))
            root = {"args": [self.BIG, 1, {"email": EMAIL}], "kwargs": {}, "callbacks": [step]}
            sealed = sealer.seal_message("t.charge", "c-3", root)
        else:
            sealed = sealer.seal_message(
                "t.detect_encrypt", "c-4", {"args": [f"{self.BIG} {EMAIL}"], "kwargs": {}}
            )
        assert sealed is not None and sealed.token is not None
        assert not self._compressed(sealed.token)

    def test_results_are_not_compressed(self, app):
        """A result is sealed beside its traceback and (result_extended) every argument."""
        from celery_pii._keys import KeySpec
        from celery_pii._sealer import RESULT_KEY

        meta = {"status": "SUCCESS", "result": self.BIG, "task_id": "c-5", "args": [CARD], "kwargs": {}}
        sealed = get_pii(app).sealer.seal_result(meta, task_id="c-5", key_spec=KeySpec("default"))
        assert not self._compressed(sealed[RESULT_KEY])


class TestCanvas:
    """Embedded steps are sealed under their own task's fields and open when published."""

    def test_chain(self, app, worker):
        """A chain's later step (embedded in the first message) receives exact plaintext."""
        result = chain(app.tasks["t.charge"].s(CARD, 1), app.tasks["t.notify"].s(EMAIL)).delay()
        final = result.get(timeout=30)
        assert final["email"] == EMAIL
        assert final["previous"]["card_number"] == CARD

    def test_chain_message_embeds_sealed_steps(self, app):
        """The first message of a chain carries later steps' arguments sealed."""
        chain(app.tasks["t.charge"].s(CARD, 1), app.tasks["t.notify"].s(EMAIL)).delay()
        (message,) = queued_messages(app.conf.task_default_queue)
        assert_no_plaintext(message_bytes(message))

    def test_link_and_link_error(self, app, worker, testapp_module):
        """link and link_error steps get plaintext; an inline errback too."""
        testapp_module.RECEIVED.clear()
        linked = app.tasks["t.charge"].apply_async((CARD, 2), link=app.tasks["t.notify"].s(EMAIL))
        assert linked.get(timeout=20)["card_number"] == CARD
        failed = app.tasks["t.fail"].apply_async((CARD2,), link_error=app.tasks["t.on_error"].s(EMAIL2))
        with pytest.raises(ValueError):
            failed.get(timeout=20)
        child = linked.children[0] if linked.children else None
        if child is not None:
            assert child.get(timeout=20)["email"] == EMAIL
        # Celery stores the failure before it calls the errback: get() can return first.
        deadline = time.monotonic() + 20
        while not testapp_module.RECEIVED and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {"email": EMAIL2, "exc": "ValueError"} in testapp_module.RECEIVED

    def test_map_starmap_and_chunks_messages_are_sealed(self, app):
        """The item lists of task.map / starmap / chunks carry the called task's PII: sealed."""
        app.tasks["t.echo"].map([CARD, EMAIL]).delay()
        app.tasks["t.charge"].starmap([(CARD, 1), (CARD2, 2)]).delay()
        app.tasks["t.charge"].chunks([(CARD, 1), (CARD2, 2)], 1).delay()
        app.tasks["t.plain"].map([1, 2]).delay()
        messages = queued_messages(app.conf.task_default_queue)
        # chunks are published by the caller as a group of starmap messages, one per chunk.
        assert [m["headers"]["task"] for m in messages] == [
            "celery.map",
            "celery.starmap",
            "celery.starmap",
            "celery.starmap",
            "celery.map",
        ]
        for message in messages[:4]:
            assert_no_plaintext(message_bytes(message))
            assert _envelopes_of(message)
        # A task without PII: its items stay as they are.
        assert not _envelopes_of(messages[4])

    def test_map_starmap_and_chunks_inside_canvas_are_sealed(self, app):
        """As a chain step or a link, and the called signature's own arguments: sealed too.

        An embedded map is a registered task without PII of its own, so its
        items (a PII task's arguments) went out in plaintext; and a map's
        called signature kept the arguments it was given (``echo.s(label=...)``).
        """
        plain, echo, charge = app.tasks["t.plain"], app.tasks["t.echo"], app.tasks["t.charge"]
        chain(plain.si(1), echo.map([CARD, EMAIL])).delay()
        chain(plain.si(2), charge.starmap([(CARD, 1)])).delay()
        chain(plain.si(3), charge.chunks([(CARD, 1)], 1)).delay()
        plain.si(4).apply_async(link=echo.map([EMAIL]))
        xmap(echo.s(label=EMAIL2), [1, 2], app=app).delay()
        xstarmap(echo.s(label=EMAIL2), [(1,)], app=app).delay()
        messages = queued_messages(app.conf.task_default_queue)
        assert len(messages) == 6
        for message in messages:
            assert_no_plaintext(message_bytes(message) + json.dumps(message["headers"]).encode())
            assert _envelopes_of(message)

    def test_map_inside_a_chain_runs_on_plaintext(self, app, worker):
        """The embedded map is opened by the step before it and sealed again when published."""
        mapped = chain(app.tasks["t.plain"].si(1), app.tasks["t.echo"].map([CARD, EMAIL])).delay()
        assert [r["value"] for r in mapped.get(timeout=30)] == [CARD, EMAIL]

    def test_map_starmap_and_chunks_run_on_plaintext(self, app, worker):
        """The called task receives each item's exact plaintext; the results come back, stored sealed."""
        mapped = app.tasks["t.echo"].map([CARD, EMAIL]).delay()
        assert [r["value"] for r in mapped.get(timeout=30)] == [CARD, EMAIL]
        starmapped = app.tasks["t.charge"].starmap([(CARD, 1), (CARD2, 2)]).delay()
        charged = starmapped.get(timeout=30)
        assert [(r["card_number"], r["amount"]) for r in charged] == [(CARD, 1), (CARD2, 2)]
        chunked = app.tasks["t.charge"].chunks([(CARD, 1), (CARD2, 2)], 1).delay()
        assert [[r["card_number"] for r in part] for part in chunked.get(timeout=30)] == [[CARD], [CARD2]]
        # The stored metas (with result_extended: the items as arguments too) hold no plaintext.
        with redis_client(BACKEND_DB) as client:
            for result in (mapped, starmapped, *chunked.results):
                stored = client.get(f"celery-task-meta-{result.id}")
                assert stored is not None
                assert_no_plaintext(stored)

    def _chords_with_canvas_in_their_headers(self, app):
        """A chain and a chord inside a chord's header: Celery hands them the chord's body in their options."""
        plain, echo, collect = app.tasks["t.plain"], app.tasks["t.echo"], app.tasks["t.collect"]
        return [
            chord([chain(echo.si(CARD2), plain.s()), echo.s(CARD)], collect.s(EMAIL2)),
            chord([chord([echo.s(CARD), echo.s(SSN)], collect.s(EMAIL)), echo.s(CARD2)], collect.s(EMAIL2)),
        ]

    def test_a_chords_body_carried_by_canvas_in_its_header_is_sealed(self, app):
        """The body's declared email went out in plaintext in every header task's message that carried it."""
        for canvas in self._chords_with_canvas_in_their_headers(app):
            canvas.delay()
        messages = queued_messages(app.conf.task_default_queue)
        assert len(messages) == 5  # the header tasks: two, then the inner chord's two and a plain one
        for message in messages:
            assert_no_plaintext(message_bytes(message))
            assert _envelopes_of(message)

    def test_a_chords_body_carried_by_canvas_in_its_header_runs_on_plaintext(self, app, worker):
        """Opened again by the worker: each body receives its own values."""
        simple, nested = (canvas.delay() for canvas in self._chords_with_canvas_in_their_headers(app))
        final = simple.get(timeout=30)
        assert final["email"] == EMAIL2
        assert sorted(r["value"] for r in final["results"]) == sorted([CARD, CARD2])
        final = nested.get(timeout=30)
        assert final["email"] == EMAIL2
        inner, other = final["results"]
        assert inner["email"] == EMAIL
        assert [r["value"] for r in inner["results"]] == [CARD, SSN]
        assert other["value"] == CARD2

    def test_steps_chained_after_a_chord_are_sealed(self, app):
        """Celery hands them to the chord's body in its options (``chain``): they went out in plaintext."""
        echo, collect, notify = app.tasks["t.echo"], app.tasks["t.collect"], app.tasks["t.notify"]
        chain(chord([echo.s(CARD)], collect.s(EMAIL)), notify.s(EMAIL2)).delay()
        (message,) = queued_messages(app.conf.task_default_queue)
        assert_no_plaintext(message_bytes(message))

    def test_steps_chained_after_a_chord_run_on_plaintext(self, app, worker):
        """A chord inside a chain, the worker publishing its header: nothing in plaintext, values opened."""
        echo, collect, notify = app.tasks["t.echo"], app.tasks["t.collect"], app.tasks["t.notify"]
        canvas = chain(echo.s(CARD), chord([notify.s(EMAIL)], collect.s(EMAIL2)), notify.s(SSN))
        with RedisMonitor() as monitor:
            final = canvas.delay().get(timeout=30)
        assert final["email"] == SSN
        assert final["previous"]["email"] == EMAIL2
        assert final["previous"]["results"][0]["email"] == EMAIL
        assert_no_plaintext(monitor.captured())

    def test_a_header_task_replaced_by_a_group_seals_the_chords_body(self, app, worker):
        """Task.replace(group) in a header: the worker publishes the group with the body in its options."""
        monitor = RedisMonitor()
        with monitor:
            result = chord([app.tasks["t.echo_in_group"].s(CARD)], app.tasks["t.collect"].s(EMAIL2)).delay()
            final = result.get(timeout=30)
        assert final["email"] == EMAIL2
        assert_no_plaintext(monitor.captured())

    def test_group_and_chord_native_join(self, app, worker):
        """A chord on Redis (native join): header and body receive plaintext."""
        header = group(app.tasks["t.echo"].s(value) for value in (CARD, EMAIL))
        result = chord(header)(app.tasks["t.collect"].s(EMAIL2))
        final = result.get(timeout=30)
        assert final["email"] == EMAIL2
        assert sorted(r["value"] for r in final["results"]) == sorted([CARD, EMAIL])

    def test_chord_unlock_on_database_backend(self, make_app, key_store_url):
        """Without native join, celery.chord_unlock carries the body: sealed, and it still completes."""
        from celery.contrib.testing.worker import start_worker

        backend = "db+" + key_store_url
        app = make_app(backend=backend, result_extended=True)
        header = group(app.tasks["t.echo"].s(value) for value in (CARD,))
        result = chord(header)(app.tasks["t.collect"].s(EMAIL2))
        messages = queued_messages(app.conf.task_default_queue)
        unlock = [m for m in messages if m["headers"]["task"] == "celery.chord_unlock"]
        assert unlock, "chord_unlock was published"
        for message in messages:
            assert_no_plaintext(message_bytes(message))
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            final = result.get(timeout=60)
        assert final["email"] == EMAIL2
        assert [r["value"] for r in final["results"]] == [CARD]

    def test_a_database_backends_traceback_column_is_sealed(self, make_app, key_store_url):
        """The traceback column, written outside any serializer, holds a PII task's traceback sealed.

        It held the scrubbed text: a value the task derived from a declared
        field (the card with dashes) was stored there in plaintext.
        Readers with the key get the traceback back; other tasks' stay as they are.
        """
        import sqlalchemy as sa
        from celery.contrib.testing.worker import start_worker

        app = make_app(backend="db+" + key_store_url)
        failing = app.tasks["t.fail_derived"].delay(CARD)
        plain = app.tasks["t.lookup_fail"].delay("SKU-7")
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            with pytest.raises(ValueError, match="declined"):
                failing.get(timeout=20)
            with pytest.raises(LookupError, match="SKU-7"):
                plain.get(timeout=20)
        engine = sa.create_engine(key_store_url)
        try:
            with engine.connect() as connection:
                stored = dict(
                    connection.execute(
                        sa.text("SELECT task_id, traceback FROM celery_taskmeta WHERE task_id IN (:a, :b)"),
                        {"a": failing.id, "b": plain.id},
                    ).all()
                )
        finally:
            engine.dispose()
        assert CARD.replace(" ", "-") not in stored[failing.id]
        assert stored[failing.id].startswith(f"{MARKER}\n")
        assert "no such item SKU-7" in stored[plain.id]
        reread = app.AsyncResult(failing.id)
        assert f"card {CARD.replace(' ', '-')} declined" in reread.traceback

    def test_chord_unlock_retrying_from_the_worker(self, make_app, key_store_url):
        """chord_unlock re-publishes itself while the header runs: sealed whole, and the chord completes.

        Published from a running task that opened PII, its arguments are all
        sealed, the chord body with them (never the body's places a second time).
        """
        from celery.contrib.testing.worker import start_worker

        app = make_app(backend="db+" + key_store_url)
        result = chord(group(app.tasks["t.slow"].s(EMAIL, 2.0)))(app.tasks["t.collect"].s(EMAIL2))
        with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=20):
            final = result.get(timeout=60)
        assert final["email"] == EMAIL2
        assert final["results"] == [EMAIL]


class TestSendTaskByName:
    """``send_task`` by name seals too: before the app is finalized, and for tasks it does not know."""

    def test_before_the_app_is_finalized(self, make_app):
        """The declared fields of a task still pending registration are sealed, and the worker opens them."""
        from celery.contrib.testing.worker import start_worker

        app = make_app()
        assert not app.finalized
        result = app.send_task("t.echo", args=[CARD])
        (message,) = queued_messages(app.conf.task_default_queue)
        assert_no_plaintext(message_bytes(message))
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            assert result.get(timeout=20)["value"] == CARD

    def test_task_unknown_here_has_every_argument_sealed(self, make_app):
        """Which arguments of a task this process does not know are PII cannot be told: all are sealed."""
        app = make_app()
        app.finalize()
        app.send_task("elsewhere.charge", args=[CARD, 99.5], kwargs={"customer": {"email": EMAIL}})
        (message,) = queued_messages(app.conf.task_default_queue)
        assert_no_plaintext(message_bytes(message))
        assert message["headers"]["argsrepr"] == repr((MARKER, MARKER))
        sealed = _envelope.parse(json.loads(base64.b64decode(message["body"])[2:])[2][EMBED_KEY][0])
        assert sealed.locations == (("args", 0), ("args", 1), ("kwargs", "customer"))


class TestSubjects:
    """The data subject's id names whom a message is about: sealed like a declared field."""

    def test_subject_id_is_sealed_and_comes_back(self, app):
        """``pii_subject`` alone seals the subject's id; the task still receives it exactly."""
        from celery.contrib.testing.worker import start_worker

        subject = "subject-ann@example.com"
        result = app.tasks["t.profile"].delay(subject, EMAIL)
        (message,) = queued_messages(app.conf.task_default_queue)
        assert subject not in message_bytes(message).decode(errors="replace")
        assert MARKER in message["headers"]["argsrepr"]
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            assert result.get(timeout=20) == {"user_id": subject, "email": EMAIL}

    def test_a_declared_key_the_caller_gave_as_a_number_is_sealed(self, app):
        """codes["1"] names {1: card} too: JSON makes it {"1": card}, which the worker opens.

        The publisher looked for the str key only: the card went to the broker
        in plaintext and the worker refused the message as unsealed.
        """
        from celery.contrib.testing.worker import start_worker

        result = app.tasks["t.codes"].delay({1: CARD, 2: "kept"})
        (message,) = queued_messages(app.conf.task_default_queue)
        assert_no_plaintext(message_bytes(message))
        assert_no_plaintext(message["headers"]["argsrepr"])
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            assert result.get(timeout=20) == {"1": CARD, "2": "kept"}

    @pytest.mark.parametrize("linked", [False, True], ids=["declared-fields", "with-a-link"])
    def test_a_declared_key_given_both_as_number_and_text_is_refused(self, app, linked):
        """{1: card, "1": x} is written by JSON with "1" twice: one value would leave unsealed.

        The publisher sealed the str key's value and sent the card under the
        int key in plaintext (a worker's JSON reader then kept the last one).
        A call with a link takes the general sealing path.
        """
        link = app.tasks["t.plain"].s() if linked else None
        with pytest.raises(
            EncryptionFailed, match=r"t\.codes.*codes\[\"1\"\].*two keys JSON writes alike"
        ) as raised:
            app.tasks["t.codes"].apply_async(({1: CARD, "1": "gold"},), link=link)
        assert CARD not in str(raised.value)
        assert queued_messages(app.conf.task_default_queue) == []

    @pytest.mark.parametrize(
        "subject",
        [None, {"id": "u-1"}, ["u-1"], True, 42.0, "", "  ", 10**5000, "u-\ud800"],
        ids=["none", "dict", "list", "bool", "float", "empty", "blank", "huge-int", "lone-surrogate"],
    )
    def test_a_subject_that_is_not_one_id_is_refused(self, app, subject):
        """None or a blank string (every such call would share one key), a container (keyed by all its
        fields), an integer Python will not write as text or text UTF-8 cannot write is no id.

        The last two raised Python's own ValueError and UnicodeEncodeError; a blank one was taken.
        """
        with pytest.raises(
            EncryptionFailed, match=r"t\.profile.*pii_subject 'user_id' is (absent|not a data subject)"
        ):
            app.tasks["t.profile"].delay(subject, EMAIL)
        assert not queued_messages(app.conf.task_default_queue)
        if isinstance(subject, str) and not subject.strip():  # earlier builds took it: its keys can go
            assert get_pii(app).forget_subject(subject) == 0
            return
        with pytest.raises(
            ConfigurationError, match=r"must be a string .*, an integer of at most 256 bits or a UUID"
        ):
            get_pii(app).forget_subject(subject)

    def test_a_subject_is_named_by_its_text_as_unicode_reads_it(self, app):
        """An erasure given the decomposed form of a composed name forgets that subject.

        Typed on a system that decomposes accents, ``forget_subject`` destroyed
        nothing (0, as for an unknown subject) and the data stayed readable.
        Case and spaces still matter: ``Ann`` and ``ann`` are two subjects.
        """
        import unicodedata

        composed = "zo\u00eb@example.com"
        decomposed = unicodedata.normalize("NFD", composed)
        assert composed != decomposed
        keys = get_pii(app).keys
        assert keys.subject_key_id(decomposed) == keys.subject_key_id(composed)
        assert keys.subject_key_id("Zo\u00eb@example.com") != keys.subject_key_id(composed)
        assert keys.subject_key_id(2**256 - 1) == keys.subject_key_id(str(2**256 - 1))
        pk = uuid.UUID("12345678-1234-5678-1234-567812345678")  # Django's UUIDField primary keys
        assert keys.subject_key_id(pk) == keys.subject_key_id(str(pk))
        app.tasks["t.profile"].delay(composed, EMAIL)
        assert get_pii(app).forget_subject(decomposed) == 1
        app.tasks["t.profile"].delay(pk, EMAIL)
        assert get_pii(app).forget_subject(str(pk)) == 1


def _run_msgpack_app(tmp_path, key_store_url, queue_name, code, **conf):
    """Run ``code`` (formatted with CARD and EMAIL) with ``app``, a test app on msgpack, in a process of its own.

    The inner serializer is one per process.  Returns the JSON ``code`` printed last.
    """
    import subprocess
    import sys
    import textwrap

    from .conftest import APP_DIR, BROKER_DB, REDIS_URL

    script = tmp_path / "msgpack_app.py"
    preamble = f"""
import json
from pii_testapp import make_app

app = make_app(broker={f"{REDIS_URL}/{BROKER_DB}"!r}, backend={f"{REDIS_URL}/{BACKEND_DB}"!r},
               key_store={key_store_url!r}, queue={queue_name!r}, pii_inner_serializer="msgpack", **{conf!r})
"""
    script.write_text(preamble + textwrap.dedent(code).format(CARD=CARD, EMAIL=EMAIL))
    done = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "PYTHONPATH": APP_DIR},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
