"""Exceptions raised by celery-pii.

The tree::

    PIIError
     +-- ConfigurationError (also ValueError)   bad setting, path, key source
     +-- KeyStoreUnavailable                    outage: retrying later helps
     +-- KeyNotFound                            no such key id / version
     +-- KeyDestroyed                           crypto-shredded: data is gone
     +-- DecryptionFailed                       tampered, wrong key, bad format
     +-- EncryptionFailed                       sealing could not happen

No message ever contains a payload value or key bytes: messages name setting
names, field paths, task names and key ids only.  kombu copies an inner
exception's message into its ``EncodeError``/``DecodeError``, and Celery logs
both, so this rule is what keeps plaintext out of logs on the error paths.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "DecryptionFailed",
    "EncryptionFailed",
    "KeyDestroyed",
    "KeyNotFound",
    "KeyStoreUnavailable",
    "PIIError",
]


class PIIError(Exception):
    """Root of every exception raised by celery-pii."""


class ConfigurationError(PIIError, ValueError):
    """A setting, field path or key source is invalid; the message names it."""


class KeyStoreUnavailable(PIIError):
    """The key store (or KMS) cannot be reached; retrying later may succeed."""


class KeyNotFound(PIIError):
    """No usable data key for the given key id (and version): absent, or its row cannot be unwrapped."""


class KeyDestroyed(PIIError):
    """The data key was destroyed (retention or erasure): the data is gone."""


class EncryptionFailed(PIIError):
    """Sealing could not happen; nothing was published."""


class DecryptionFailed(PIIError):
    """A sealed value could not be opened.

    One fixed message for every cause (tampering, truncation, wrong key,
    unknown format), like Fernet's ``InvalidToken``: telling them apart would
    help an attacker, not an operator.
    """

    MESSAGE = "sealed data could not be authenticated"

    def __init__(self, *_ignored: object) -> None:
        # Extra arguments are accepted (and dropped) so Celery can rebuild the
        # exception from a stored result, which passes the message back in.
        super().__init__(self.MESSAGE)
