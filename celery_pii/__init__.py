"""celery-pii: seal the personal data in Celery task messages.

Users name the PII fields of a task; celery-pii seals them with authenticated
encryption when the task is published and opens them just before the task
function runs.  See README.md and docs/.
"""

from __future__ import annotations

from ._celery import get_pii, setup_pii
from ._detect import Finding
from ._keys import AuditRecord, KeyManager, KeyStats
from ._migrate import migrate
from ._pii import PII
from ._retention import RetentionPolicy, RetentionReport
from ._sources import generate_master_key
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
    "PII",
    "AuditRecord",
    "ConfigurationError",
    "DecryptionFailed",
    "EncryptionFailed",
    "Finding",
    "KeyDestroyed",
    "KeyManager",
    "KeyNotFound",
    "KeyStats",
    "KeyStoreUnavailable",
    "PIIError",
    "RetentionPolicy",
    "RetentionReport",
    "__version__",
    "generate_master_key",
    "get_pii",
    "migrate",
    "setup_pii",
]
