"""Task specs: which tasks take the direct sealing path."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery import Celery

from celery_pii import RetentionPolicy
from celery_pii._config import settings_from_conf
from celery_pii._specs import build_spec

SETTINGS = settings_from_conf(Celery("t", set_as_current=False).conf)


def charge(card_number, customer, items=(), user_id=None):
    return None


def _spec(**options):
    return build_spec("t.charge", charge, options, SETTINGS)


def test_declared_names_and_dict_keys_under_a_fixed_key_seal_directly():
    assert _spec(pii_fields=["card_number", "customer.email"]).simple_sealing
    assert _spec(pii_fields=["card_number"], pii_key="cards").simple_sealing


@pytest.mark.parametrize(
    "options",
    [
        {"pii_fields": ["items[*].serial"]},
        {"pii_fields": ["items[0]"]},
        {"pii_fields": ["card_number"], "pii_subject": "user_id"},
        {"pii_fields": ["card_number"], "pii_retention": RetentionPolicy.delete_after(timedelta(days=1))},
        {"pii_fields": ["card_number"], "pii_detect": "warn"},
        {"pii_detect": "encrypt"},
    ],
    ids=["wildcard", "index", "subject", "retention", "detection", "no-fields"],
)
def test_everything_else_takes_the_general_path(options):
    assert not _spec(**options).simple_sealing
