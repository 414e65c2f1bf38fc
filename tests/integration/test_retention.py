"""Retention and crypto-shredding: real beat and worker processes, Redis, PostgreSQL."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta

import pytest
from celery.contrib.testing.worker import start_worker

from celery_pii import ConfigurationError, KeyDestroyed, RetentionPolicy, get_pii
from celery_pii._keys import KeySpec
from celery_pii._retention import enforce
from celery_pii._store import utcnow

from .conftest import BACKEND_DB, BROKER_DB, REDIS_URL, queued_messages, redis_client
from .test_celery_roundtrip import EMAIL, assert_no_plaintext

pytestmark = pytest.mark.integration


def _stored_status(task_id):
    """The status of a stored result, read raw (it is not sealed; the result is)."""
    with redis_client(BACKEND_DB) as client:
        raw = client.get(f"celery-task-meta-{task_id}")
    return json.loads(raw[2:])["status"] if raw else None


def _wait(predicate, timeout=30.0, interval=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


class TestEnforceRetention:
    """pii.enforce_retention(now) destroys expired bucket keys: copies become unreadable."""

    def test_deadline_shreds_message_and_result(self, make_app, testapp_module):
        """After the deadline, a held copy of the message and the stored result no longer open."""
        app = make_app(result_extended=True)
        pii = get_pii(app)
        sent = app.tasks["t.retention_short"].delay(EMAIL)
        (held,) = queued_messages(app.conf.task_default_queue)
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            assert sent.get(timeout=20) == EMAIL
            report = pii.enforce_retention(now=utcnow() + timedelta(minutes=5))
            assert report.destroyed_versions >= 1 and report.complete
            assert any("@" in key_id for key_id in report.key_ids)
            assert_no_plaintext(json.dumps(report.to_dict()))
            with pytest.raises(KeyDestroyed, match="destroyed"):
                app.AsyncResult(sent.id).get(timeout=10)
            with redis_client(BROKER_DB) as client:
                client.lpush(app.conf.task_default_queue, json.dumps(held))
            assert _wait(lambda: _stored_status(sent.id) == "FAILURE")
            with pytest.raises(KeyDestroyed):
                app.AsyncResult(sent.id).get(timeout=20)
        denied = [r for r in pii.keys.audit_trail() if r.operation == "decrypt_denied"]
        assert any(r.details.get("task_id") == sent.id for r in denied)
        destroyed = [r for r in pii.keys.audit_trail() if r.operation == "destroy"]
        assert any(r.details.get("reason") == "retention" for r in destroyed)

    def test_runs_are_idempotent_and_bounded(self, make_app):
        """A second run destroys nothing; a bounded run says it is not complete."""
        app = make_app()
        pii = get_pii(app)
        future = utcnow() + timedelta(days=1)
        for i in range(3):
            pii.keys.encryption_key(KeySpec(f"bucket-{i}@x", expires_at=utcnow() + timedelta(seconds=30)))
        first = pii.enforce_retention(now=future)
        assert first.destroyed_versions >= 3
        assert pii.enforce_retention(now=future).destroyed_versions == 0
        for i in range(3):
            pii.keys.encryption_key(KeySpec(f"more-{i}@x", expires_at=utcnow() + timedelta(seconds=30)))
        partial = enforce(lambda now: pii.keys.destroy_expired(now, batch_size=1), future, max_batches=2)
        assert partial.destroyed_versions == 2
        assert not partial.complete

    @pytest.mark.parametrize("method", ["enforce_retention", "rotate_keys"])
    def test_a_now_without_time_zone_is_refused_naming_it(self, make_app, method):
        """Deadlines are UTC: a naive now is a clear error, not the store's SQL error."""
        pii = get_pii(make_app())
        with pytest.raises(ConfigurationError, match=rf"PII\.{method}: now must be timezone-aware"):
            getattr(pii, method)(now=datetime.now())  # noqa: DTZ005 - the naive time under test

    def test_delete_immediately_stores_nothing(self, make_app, testapp_module):
        """A delete_immediately() task runs but nothing of its outcome is kept in the backend."""
        app = make_app(result_extended=True)
        testapp_module.RECEIVED.clear()
        sent = app.tasks["t.immediate"].delay(EMAIL)
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            assert _wait(lambda: {"immediate": EMAIL} in testapp_module.RECEIVED)
        with redis_client(BACKEND_DB) as client:
            assert client.get(f"celery-task-meta-{sent.id}") is None

    def test_policies_are_per_task(self, make_app):
        """Each task's messages are sealed under a bucket key of its own policy."""
        app = make_app()
        app.finalize()
        pii = get_pii(app)
        spec = pii.specs["t.retention_short"]
        assert spec.retention == RetentionPolicy.delete_after(timedelta(seconds=5))
        assert pii.specs["t.charge"].retention == RetentionPolicy.keep_indefinitely()


class TestResultsHeldInMemory:
    """Results Celery keeps in a client's memory go when their keys go, as stored ones do.

    A new ``AsyncResult(id).get()`` in a process that had read the result
    before was answered from Celery's memory, in plaintext, after the
    subject's erasure or the result's retention deadline.
    """

    @pytest.mark.parametrize("backend", ["redis", "database"])
    def test_result_cache_max(self, make_app, key_store_url, backend):
        """``result_cache_max`` keeps successful results: one of a forgotten subject reads as gone."""
        app = make_app(
            result_cache_max=100, **({"backend": "db+" + key_store_url} if backend == "database" else {})
        )
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            forgotten = app.tasks["t.profile"].delay("u-held-1", EMAIL)
            kept = app.tasks["t.profile"].delay("u-held-2", EMAIL)
            for sent in (forgotten, kept):
                assert sent.get(timeout=20)["email"] == EMAIL
                assert app.AsyncResult(sent.id).get(timeout=5)["email"] == EMAIL  # from the cache
            assert get_pii(app).forget_subject("u-held-1") >= 1
            with pytest.raises(KeyDestroyed):
                app.AsyncResult(forgotten.id).get(timeout=5)
            assert app.AsyncResult(kept.id).get(timeout=5)["email"] == EMAIL

    def test_result_cache_max_with_a_group(self, make_app):
        """A group's results read together (join_native) come from the same cache: checked as well."""
        from celery import group

        app = make_app(result_cache_max=100)
        profile = app.tasks["t.profile"]
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            both = group(profile.s("u-held-3", EMAIL), profile.s("u-held-4", EMAIL))()
            both.save()
            assert [value["email"] for value in both.get(timeout=20)] == [EMAIL, EMAIL]
            assert get_pii(app).forget_subject("u-held-3") >= 1
            with pytest.raises(KeyDestroyed):
                app.GroupResult.restore(both.id).get(timeout=5)

    @pytest.mark.parametrize("backend", ["redis", "database"])
    def test_result_cache_max_with_a_restored_group(self, make_app, key_store_url, backend):
        """A group restored again is not the one read before: its results are read (and checked) again.

        Celery's cache kept the restored GroupResult itself, with the results
        its children had read: restored again, it served them in plaintext
        after the subject's erasure.
        """
        from celery import group

        app = make_app(
            result_cache_max=100, **({"backend": "db+" + key_store_url} if backend == "database" else {})
        )
        profile = app.tasks["t.profile"]
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            both = group(profile.s("u-held-5", EMAIL), profile.s("u-held-6", EMAIL))()
            both.save()
            restored = app.GroupResult.restore(both.id)
            assert [value["email"] for value in restored.get(timeout=20)] == [EMAIL, EMAIL]
            assert get_pii(app).forget_subject("u-held-5") >= 1
            again = app.GroupResult.restore(both.id)
            assert [child.id for child in again.results] == [child.id for child in both.results]
            with pytest.raises(KeyDestroyed):
                again.get(timeout=5)
            assert again.results[0].state == "FAILURE"
            assert again.results[1].get(timeout=5)["email"] == EMAIL

    def test_result_cache_max_with_a_parents_children(self, make_app):
        """The children of a cached result are new for each reader: a child read once is read (and checked) again.

        Celery's cache kept the parent's meta, and AsyncResult turned its
        children into result objects inside it: every new
        ``AsyncResult(parent).children`` got those objects, which served the
        child's result in plaintext after its subject's erasure.
        """
        app = make_app(result_cache_max=100)

        @app.task(shared=False, name="t.spawns_profile", pii_fields=["email"])
        def spawns_profile(user_id, email):
            return app.tasks["t.profile"].delay(user_id, email).id

        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            parent = spawns_profile.delay("u-held-7", EMAIL)
            child_id = parent.get(timeout=20)
            assert app.AsyncResult(child_id).get(timeout=20)["email"] == EMAIL
            (child,) = app.AsyncResult(parent.id).children
            assert child.id == child_id and child.get(timeout=5)["email"] == EMAIL
            assert get_pii(app).forget_subject("u-held-7") >= 1
            (again,) = app.AsyncResult(parent.id).children
            assert again is not child
            with pytest.raises(KeyDestroyed):
                again.get(timeout=5)
            assert app.AsyncResult(parent.id).get(timeout=5) == child_id  # the parent's own result stays

    @pytest.mark.parametrize("held_in", ["buffer", "result_cache_max"])
    def test_the_rpc_backend(self, make_app, held_in):
        """rpc:// reads with a get_task_meta of its own: .state and .result served the held plaintext.

        From its cache (result_cache_max), or a copy of what its consumer buffered
        (a result that arrived while another get() waited).
        """
        from .conftest import RABBITMQ_URL

        conf = {"result_cache_max": 100} if held_in == "result_cache_max" else {}
        app = make_app(broker=RABBITMQ_URL, backend="rpc://", **conf)
        profile = app.tasks["t.profile"]
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            first = profile.delay("u-rpc-1", EMAIL)
            if held_in == "result_cache_max":  # polled: the state read goes to the cache
                assert _wait(lambda: app.AsyncResult(first.id).state == "SUCCESS")
                assert app.backend._cache.get(first.id)["result"]["email"] == EMAIL
            else:
                second = profile.delay("u-rpc-2", EMAIL)
                assert second.get(timeout=20)["email"] == EMAIL  # the first's result arrives meanwhile
                assert first.id in app.backend._pending_messages
            assert get_pii(app).forget_subject("u-rpc-1") >= 1
            again = app.AsyncResult(first.id)
            assert again.state == "FAILURE"
            assert isinstance(again.result, KeyDestroyed)

    def test_the_redis_pubsub_buffer(self, make_app):
        """A result read by polling arrives again over pub/sub and waits in a buffer, opened.

        After the deadline (enforce_retention) a new read of it raises
        KeyDestroyed, as a read from the backend does.
        """
        app = make_app()
        pii = get_pii(app)
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            # Whether the early copy is left for the later read depends on how Celery's poll and
            # its pub/sub reads interleave (a read during the poll consumes it): a few pairs, then.
            for _ in range(5):
                early = app.tasks["t.retention_short"].delay(EMAIL)  # subscribed to its result
                assert _wait(lambda: _stored_status(early.id) == "SUCCESS")  # noqa: B023 - used at once
                assert early.get(timeout=10) == EMAIL  # read by polling: the published copy stays unread
                later = app.tasks["t.retention_short"].delay(EMAIL)
                assert later.get(timeout=10) == EMAIL  # reads the early copy too: into the buffer
                if early.id in app.backend.result_consumer._pending_messages:
                    break
            assert early.id in app.backend.result_consumer._pending_messages
            pii.enforce_retention(now=utcnow() + timedelta(minutes=5))
            with pytest.raises(KeyDestroyed):
                app.AsyncResult(early.id).get(timeout=5)


class TestPassedDeadline:
    """A message whose policy's deadline has already passed is not published, and the error says whose."""

    @pytest.mark.parametrize("with_canvas", [False, True])
    def test_the_error_names_the_task(self, make_app, with_canvas):
        """It named only the bucket key (``default@...``), an id the user never chose."""
        from celery_pii import EncryptionFailed

        app = make_app()
        passed = RetentionPolicy.delete_at(utcnow() - timedelta(days=1))

        @app.task(shared=False, name="t.deadline_passed", pii_fields=["email"], pii_retention=passed)
        def deadline_passed(email):
            return email

        call = deadline_passed.s(EMAIL)
        if with_canvas:  # the general path: a call that embeds a later step
            call = call.set(link=app.tasks["t.charge"].s())
        with pytest.raises(
            EncryptionFailed, match=r"^task 't.deadline_passed': the retention deadline"
        ) as info:
            call.delay()
        assert "nothing was sealed" in str(info.value)
        assert_no_plaintext(str(info.value))


@pytest.mark.slow
class TestBeat:
    """The beat tasks on a real `celery beat` with a real worker."""

    def _start_beat(self, tmp_path, queue_name, key_store_url, env):
        import os
        import subprocess
        import sys

        from .conftest import APP_DIR

        environment = dict(os.environ)
        environment.update(env)
        environment.update(
            PII_TESTAPP_BROKER=f"{REDIS_URL}/{BROKER_DB}",
            PII_TESTAPP_BACKEND=f"{REDIS_URL}/{BACKEND_DB}",
            PII_TESTAPP_KEY_STORE=key_store_url,
            PII_TESTAPP_QUEUE=queue_name,
            PYTHONPATH=os.pathsep.join([APP_DIR, environment.get("PYTHONPATH", "")]),
        )
        command = [
            sys.executable, "-m", "celery", "-A", "pii_testapp", "beat", "-l", "INFO",
            "-s", str(tmp_path / "beat-schedule"), "--logfile", str(tmp_path / "beat.log"),
        ]  # fmt: skip
        return subprocess.Popen(
            command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def test_beat_enforces_retention_and_rotates_mid_stream(
        self, make_app, start_worker_process, tmp_path, queue_name, key_store_url, monkeypatch
    ):
        """Beat shreds expired buckets (a held copy then fails) and rotations lose no message."""
        env = {
            "PII_TESTAPP_BEAT_INTERVAL": "1",
            # Long enough for a prefork worker to start on a slow machine and run the short
            # task before its bucket's deadline (9-10 s after publishing, rounded down).
            "PII_TESTAPP_RETENTION_SECONDS": "10",
            "PII_TESTAPP_ROTATION_SECONDS": "1",
            "PII_TESTAPP_MAX_KEY_VERSIONS": "50",
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        # A key of this test's own: the shared key store's "default" key keeps its own schedule.
        app = make_app(
            result_extended=True,
            pii_rotation_interval=1,
            pii_max_key_versions=50,
            pii_default_key=f"beat-{queue_name[-8:]}",
        )
        pii = get_pii(app)
        short = app.tasks["t.retention_short"].delay(EMAIL)
        (held,) = queued_messages(app.conf.task_default_queue)
        worker = start_worker_process(pool="prefork", concurrency=2)
        beat = self._start_beat(tmp_path, queue_name, key_store_url, env)
        beat_log = tmp_path / "beat.log"
        try:
            assert short.get(timeout=30) == EMAIL
            assert _wait(lambda: beat_log.exists() and "Sending due task" in beat_log.read_text())
            # A stream of messages for ~5 s while beat rotates the keys every second.
            stream = []
            for i in range(250):
                stream.append(app.tasks["t.charge"].delay(f"4000-0000-0000-{i:04d}", i))
                time.sleep(0.02)
            assert [r.get(timeout=60)["amount"] for r in stream] == list(range(250))
            rotations = [r for r in pii.keys.audit_trail(pii.settings.default_key) if r.operation == "rotate"]
            assert len(rotations) >= 2
            # The retention bucket of the short task expires and beat destroys its key (a
            # bucket key of this test's own key id: the shared store holds other tests' buckets).
            bucket_keys = pii.settings.default_key + "@"
            assert _wait(
                lambda: any(
                    r.operation == "destroy"
                    and r.details.get("reason") == "retention"
                    and r.key_id.startswith(bucket_keys)
                    for r in pii.keys.audit_trail()
                ),
                timeout=30,
            )
            # This process still holds the key it sealed with until its next check of the
            # store (pii_key_recheck_interval); a reader without it (another process) is what matters.
            pii.keys.cache.clear()
            with pytest.raises(KeyDestroyed, match="destroyed"):
                app.AsyncResult(short.id).get(timeout=10)
            with redis_client(BROKER_DB) as client:
                client.lpush(app.conf.task_default_queue, json.dumps(held))
            assert _wait(lambda: _stored_status(short.id) == "FAILURE")
            with pytest.raises(KeyDestroyed):
                app.AsyncResult(short.id).get(timeout=30)
        finally:
            beat.terminate()
            beat.wait(30)
            worker.stop()
        assert "celery_pii.enforce_retention" in (tmp_path / "beat.log").read_text()
        log = worker.log()
        assert "enforce_retention destroyed" in log and "rotate_keys rotated" in log
        assert_no_plaintext(log)
