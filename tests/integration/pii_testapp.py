"""The Celery app the integration tests run, in-process or as `celery -A pii_testapp worker`.

Configured from the environment (PII_TESTAPP_*) when imported by a worker
subprocess, or built with ``make_app(...)`` in the test process.  Test data is
fake: Luhn-valid test cards, 9xx-area SSNs (invalid), example.com emails.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import sys
import threading
from typing import Any

from celery import Celery, group
from celery.exceptions import Reject

from celery_pii import RetentionPolicy, setup_pii

#: What inline-called tasks received (in-process workers only; never a broker or log).
RECEIVED: list[Any] = []
#: What ``t.lookup_customer`` reads, by customer id (a test fills it: the task's arguments hold no PII).
CUSTOMERS: dict[str, Any] = {}
#: t.profile_waits sets STARTED once running, then waits for PROCEED (in-process workers only).
STARTED = threading.Event()
PROCEED = threading.Event()


def make_app(*, broker: str, backend: str, key_store: str, queue: str, **conf: Any) -> Celery:
    """A PII app with the test tasks, routed to its own queue."""
    app = Celery("pii_testapp", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        task_serializer="pii",
        result_serializer="pii",
        accept_content=["pii"],
        result_accept_content=["pii"],
        pii_master_key="env:CELERY_PII_MASTER_KEY",
        pii_key_store_url=key_store,
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_routing_key=queue,
        pii_quarantine_queue=f"{queue}.quarantine",
        broker_connection_retry_on_startup=True,
        control_exchange=f"{queue}.control",
        event_exchange=f"{queue}.events",
        result_expires=3600,
        # A Redis consumer asks for messages with a BRPOP of this timeout, which a
        # worker stopping waits out: 0.2 s instead of 1 s, for every test's worker.
        broker_transport_options={"visibility_timeout": 60, "polling_interval": 0.2},
    )
    app.conf.update(conf)
    setup_pii(app)
    _define_tasks(app)
    return app


def _define_tasks(app: Celery) -> None:  # noqa: C901, PLR0915 - one place for every test task
    @app.task(shared=False, name="t.charge", pii_fields=["card_number", "customer.email", "items[*].serial"])
    def charge(card_number, amount, customer=None, items=()):
        return {"card_number": card_number, "amount": amount, "customer": customer, "items": list(items)}

    @app.task(shared=False, name="t.headers_field", pii_fields=["email", "headers.auth"])
    def headers_field(email, headers=None):  # a field named like Celery's headers= option
        return {"email": email, "headers": headers}

    @app.task(shared=False, name="t.echo", pii_fields=["value"])
    def echo(value, label="x"):
        return {"value": value, "type": type(value).__name__, "label": label}

    @app.task(shared=False, name="t.fail", pii_fields=["card_number"])
    def fail(card_number):
        msg = f"card {card_number} declined"
        raise ValueError(msg)

    @app.task(shared=False, name="t.lost_once", bind=True, default_retry_delay=0, pii_fields=["card_number"])
    def lost_once(self, card_number):
        """Its pool process dies on the first run (as one killed by the OOM killer would)."""
        if not self.request.retries:
            os.kill(os.getpid(), signal.SIGKILL)
        return {"card_number": card_number, "retries": self.request.retries}

    @app.task(shared=False, name="t.exit_with", pii_fields=["card_number"])
    def exit_with(card_number, how="sys.exit"):
        if how == "sys.exit":
            sys.exit(f"card {card_number} declined")
        if how == "group":  # Python 3.11+
            group, msg = BaseExceptionGroup, f"group for card {card_number}"  # noqa: F821
            raise group(msg, [SystemExit(f"card {card_number}")])
        msg = f"card {card_number}"
        raise KeyboardInterrupt(msg)

    @app.task(shared=False, name="t.fail_deep", pii_fields=["order.customer.billing.card.number"])
    def fail_deep(order):
        msg = "declined"
        raise ValueError(msg)

    @app.task(shared=False, name="t.lookup_fail")
    def lookup_fail(x):
        msg = f"no such item {x}"
        raise LookupError(msg)

    @app.task(shared=False, name="t.fail_derived", pii_fields=["card_number"])
    def fail_derived(card_number):
        msg = f"card {card_number.replace(' ', '-')} declined"  # derived in a form scrubbing does not know
        raise ValueError(msg)

    @app.task(shared=False, name="t.retry_once", bind=True, pii_fields=["ssn"])
    def retry_once(self, ssn):
        if self.request.retries == 0:
            raise self.retry(countdown=0.2)
        return {"ssn": ssn, "retries": self.request.retries}

    @app.task(shared=False, name="t.always_retry", bind=True, max_retries=1, pii_fields=["ssn"])
    def always_retry(self, ssn):
        raise self.retry(countdown=0.2)

    @app.task(shared=False, name="t.retry_with_new", bind=True, max_retries=1, pii_fields=["ssn"])
    def retry_with_new(self, ssn):
        # Each retry carries the next (fake) SSN: 912-34-5678, then ...5679, then ...5670.
        raise self.retry(args=(ssn[:-1] + str((int(ssn[-1]) + 1) % 10),), countdown=0.1)

    @app.task(shared=False, name="t.notify", pii_fields=["email"])
    def notify(previous, email):
        return {"previous": previous, "email": email}

    @app.task(shared=False, name="t.collect", pii_fields=["email"])
    def collect(results, email):
        return {"results": results, "email": email}

    @app.task(shared=False, name="t.profile", pii_subject="user_id", pii_fields=["email"])
    def profile(user_id, email):
        return {"user_id": user_id, "email": email}

    @app.task(
        shared=False,
        name="t.profile_waits",
        bind=True,
        max_retries=1,
        pii_subject="user_id",
        pii_fields=["email"],
    )
    def profile_waits(self, user_id, email, retry=False):
        STARTED.set()
        PROCEED.wait(20)
        if retry and not self.request.retries:
            raise self.retry(countdown=0)
        return {"user_id": user_id, "email": email}

    @app.task(shared=False, name="t.codes", pii_fields=['codes["1"]'])
    def codes(codes):
        return codes

    @app.task(shared=False, name="t.echo_in_group", bind=True, pii_fields=["value"])
    def echo_in_group(self, value):
        """Replaces itself with a group (inside a chord's header: Celery hands it the chord's body)."""
        return self.replace(group(echo.s(value), echo.s(value)))

    @app.task(shared=False, name="t.plain")
    def plain(x):
        return x

    @app.task(shared=False, name="t.gather")
    def gather(results):
        return {"results": results}

    @app.task(shared=False, name="t.read_result")
    def read_result(result_id):
        return app.AsyncResult(result_id).result

    @app.task(shared=False, name="t.pii_read_result", pii_fields=["email"])
    def pii_read_result(email, result_id, fail=False):
        read = app.AsyncResult(result_id).result
        if fail:
            msg = f"could not process {read['email']}"
            raise ValueError(msg)
        return {"email": email, "read": read}

    @app.task(shared=False, name="t.profile_reads_result", pii_subject="user_id", pii_fields=["email"])
    def profile_reads_result(user_id, email, result_id, wait=False):
        read = app.AsyncResult(result_id).result
        if wait:
            STARTED.set()
            PROCEED.wait(20)
        return {"user_id": user_id, "email": email, "read": read}

    @app.task(shared=False, name="t.read_result_eagerly")
    def read_result_eagerly(result_id):
        return {"read": read_result.apply((result_id,)).get()}

    @app.task(shared=False, name="t.publish_steps", pii_fields=["email"])
    def publish_steps(email, queue):
        # Steps that declare no PII, given the opened value, published to a queue no worker reads.
        plain.apply_async((1,), queue=queue, link=plain.s(email))
        plain.apply_async((2,), queue=queue, link_error=plain.s(email))
        plain.apply_async((3,), queue=queue, chain=[plain.s(email).set(queue=queue)])
        return "published"

    @app.task(shared=False, name="t.progress_from_thread", bind=True, pii_fields=["email"])
    def progress_from_thread(self, email, seconds=3.0):
        import threading
        import time

        # The request is thread-local: a thread names the task id itself.
        progress = {"task_id": self.request.id, "state": "PROGRESS", "meta": {"email": email}}
        reporter = threading.Thread(target=self.update_state, kwargs=progress)
        reporter.start()
        reporter.join()
        time.sleep(seconds)
        return "done"

    @app.task(
        shared=False,
        name="t.profile_reports_late",
        bind=True,
        ignore_result=True,
        pii_subject="user_id",
        pii_fields=["email"],
    )
    def profile_reports_late(self, user_id, email):
        import threading
        import time

        def report():
            time.sleep(0.5)  # the task has ended by then
            # A "task_id" of its own in the meta: the database backend's row is still this task's.
            meta = {"sent_to": email, "task_id": "not-this-task"}
            self.update_state(task_id=progress_id, state="PROGRESS", meta=meta)

        progress_id = self.request.id
        threading.Thread(target=report).start()
        return "started"

    @app.task(shared=False, name="t.on_error", pii_fields=["email"])
    def on_error(request, exc, traceback, email):
        RECEIVED.append({"email": email, "exc": type(exc).__name__})
        return {"email": email, "exc": type(exc).__name__}

    @app.task(shared=False, name="t.log_in_threads", pii_fields=["email"])
    def log_in_threads(email):
        import logging
        import threading
        from concurrent.futures import ThreadPoolExecutor

        log = logging.getLogger("pii_testapp.helpers")
        helper = threading.Thread(target=log.warning, args=("helper thread sends to %s", email))
        helper.start()
        helper.join()
        with ThreadPoolExecutor(1) as pool:
            pool.submit(log.warning, "executor sends to %s", email).result()
        return "sent"

    @app.task(shared=False, name="t.slow", pii_fields=["email"])
    def slow(email, seconds=2.0):
        import time

        time.sleep(seconds)
        return email

    @app.task(shared=False, name="t.profile_applies", pii_subject="user_id", pii_fields=["email"])
    def profile_applies(user_id, email):
        return app.tasks["t.echo_publishes"].apply(args=(email,)).get()

    @app.task(shared=False, name="t.echo_publishes", pii_fields=["value"])
    def echo_publishes(value):
        return app.tasks["t.plain"].delay(value).id

    @app.task(shared=False, name="t.errback_by_id", pii_fields=["card"])
    def errback_by_id(task_id, card=None):  # an old-style errback: Celery sends it the failed task's id
        return {"failed": task_id, "card": card}

    @app.task(shared=False, name="t.reject_if", pii_fields=["email"])
    def reject_if(email):
        raise Reject("no", requeue=False)

    @app.task(shared=False, name="t.errback_reads_request")
    def errback_reads_request(request, exc, traceback):  # a request-style errback: called in the worker
        msg = f"no order for {request.args}"
        raise LookupError(msg)

    @app.task(shared=False, name="t.log_request", bind=True, pii_fields=["email"])
    def log_request(self, email):
        from celery.utils.log import get_task_logger

        get_task_logger("pii_testapp.tasks").warning("request %r", self.request)
        return {"logged": email}

    @app.task(
        shared=False,
        name="t.retention_short",
        pii_fields=["email"],
        pii_retention=RetentionPolicy.delete_after(_short()),
    )
    def retention_short(email):
        return email

    @app.task(shared=False, name="t.detect_warn", pii_detect="warn", pii_fields=["email"])
    def detect_warn(note, email=None):
        return {"note": note, "email": email}

    @app.task(shared=False, name="t.detect_encrypt", pii_detect="encrypt")
    def detect_encrypt(note, extra=None):
        return {"note": note, "extra": extra}

    @app.task(shared=False, name="t.detect_nested", pii_detect="encrypt", pii_fields=["customer.email"])
    def detect_nested(customer, document):
        return {"customer": customer, "length": len(document)}

    @app.task(shared=False, name="t.lookup_customer", pii_detect="encrypt")
    def lookup_customer(customer_id):
        return CUSTOMERS[customer_id]

    @app.task(shared=False, name="t.detect_refuse", pii_detect="refuse")
    def detect_refuse(note):
        return note

    @app.task(
        shared=False,
        name="t.immediate",
        pii_fields=["email"],
        pii_retention=RetentionPolicy.delete_immediately(),
    )
    def immediate(email):
        RECEIVED.append({"immediate": email})
        return email

    class RaisingHooks(app.Task):
        """A base class whose hooks raise with the card when the call names them."""

        def before_start(self, task_id, args, kwargs):
            _raise_in("before_start", args)

        def __call__(self, *args, **kwargs):
            _raise_in("__call__", args)
            return super().__call__(*args, **kwargs)

        def on_failure(self, exc, task_id, args, kwargs, einfo):
            _raise_in("on_failure", args)

        def on_retry(self, exc, task_id, args, kwargs, einfo):
            _raise_in("on_retry", args)

    class OddlyBoundHooks(app.Task):
        """The same hooks as a static method, a class method and a callable object."""

        @staticmethod
        def before_start(task_id, args, kwargs):  # noqa: ARG004 - Celery's signature
            _raise_in("before_start", args)

        @classmethod
        def on_failure(cls, exc, task_id, args, kwargs, einfo):  # noqa: ARG003 - Celery's signature
            _raise_in("on_failure", args)

        on_retry = _CallableHook("on_retry")

    def hooks(self, card_number, hook):
        if hook == "on_retry":
            raise self.retry(countdown=60)
        if hook == "on_failure":
            msg = "declined"
            raise ValueError(msg)
        return "charged"

    for name, base in (("t.hooks", RaisingHooks), ("t.odd_hooks", OddlyBoundHooks)):
        app.task(shared=False, name=name, base=base, bind=True, pii_fields=["card_number"])(hooks)

    @app.task(shared=False, name="t.wrapped", pii_fields=["card_number"])
    @_logged
    def wrapped(card_number, amount):
        return {"card_number": card_number, "amount": amount}

    @app.task(shared=False, name="t.wrapped_profile", pii_subject="user_id", pii_fields=["email"])
    @_logged
    def wrapped_profile(email, user_id):
        return {"email": email, "user_id": user_id}

    # Decorators with functools.wraps that change the call: Celery calls the wrapper, so the
    # caller's arguments are the wrapper's, not the inner function's.
    @app.task(shared=False, name="t.with_session", pii_fields=["card_number"])
    @_with_session
    def with_session(session, card_number, amount):
        return {"session": session, "card_number": card_number, "amount": amount}

    @app.task(shared=False, name="t.with_session_profile", pii_subject="user_id", pii_fields=["email"])
    @_with_session
    def with_session_profile(session, user_id, email):
        return {"session": session, "user_id": user_id, "email": email}

    @app.task(shared=False, name="t.for_tenant", pii_fields=["card_number"])
    @_for_tenant
    def for_tenant(card_number, amount):
        return {"card_number": card_number, "amount": amount}

    @app.task(shared=False, name="t.passed_through", pii_fields=["card_number"])
    @_passes_through
    def passed_through(card_number, amount):
        return {"card_number": card_number, "amount": amount}


class _CallableHook:
    """A hook that is an object: Celery calls it without the task."""

    def __init__(self, hook):
        self.hook = hook

    def __call__(self, exc, task_id, args, kwargs, einfo):
        _raise_in(self.hook, args)


def _raise_in(hook, args):
    card_number, raise_in = args
    if raise_in == hook:
        msg = f"{hook} broke for {card_number}"
        raise RuntimeError(msg)


def _logged(fun):
    """A decorator without functools.wraps: the task function's signature becomes (*args, **kwargs)."""

    def wrapper(*args, **kwargs):
        return fun(*args, **kwargs)

    return wrapper


def _with_session(fun):
    """A decorator giving the task function a first argument of its own (a database session, say)."""

    @functools.wraps(fun)
    def wrapper(*args, **kwargs):
        return fun("session-1", *args, **kwargs)

    return wrapper


def _for_tenant(fun):
    """A decorator taking a first argument the task function does not get (a tenant, say)."""

    @functools.wraps(fun)
    def wrapper(tenant, *args, **kwargs):
        return fun(*args, **kwargs)

    return wrapper


def _passes_through(fun):
    """A decorator that passes every argument on unchanged, and says so with ``__signature__``."""

    @functools.wraps(fun)
    def wrapper(*args, **kwargs):
        return fun(*args, **kwargs)

    wrapper.__signature__ = inspect.signature(fun)
    return wrapper


def _short():
    from datetime import timedelta

    return timedelta(seconds=float(os.environ.get("PII_TESTAPP_RETENTION_SECONDS", "5")))


def _beat_settings():
    interval = os.environ.get("PII_TESTAPP_BEAT_INTERVAL")
    if not interval:
        return {}
    from datetime import timedelta

    return {
        "beat_schedule": {
            "pii-rotate-keys": {"task": "celery_pii.rotate_keys", "schedule": float(interval)},
            "pii-enforce-retention": {"task": "celery_pii.enforce_retention", "schedule": float(interval)},
        },
        "pii_rotation_interval": timedelta(
            seconds=float(os.environ.get("PII_TESTAPP_ROTATION_SECONDS", "86400"))
        ),
        "pii_max_key_versions": int(os.environ.get("PII_TESTAPP_MAX_KEY_VERSIONS", "5")),
    }


def _extra_conf():
    """Settings a test passes to its worker processes as JSON in PII_TESTAPP_CONF."""
    import json

    return json.loads(os.environ.get("PII_TESTAPP_CONF", "{}"))


def _own_logging():
    """The user's own logging (``setup_logging``: Celery then sends no after_setup_logger), and an
    audit ``task_postrun`` receiver connected after celery-pii's that fails naming the arguments."""
    import logging

    from celery import signals

    @signals.setup_logging.connect(weak=False)
    def own_logging(loglevel=None, logfile=None, **_):
        handler = logging.FileHandler(logfile)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(loglevel)

    @signals.task_postrun.connect(weak=False)
    def audit_postrun(task=None, args=None, retval=None, **_):
        if task is not None and task.name == "t.log_request":
            msg = f"audit could not store {args} {retval}"
            raise RuntimeError(msg)


def _lose_the_pool_process_after(name):
    """A pool process that dies (SIGKILL) once task ``name`` stored its success, as an OOM kill would."""
    import signal

    from celery import signals

    @signals.task_postrun.connect(weak=False)
    def die(task=None, state=None, **_):
        if task is not None and task.name == name and state == "SUCCESS":
            os.kill(os.getpid(), signal.SIGKILL)


def _log_revoked_requests():
    """A ``task_revoked`` receiver (an audit hook) that logs the request's arguments."""
    import logging

    from celery import signals

    @signals.task_revoked.connect(weak=False)
    def audit(request=None, terminated=None, **_):
        logging.getLogger("audit").warning(
            "revoked %s terminated=%s args=%r kwargs=%r",
            getattr(request, "id", None),
            terminated,
            getattr(request, "args", None),
            getattr(request, "kwargs", None),
        )


def _see_sigterm_promptly():
    """Wake the worker's event loop every half second.

    A worker sees SIGTERM on its loop's next turn; with RabbitMQ and nothing to
    do, the loop sleeps up to ten seconds, which every test stopping a solo
    worker waited.
    """
    from celery import signals

    @signals.worker_ready.connect(weak=False)
    def wake(sender=None, **_):
        sender.timer.call_repeatedly(0.5, lambda: None)


if os.environ.get("PII_TESTAPP_OWN_LOGGING"):
    _own_logging()

if os.environ.get("PII_TESTAPP_LOSE_AFTER"):
    _lose_the_pool_process_after(os.environ["PII_TESTAPP_LOSE_AFTER"])

if os.environ.get("PII_TESTAPP_LOG_REVOKED"):
    _log_revoked_requests()

if os.environ.get("PII_TESTAPP_SENTRY_EVENTS"):
    from sentry_events import start_sentry

    start_sentry()

if os.environ.get("PII_TESTAPP_BROKER"):
    _see_sigterm_promptly()
    app = make_app(
        broker=os.environ["PII_TESTAPP_BROKER"],
        backend=os.environ["PII_TESTAPP_BACKEND"],
        key_store=os.environ["PII_TESTAPP_KEY_STORE"],
        queue=os.environ["PII_TESTAPP_QUEUE"],
        task_send_sent_event=True,
        worker_send_task_events=True,
        task_acks_late=os.environ.get("PII_TESTAPP_ACKS_LATE") == "1",
        task_reject_on_worker_lost=os.environ.get("PII_TESTAPP_ACKS_LATE") == "1",
        **{"result_extended": True, **_beat_settings(), **_extra_conf()},
    )
    if os.environ.get("PII_TESTAPP_SENTRY_EVENTS"):
        from sentry_events import define_sentry_tasks

        define_sentry_tasks(app)
