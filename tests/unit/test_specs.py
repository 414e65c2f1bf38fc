"""Task specs: which tasks take the direct sealing path."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from celery import Celery

from celery_pii import RetentionPolicy
from celery_pii._config import settings_from_conf
from celery_pii._specs import build_spec
from celery_pii.exceptions import ConfigurationError

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


@pytest.mark.parametrize("key_id", ["subject.0f3a9c", "celery_pii.subject-index", "cards@20260101T000000Z"])
def test_reserved_key_ids_are_refused_naming_the_task(key_id):
    """Subject keys ("subject."), the library's own ("celery_pii.") and bucket ids ("@") are not for pii_key."""
    with pytest.raises(ConfigurationError, match=r"t\.charge.*reserved"):
        _spec(pii_fields=["card_number"], pii_key=key_id)


@pytest.mark.parametrize("path", ["items[*].user_id", "items[*]", "customer.ids[*]"])
def test_a_subject_path_naming_every_item_is_refused_naming_the_task(path):
    """One message has one subject's key: a wildcard would key it by the first item only."""
    with pytest.raises(ConfigurationError, match=rf"t\.charge.*pii_subject '{re.escape(path)}'.*one value"):
        _spec(pii_fields=["card_number"], pii_subject=path)
