"""celery-pii: seal the personal data in Celery task messages.

Users name the PII fields of a task; celery-pii seals them with authenticated
encryption when the task is published and opens them just before the task
function runs.  See README.md and docs/.
"""

from __future__ import annotations

from ._retention import RetentionPolicy
from .exceptions import (
    ConfigurationError,
    DecryptionFailed,
    EncryptionFailed,
    KeyDestroyed,
    KeyNotFound,
    KeyStoreUnavailable,
    PIIError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "DecryptionFailed",
    "EncryptionFailed",
    "KeyDestroyed",
    "KeyNotFound",
    "KeyStoreUnavailable",
    "PIIError",
    "RetentionPolicy",
    "__version__",
]
