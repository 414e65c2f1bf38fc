"""The public surface of celery_pii is declared once and pinned here."""

from __future__ import annotations

import celery_pii
from celery_pii import exceptions

EXPECTED = sorted(
    [
        "PII",
        "AuditRecord",
        "KeyManager",
        "KeyStats",
        "generate_master_key",
        "get_pii",
        "migrate",
        "setup_pii",
        "ConfigurationError",
        "DecryptionFailed",
        "EncryptionFailed",
        "Finding",
        "KeyDestroyed",
        "KeyNotFound",
        "KeyStoreUnavailable",
        "PIIError",
        "RetentionPolicy",
        "RetentionReport",
        "__version__",
    ]
)


def test_all_is_pinned():
    """__all__ is exactly the expected names (ruff's RUF022 keeps it sorted), and every name exists."""
    assert sorted(celery_pii.__all__) == EXPECTED
    for name in celery_pii.__all__:
        assert hasattr(celery_pii, name)


def test_exception_tree():
    """The exception tree is as DESIGN §1 draws it."""
    assert issubclass(exceptions.ConfigurationError, exceptions.PIIError)
    assert issubclass(exceptions.ConfigurationError, ValueError)
    for name in (
        "KeyStoreUnavailable",
        "KeyNotFound",
        "KeyDestroyed",
        "DecryptionFailed",
        "EncryptionFailed",
    ):
        cls = getattr(exceptions, name)
        assert issubclass(cls, exceptions.PIIError)
        assert not issubclass(cls, ValueError)


def test_decryption_failed_has_one_fixed_message():
    """DecryptionFailed always says the same thing."""
    assert str(exceptions.DecryptionFailed()) == exceptions.DecryptionFailed.MESSAGE
