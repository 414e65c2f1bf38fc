"""django-celery-results' ``django-db`` result backend, on PostgreSQL through Django's ORM.

It is a backend class of its own (not Celery's database backend), and the one
Django projects use: its rows are bound to their task id, its traceback column
sealed, and an erased row reads as a failure, as on Celery's database backend.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from celery_pii import DecryptionFailed, KeyDestroyed, get_pii
from celery_pii._sealer import MARKER

from .conftest import POSTGRES_URL, _fresh_postgres

pytest.importorskip("django")
pytest.importorskip("django_celery_results")

CARD = "4111 1111 1111 1111"
CARD2 = "4242424242424242"
EMAIL = "ann.example@example.com"


@pytest.fixture(scope="module")
def django_db():
    """Django set up with django-celery-results' tables in a fresh PostgreSQL schema of its own."""
    import django
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connections

    if settings.configured:
        pytest.skip("Django was configured by another module of this process")
    url, drop = _fresh_postgres()
    schema = sa.engine.make_url(url).query["options"].removeprefix("-csearch_path=")
    server = sa.engine.make_url(POSTGRES_URL)
    settings.configure(
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": server.database,
                "USER": server.username,
                "HOST": server.host,
                "PORT": str(server.port or 5432),
                "OPTIONS": {"options": f"-c search_path={schema}"},
            }
        },
        INSTALLED_APPS=["django_celery_results"],
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    )
    django.setup()
    call_command("migrate", "django_celery_results", verbosity=0)
    yield
    connections.close_all()
    drop()


@pytest.fixture
def django_app(django_db, make_app):
    """A PII test app whose results go to ``django-db``, with result_extended."""
    return make_app(backend="django-db", result_extended=True)


def _column(task_id, name):
    """One column of a task's django_celery_results_taskresult row, as stored."""
    from django_celery_results.models import TaskResult

    return TaskResult.objects.values_list(name, flat=True).get(task_id=task_id)


def _run(app, *results):
    from celery.contrib.testing.worker import start_worker

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
        for result in results:
            result.get(timeout=30, propagate=False)


def test_the_traceback_column_is_sealed(django_app):
    """The traceback column is written outside any serializer: a PII task's is stored sealed.

    It held the traceback as the worker logged it, scrubbed only: a value
    derived from a declared field (the card with dashes) stayed readable in
    the column (and in Django's admin), out of erasure's reach.
    """
    failing = django_app.tasks["t.fail_derived"].delay(CARD)
    plain = django_app.tasks["t.lookup_fail"].delay("SKU-7")
    _run(django_app, failing, plain)
    stored = _column(failing.id, "traceback")
    assert stored.startswith(f"{MARKER}\n")
    assert CARD.replace(" ", "-") not in stored
    assert "no such item SKU-7" in _column(plain.id, "traceback")  # another task's stays as it was
    reread = django_app.AsyncResult(failing.id)
    assert f"card {CARD.replace(' ', '-')} declined" in reread.traceback
    with pytest.raises(ValueError, match="declined"):
        reread.get(timeout=5)


def test_a_result_copied_from_another_row_does_not_open(django_app):
    """A row's result is bound to its task id: copied into another task's row, it reads as a failure.

    It opened as the other task's: reading task b returned task a's card.
    """
    from django_celery_results.models import TaskResult

    first = django_app.tasks["t.charge"].delay(CARD, 10)
    second = django_app.tasks["t.charge"].delay(CARD2, 20)
    _run(django_app, first, second)
    assert django_app.AsyncResult(second.id).get(timeout=5)["card_number"] == CARD2
    TaskResult.objects.filter(task_id=second.id).update(result=_column(first.id, "result"))
    copied = django_app.AsyncResult(second.id)
    assert copied.state == "FAILURE"
    with pytest.raises(DecryptionFailed):
        copied.get(timeout=5)
    assert django_app.AsyncResult(first.id).get(timeout=5)["card_number"] == CARD


def test_an_erased_row_reads_as_a_failure_keeping_its_facts(django_app):
    """After erasure, ``.state`` and ``.get()`` say KeyDestroyed; the row's other columns are kept.

    The erased row's decoding error escaped as kombu's DecodeError from
    ``.state`` too (a Django view polling it answered 500).
    """
    done = django_app.tasks["t.profile"].delay("user-django-1", EMAIL)
    _run(django_app, done)
    assert django_app.AsyncResult(done.id).get(timeout=5)["email"] == EMAIL
    assert get_pii(django_app).forget_subject("user-django-1") >= 1
    erased = django_app.AsyncResult(done.id)
    assert erased.state == "FAILURE"
    assert isinstance(erased.result, KeyDestroyed)
    with pytest.raises(KeyDestroyed):
        erased.get(timeout=5)
    meta = django_app.backend.get_task_meta(done.id)
    assert meta["task_name"] == "t.profile"
    assert meta["worker"]
    assert meta["date_done"] is not None


def test_a_chord_reads_its_header_rows(django_app):
    """django-celery-results counts a chord's parts itself; the body reads each part's row, bound to it."""
    from celery import chord

    header = [django_app.tasks["t.charge"].s(card, 1) for card in (CARD, CARD2)]
    result = chord(header)(django_app.tasks["t.collect"].s(EMAIL))
    _run(django_app, result)
    final = django_app.AsyncResult(result.id).get(timeout=5)
    assert final["email"] == EMAIL
    assert sorted(part["card_number"] for part in final["results"]) == sorted([CARD, CARD2])
    assert all(MARKER not in _column(part.id, "result") for part in result.parent.results)
