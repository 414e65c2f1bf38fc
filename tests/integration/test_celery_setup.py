"""setup_pii(): idempotent, refuses plaintext-prone configuration, reaches every task."""

from __future__ import annotations

from typing import ClassVar

import pytest
from celery import Celery, shared_task
from celery.backends.base import KeyValueStoreBackend
from celery.contrib.testing.worker import start_worker
from kombu import serialization

from celery_pii import (
    ConfigurationError,
    DecryptionFailed,
    EncryptionFailed,
    KeyStoreUnavailable,
    get_pii,
    setup_pii,
)
from celery_pii._keys import KeySpec
from celery_pii._sealer import MARKER
from celery_pii._serializer import CONTENT_TYPE

from .conftest import BACKEND_DB, BROKER_DB, REDIS_URL, message_bytes, queued_messages, redis_client
from .test_celery_roundtrip import CARD

pytestmark = pytest.mark.integration


def _app(key_store_url, **conf):
    app = Celery(
        "setup-test",
        broker=f"{REDIS_URL}/{BROKER_DB}",
        backend=f"{REDIS_URL}/{BACKEND_DB}",
        set_as_current=False,
    )
    settings = {
        "task_serializer": "pii",
        "result_serializer": "pii",
        "accept_content": ["pii"],
        "result_accept_content": ["pii"],
        "pii_key_store_url": key_store_url,
    }
    settings.update(conf)
    app.conf.update(settings)
    return app


class PicklingBackend(KeyValueStoreBackend):
    """A backend like django-celery-results' ``django-cache``: it sets its own serializer."""

    stored: ClassVar[list[str]] = []  # the keys written, by any instance

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.serializer = "pickle"

    def get(self, key):
        return None

    def set(self, key, value):
        PicklingBackend.stored.append(key)


#: A failed PII task's stored exception, as Celery serializes it (its message names the card).
STORED_ERROR = {
    "exc_type": "ValueError",
    "exc_message": ["card 4111 1111 1111 1111"],
    "exc_module": "builtins",
}


def _start_a_worker(app):
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=5):
        pass


class TestSetup:
    """Installing celery-pii on an app."""

    def test_idempotent_and_findable(self, key_store_url):
        """setup_pii returns the same PII object every time; get_pii finds it."""
        app = _app(key_store_url)
        pii = setup_pii(app)
        assert setup_pii(app) is pii
        assert get_pii(app) is pii
        assert serialization.registry.name_to_type["pii"] == CONTENT_TYPE
        assert "celery_pii.tasks" in app.conf.imports

    def test_settings_changed_after_setup_are_refused(self, key_store_url):
        """setup_pii reads the settings once: one changed later is refused, not silently left unapplied.

        Phase 3 of a rollout appended after setup_pii left unsealed messages admitted.
        """
        app = _app(key_store_url, accept_content=["pii", "json"], pii_allow_plaintext=True)
        setup_pii(app)
        app.conf.update(accept_content=["pii"], pii_allow_plaintext=False)
        with pytest.raises(ConfigurationError, match="pii_allow_plaintext: changed after setup_pii"):
            setup_pii(app)
        with pytest.raises(ConfigurationError, match="pii_allow_plaintext: changed after setup_pii"):
            _start_a_worker(app)
        app.conf.pii_detect = "bogus"
        with pytest.raises(ConfigurationError, match="pii_detect"):
            setup_pii(app)

    def test_celery_settings_changed_after_setup_are_refused_when_a_worker_starts(self, key_store_url):
        """task_serializer='json' set after setup_pii would send plaintext: a worker refuses to start."""
        app = _app(key_store_url)
        setup_pii(app)
        app.conf.task_serializer = "json"
        with pytest.raises(ConfigurationError, match="task_serializer"):
            _start_a_worker(app)

    def test_a_worker_refuses_a_backend_writing_with_its_own_serializer(self, key_store_url):
        """A result backend that pickles whatever result_serializer says (django-celery-results' cache one).

        Results and result_extended's opened arguments went to it in plaintext.
        """
        app = _app(key_store_url, result_backend=f"{__name__}:PicklingBackend")
        setup_pii(app)
        with pytest.raises(
            ConfigurationError,
            match=r"^setting result_backend: .*PicklingBackend writes results with 'pickle'",
        ):
            _start_a_worker(app)

    def test_an_eager_call_storing_its_result_refuses_such_a_backend(self, key_store_url):
        """task_always_eager + task_store_eager_result wrote through it without a worker ever starting.

        django-cache in a test or development setup: the result and result_extended's
        arguments went to the cache in plaintext.  Named as the configuration spells it.
        """
        app = _app(
            key_store_url,
            result_backend=f"{__name__}:PicklingBackend",
            task_always_eager=True,
            task_store_eager_result=True,
            result_extended=True,
        )
        setup_pii(app)

        @app.task(name="t.eager_stored", pii_fields=["card"], shared=False)
        def eager_stored(card):
            return card

        stored_before = len(PicklingBackend.stored)
        with pytest.raises(
            ConfigurationError, match=r"^setting result_backend: .*writes results with 'pickle'"
        ):
            eager_stored.delay("4111 1111 1111 1111")
        assert len(PicklingBackend.stored) == stored_before
        unstored = _app(key_store_url, result_backend=f"{__name__}:PicklingBackend", task_always_eager=True)
        setup_pii(unstored)

        @unstored.task(name="t.eager_unstored", pii_fields=["card"], shared=False)
        def eager_unstored(card):
            return card[-4:]

        assert eager_unstored.delay("4111 1111 1111 1111").result == "1111"  # nothing stored: nothing refused

    def test_a_celery_passing_task_message_arguments_in_another_order_is_refused(
        self, key_store_url, monkeypatch
    ):
        """Celery passes as_task_v2's arguments by position: another order would bind them wrongly, silently.

        (callbacks as errbacks, a chain as a chord: embedded steps unsealed.)
        """
        from celery.app.amqp import AMQP

        original = AMQP.as_task_v2
        setup_pii(_app(key_store_url))  # this Celery's order is the one celery-pii knows

        def swapped(
            self,
            task_id,
            name,
            args=None,
            kwargs=None,
            countdown=None,
            eta=None,
            group_id=None,
            group_index=None,
            expires=None,
            retries=0,
            chord=None,
            errbacks=None,
            callbacks=None,
            **rest,
        ):
            return original(
                self,
                task_id,
                name,
                args,
                kwargs,
                countdown,
                eta,
                group_id,
                group_index,
                expires,
                retries,
                chord,
                callbacks,
                errbacks,
                **rest,
            )

        monkeypatch.setattr(AMQP, "as_task_v2", swapped)
        with pytest.raises(ConfigurationError, match="as_task_v2 takes its arguments in an order"):
            setup_pii(_app(key_store_url))

    def test_an_unreachable_store_at_setup_names_the_setting_and_no_kms(self):
        """With a master key from the environment, the error names the store alone (it named a KMS too)."""
        app = _app("postgresql+psycopg://postgres@127.0.0.1:1/test", pii_key_store_connect_timeout=1)
        with pytest.raises(
            ConfigurationError, match=r"^setting pii_key_store_url: the key store at .* cannot be reached"
        ) as info:
            setup_pii(app)
        assert "KMS" not in str(info.value)

    def test_get_pii_without_setup(self):
        """get_pii on an app without celery-pii says how to fix it."""
        with pytest.raises(ConfigurationError, match="setup_pii"):
            get_pii(Celery("bare", set_as_current=False))

    @pytest.mark.parametrize(
        ("conf", "setting"),
        [
            ({"task_serializer": "json"}, "task_serializer"),
            ({"accept_content": ["pii", "json"]}, "accept_content"),
            ({"accept_content": ["json"]}, "accept_content"),
            ({"accept_content": ["pii", "pickle"], "pii_allow_plaintext": True}, "accept_content"),
            ({"result_accept_content": ["pii", "json"]}, "result_accept_content"),
            ({"result_serializer": "json"}, "result_serializer"),
            # kombu reads a string letter by letter: the worker died at start with KeyError: 'p'.
            ({"accept_content": "pii"}, r"accept_content: must be a list"),
            ({"result_accept_content": "pii"}, r"result_accept_content: must be a list"),
            ({"task_protocol": 1}, "task_protocol"),
            ({"pii_detekt": "warn"}, "pii_detekt"),
            ({"pii_master_key": "env:PII_TEST_UNSET_VARIABLE"}, "pii_master_key"),
            ({"pii_key_store_url": "postgresql+psycopg://postgres@127.0.0.1:1/test"}, "pii_key_store_url"),
        ],
    )
    def test_refuses_plaintext_prone_config(self, key_store_url, conf, setting):
        """A configuration that would let plaintext through refuses to start, naming the setting."""
        with pytest.raises(ConfigurationError, match=setting):
            setup_pii(_app(key_store_url, **conf))

    def test_rollout_mode_admits_json(self, key_store_url):
        """With pii_allow_plaintext=True, workers may also accept legacy json."""
        setup_pii(_app(key_store_url, accept_content=["pii", "json"], pii_allow_plaintext=True))

    def test_setup_pii_does_not_connect_the_broker_client(self, key_store_url):
        """`celery -A proj pii db upgrade` needs no broker: setup_pii imported its client library.

        (It built Celery's task sender, which makes the event dispatcher and
        its connection: with only part of a transport's dependencies installed,
        every `pii` command failed.)
        """
        import subprocess
        import sys
        import textwrap

        script = textwrap.dedent(
            f"""
            import sys
            from celery import Celery
            from celery_pii import setup_pii
            app = Celery("x", broker={f"{REDIS_URL}/{BROKER_DB}"!r})
            app.conf.update(task_serializer="pii", result_serializer="pii", accept_content=["pii"],
                            pii_key_store_url={key_store_url!r})
            setup_pii(app)
            print(sorted(name for name in ("redis", "kombu.transport.redis") if name in sys.modules))
            """
        )
        ran = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert ran.stdout.strip() == "[]"

    def test_key_cache_settings_reach_the_key_manager(self, key_store_url):
        keys = setup_pii(_app(key_store_url, pii_key_cache_size=64, pii_key_cache_ttl=90)).keys
        assert (keys.cache.size, keys.cache.ttl) == (64, 90.0)
        keys.store.dispose()

    def test_wrong_master_key_refused_at_start(self, key_store_url, monkeypatch):
        """A master key that cannot unwrap the store's keys stops setup, not the first decrypt."""
        get_pii(_configured(key_store_url)).keys.encryption_key(KeySpec("default"))
        monkeypatch.setenv("CELERY_PII_MASTER_KEY", "BBECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
        with pytest.raises(ConfigurationError, match="does not match the key store"):
            setup_pii(_app(key_store_url))


def _configured(key_store_url):
    app = _app(key_store_url)
    setup_pii(app)
    return app


class TestTaskRegistration:
    """Every task gets the opening step; malformed options fail at registration."""

    def test_tasks_before_and_after_setup(self, key_store_url):
        """@app.task before and after setup_pii, and shared_task, all get specs and the opening step."""
        app = _app(key_store_url)

        @app.task(shared=False, name="reg.before", pii_fields=["ssn"])
        def before(ssn):
            return ssn

        pii = setup_pii(app)

        @app.task(shared=False, name="reg.after", pii_fields=["email"])
        def after(email):
            return email

        @shared_task(name="reg.shared", pii_fields=["card"])
        def shared(card):
            return card

        app.finalize()
        assert {"reg.before", "reg.after", "reg.shared"} <= pii.specs.keys()
        for name in ("reg.before", "reg.after", "reg.shared", "celery.chord_unlock"):
            task_class = type(app.tasks[name])
            assert task_class.__dict__.get("_celery_pii_opening"), name

    def test_malformed_path_fails_at_registration(self, key_store_url):
        """A bad path raises when the task is declared, naming the task and the path."""
        app = _app(key_store_url)
        setup_pii(app)

        @app.task(shared=False, name="reg.bad", pii_fields=["customer..email"])
        def bad(customer):
            return customer

        # Tasks register when the app finalizes (at worker start, or the first publish).
        with pytest.raises(ConfigurationError, match=r"'reg.bad'.*'customer\.\.email'"):
            app.finalize()

    def test_unknown_parameter_fails_at_registration(self, key_store_url):
        """A path naming no parameter is refused at declaration."""
        app = _app(key_store_url)
        setup_pii(app)

        @app.task(shared=False, name="reg.unknown", pii_fields=["nope"])
        def unknown(email):
            return email

        with pytest.raises(ConfigurationError, match="names no parameter"):
            app.finalize()

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"pii_fields": "email"}, "list of field paths"),
            ({"pii_key": "bad key"}, "pii_key"),
            ({"pii_key": "celery_pii.x"}, "pii_key"),
            ({"pii_retention": 30}, "pii_retention"),
            ({"pii_detect": "loud"}, "pii_detect"),
            ({"pii_subject": "user..id"}, "malformed"),
            # An iterator was used up by the check that its paths are strings: nothing sealed.
            ({"pii_fields": (path for path in ["email"])}, "list of field paths"),
            ({"pii_fields": map(str.strip, ["email"])}, "list of field paths"),
            # A misspelt option was ignored: the field was published in plaintext.
            ({"pii_field": ["email"]}, r"unknown task option pii_field \(did you mean pii_fields\?\)"),
            ({"pii_retension": 30}, r"unknown task option pii_retension \(did you mean pii_retention\?\)"),
            ({"pii_fields": ["email"], "pii_subjet": "user_id"}, "did you mean pii_subject"),
        ],
    )
    def test_invalid_options(self, key_store_url, options, message):
        """Each invalid task option is refused at declaration, naming it."""
        app = _app(key_store_url)
        setup_pii(app)
        app.finalize()  # a finalized app registers tasks as they are declared
        with pytest.raises(ConfigurationError, match=message):

            @app.task(shared=False, name="reg.options", **options)
            def task(email, user_id=None):
                return email

    def test_a_misspelt_option_of_a_task_class_fails_at_registration(self, key_store_url):
        """A class attribute is a task option as the decorator's keyword is."""
        app = _configured(key_store_url)

        class Charge(app.Task):
            name = "reg.class_typo"
            pii_feilds: ClassVar[list[str]] = ["card_number"]

            def run(self, card_number):
                return None

        with pytest.raises(
            ConfigurationError, match=r"'reg\.class_typo'.*pii_feilds \(did you mean pii_fields\?\)"
        ):
            app.register_task(Charge())

    def test_options_given_by_task_annotations_are_read(self, key_store_url):
        """Celery sets ``task_annotations`` on a task when it binds it, after registering it.

        The options they gave were read too late: the card was published in
        plaintext, and ``pii_detect="refuse"`` refused nothing.
        """
        queue = "reg-annotations"
        app = _app(
            key_store_url,
            task_annotations=[
                {"reg.annotated": {"pii_fields": ["card_number"]}},
                {"reg.annotated_refusing": {"pii_detect": "refuse"}},
            ],
        )
        setup_pii(app)

        @app.task(shared=False, name="reg.annotated")
        def annotated(card_number, amount):
            return None

        @app.task(shared=False, name="reg.annotated_refusing")
        def refusing(note):
            return None

        with redis_client(BROKER_DB) as client:
            client.delete(queue)
        try:
            annotated.apply_async((CARD, 10), queue=queue)
            with pytest.raises(EncryptionFailed, match=r"reg\.annotated_refusing"):
                refusing.apply_async((f"card {CARD}",), queue=queue)
            [message] = queued_messages(queue)
        finally:
            with redis_client(BROKER_DB) as client:
                client.delete(queue)
        raw = message_bytes(message)
        assert CARD.encode() not in raw
        assert MARKER.encode() in raw

    def test_an_annotation_object_is_given_the_task_class_as_celery_gives_it(self, key_store_url):
        """Celery's ``Task.annotate`` passes the class: an ``annotate()`` testing it raised TypeError."""

        class Annotations:
            def annotate(self, task):
                if issubclass(task, app.Task) and task.name == "reg.annotated_by_object":
                    return {"pii_fields": ["card_number"]}
                return None

        app = _app(key_store_url, task_annotations=[Annotations()])
        pii = setup_pii(app)

        @app.task(shared=False, name="reg.annotated_by_object")
        def annotated(card_number):
            return None

        app.finalize()
        assert pii.specs["reg.annotated_by_object"].declared_names == {"card_number"}

    def test_pii_named_helpers_of_a_base_class_are_no_options(self, key_store_url):
        """Only what the decorator, the task's own class body or the annotations set can be a misspelt option."""
        app = _configured(key_store_url)

        class Base(app.Task):
            abstract = True
            pii_safe = True  # another library's flag

            def pii_scrub_log(self, text):  # a helper method
                return text

        @app.task(shared=False, name="reg.with_helpers", base=Base, pii_fields=["card_number"])
        def with_helpers(card_number):
            return None

        app.finalize()
        assert get_pii(app).specs["reg.with_helpers"].declared_names == {"card_number"}

    def test_a_misspelt_option_in_task_annotations_fails_at_registration(self, key_store_url):
        app = _app(key_store_url, task_annotations={"*": {"pii_detekt": "refuse"}})
        setup_pii(app)

        @app.task(shared=False, name="reg.annotated_typo")
        def task(note):
            return None

        with pytest.raises(ConfigurationError, match=r"pii_detekt \(did you mean pii_detect\?\)"):
            app.finalize()


class TestSeveralApps:
    """Results of one app read correctly in a process that has several."""

    def test_result_opens_with_the_app_that_holds_its_key(self, key_store_url, tmp_path):
        """A result sealed by one app opens even when another app (same key id, other store) is current."""
        from celery_pii import migrate
        from celery_pii._celery import _open_result_hook
        from celery_pii._keys import KeySpec

        other_store = f"sqlite:///{tmp_path / 'other.db'}"
        migrate(other_store)
        first = _app(key_store_url)
        second = _app(other_store)
        setup_pii(first)
        sealer = setup_pii(second).sealer
        meta = {"status": "SUCCESS", "result": {"ok": 1}, "task_id": "t-1", "traceback": None}
        sealed = sealer.seal_result(meta, task_id="t-1", key_spec=KeySpec("default"))
        get_pii(first).keys.encryption_key(KeySpec("default"))  # same key id, other material
        first.set_current()
        assert _open_result_hook(sealed)["result"] == {"ok": 1}
        second.set_current()
        assert _open_result_hook(sealed)["status"] == "SUCCESS"

    def test_flower_shows_results_sealed(self, key_store_url, monkeypatch):
        """In a Flower process (it imports the app, so it holds the master key) results are not opened.

        Its ``/api/task/result`` and ``/api/task/apply`` served opened results
        over HTTP to whoever could reach it.
        """
        from celery_pii import _celery

        sealer = setup_pii(_app(key_store_url)).sealer
        meta = {
            "status": "SUCCESS",
            "result": {"card": "4111 1111 1111 1111"},
            "task_id": "t-1",
            "traceback": None,
        }
        sealed = sealer.seal_result(meta, task_id="t-1", key_spec=KeySpec("default"))
        monkeypatch.setattr(_celery, "_IN_FLOWER", True)
        assert _celery._open_result_hook(dict(sealed))["result"] == MARKER
        monkeypatch.setattr(_celery, "_IN_FLOWER", False)
        assert _celery._open_result_hook(dict(sealed))["result"] == {"card": "4111 1111 1111 1111"}

    @pytest.mark.parametrize("state", ["FAILURE", "RETRY", "REVOKED"])
    def test_flower_reads_a_sealed_failure_as_a_failure(self, key_store_url, monkeypatch, state):
        """A failed PII task's result in Flower: its state and a sealed exception, not a crash.

        The marker where Celery rebuilds the exception from made every read of
        the result (``.state`` too) raise ``ValueError``.
        """
        from celery_pii import PIIError, _celery

        app = _app(key_store_url)
        sealer = setup_pii(app).sealer
        error = STORED_ERROR
        meta = {"status": state, "result": error, "task_id": "t-2", "traceback": "Traceback ..."}
        sealed = sealer.seal_result(meta, task_id="t-2", key_spec=KeySpec("default"))
        monkeypatch.setattr(_celery, "_IN_FLOWER", True)
        read = app.backend.meta_from_decoded(_celery._open_result_hook(dict(sealed)))
        assert read["status"] == state
        assert type(read["result"]) is PIIError
        assert str(read["result"]) == MARKER
        assert read["traceback"] == MARKER

    @pytest.mark.parametrize("state", ["SUCCESS", "FAILURE", "RETRY"])
    def test_flower_reads_a_value_sealed_whole_as_its_state_says(self, key_store_url, monkeypatch, state):
        """The database backend decodes its result column alone, then builds the meta around it.

        There the marker made a failure's every read raise ValueError ("Exception
        information must include the exception type"): Flower's HTTP 500.
        """
        from celery_pii import PIIError, _celery

        app = _app(key_store_url)
        sealer = setup_pii(app).sealer
        error = STORED_ERROR
        column = sealer.seal_result(
            error if state != "SUCCESS" else {"card": "4111"}, task_id="t-4", key_spec=KeySpec("default")
        )
        monkeypatch.setattr(_celery, "_IN_FLOWER", True)
        read = app.backend.meta_from_decoded(
            {
                "task_id": "t-4",
                "status": state,
                "result": _celery._open_result_hook(column),
                "traceback": None,
            }
        )
        if state == "SUCCESS":
            assert read["result"] == MARKER
        else:
            assert type(read["result"]) is PIIError
            assert str(read["result"]) == MARKER

    @pytest.mark.parametrize(
        ("argv", "flower"),
        [
            (["celery", "-A", "proj", "flower", "--port=5555"], True),
            (["/usr/bin/celery", "--app=proj", "-b", "redis://", "flower"], True),
            (["python -m celery", "-A", "flower", "worker", "-l", "INFO"], False),  # an app named flower
            (["celery", "-A", "proj", "worker", "-n", "flower"], False),
            (["celery", "-A", "proj", "result", "abc"], False),
            (["gunicorn", "web:app"], False),
        ],
    )
    def test_a_flower_process_is_told_by_its_command_line(self, argv, flower):
        """Flower is ``celery [options] flower``: the subcommand, not any argument named so."""
        import subprocess
        import sys

        script = f"import sys; sys.argv = {argv!r}; from celery_pii import _celery; print(_celery._IN_FLOWER)"
        printed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        assert printed.stdout.strip() == str(flower)

    def test_a_sealed_meta_opens_only_with_the_state_it_was_stored_with(self, key_store_url):
        """A FAILURE edited into SUCCESS on the backend does not hand its exception back as the value.

        The state stays readable (Celery reads it) and is sealed beside the result:
        the two must agree.  Metas sealed before the state was (no sealed state) still open.
        """
        from celery_pii import DecryptionFailed
        from celery_pii._sealer import RESULT_KEY

        sealer = setup_pii(_app(key_store_url)).sealer
        error = {"exc_type": "ValueError", "exc_message": ["card declined"], "exc_module": "builtins"}
        meta = {"status": "FAILURE", "result": error, "task_id": "t-3", "traceback": None}
        sealed = sealer.seal_result(meta, task_id="t-3", key_spec=KeySpec("default"))
        assert sealed["status"] == "FAILURE"
        opened = sealer.open_result(dict(sealed))
        assert opened.value["status"] == "FAILURE" and opened.value["result"] == error
        assert "FAILURE" not in opened.values  # not a value to hide from the reader's logs
        with pytest.raises(DecryptionFailed):
            sealer.open_result(dict(sealed, status="SUCCESS"))
        key = sealer.keys.encryption_key(KeySpec("default"))
        earlier = dict(meta, result=MARKER)
        earlier[RESULT_KEY] = sealer._seal_result_values(key, (), [error], ["result"], "t-3")
        assert sealer.open_result(earlier).value["result"] == error

    def test_a_sealed_meta_opens_only_under_its_own_task_id(self, key_store_url):
        """The meta's task id (in the clear) must be the one its envelope is bound to, and be there."""
        from celery_pii._celery import _open_result_hook

        sealer = setup_pii(_app(key_store_url)).sealer
        meta = {"status": "SUCCESS", "result": {"ok": 1}, "task_id": "t-1", "traceback": None}
        sealed = sealer.seal_result(meta, task_id="t-1", key_spec=KeySpec("default"))
        assert _open_result_hook(dict(sealed))["result"] == {"ok": 1}
        # Read as a result meta: a failure that says why (Celery's backends keep working).
        relabelled = _open_result_hook({**sealed, "task_id": "t-2"})
        assert relabelled["status"] == "FAILURE"
        assert relabelled["result"]["exc_type"] == "DecryptionFailed"
        with pytest.raises(DecryptionFailed):
            _open_result_hook({name: value for name, value in sealed.items() if name != "task_id"})

    def test_an_app_whose_store_is_gone_does_not_stop_the_others(self, key_store_url, tmp_path, monkeypatch):
        """Another app whose key store cannot answer (dropped, unmigrated) is skipped, not fatal.

        The likeliest app (the current one) is tried first and its error would
        stand; the other apps of the process are only candidates.
        """
        import sqlalchemy as sa

        from celery_pii import _celery, migrate
        from celery_pii._keys import KeySpec

        stores = {name: f"sqlite:///{tmp_path / f'{name}.db'}" for name in ("current", "gone")}
        for url in stores.values():
            migrate(url)
        holder, current, gone = _app(key_store_url), _app(stores["current"]), _app(stores["gone"])
        order = [setup_pii(current), setup_pii(gone), setup_pii(holder)]
        meta = {"status": "SUCCESS", "result": {"ok": 2}, "task_id": "t-2", "traceback": None}
        sealed = order[2].sealer.seal_result(meta, task_id="t-2", key_spec=KeySpec("default"))
        with sa.create_engine(stores["gone"]).begin() as connection:
            connection.exec_driver_sql("DROP TABLE celery_pii_keys")
        monkeypatch.setattr(_celery, "_candidate_instances", lambda: order)
        assert _celery._open_result_hook(sealed)["result"] == {"ok": 2}
        order[:] = [order[1], order[2]]  # the app whose store is gone is the likeliest: its error stands
        with pytest.raises(KeyStoreUnavailable):
            _celery._open_result_hook(sealed)


class TestTaskClasses:
    """Class-based tasks: the opening step runs once, whatever the class hierarchy."""

    def test_subclass_of_a_registered_pii_task_opens_once(self, key_store_url, queue_name):
        """A registered task class subclassing another registered one gets plaintext, once.

        Each registered class is given the opening step, chaining the one it
        inherits: without a once-per-run guard the second pass would find the
        values already opened and refuse them as unsealed.
        """
        from celery.contrib.testing.worker import start_worker

        from celery_pii import _context

        app = _app(key_store_url, task_default_queue=queue_name, worker_hijack_root_logger=False)
        setup_pii(app)
        seen = []

        class Charge(app.Task):
            name = "cls.charge"
            pii_fields = ("card_number",)

            def run(self, card_number):
                seen.append((card_number, _context.running.get() is not None))
                return "charged"

        class Refund(Charge):
            name = "cls.refund"

        charge, refund = app.register_task(Charge()), app.register_task(Refund())
        results = [charge.delay(CARD), refund.delay(CARD)]
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            assert [r.get(timeout=20) for r in results] == ["charged", "charged"]
        assert seen == [(CARD, True), (CARD, True)]
        assert _context.running.get() is None
