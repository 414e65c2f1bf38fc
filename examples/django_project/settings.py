"""Django-style settings: Celery reads every ``CELERY_*`` name, celery-pii its ``CELERY_PII_*`` ones.

In a Django project this is your ``settings.py`` and the Celery app calls
``app.config_from_object("django.conf:settings", namespace="CELERY")``.  Here it
is a plain module, so the example runs without Django installed.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from celery_pii import RetentionPolicy

BASE_DIR = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get("EXAMPLE_DATA_DIR", BASE_DIR / "data"))

# Django's own settings (ignored by Celery: no CELERY_ prefix).
DEBUG = False
INSTALLED_APPS = ["django.contrib.contenttypes", "shop"]

# Celery, as Django projects name it: task_serializer -> CELERY_TASK_SERIALIZER, ...
CELERY_BROKER_URL = "filesystem://"
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "data_folder_in": str(DATA_DIR / "broker"),
    "data_folder_out": str(DATA_DIR / "broker"),
    "control_folder": str(DATA_DIR / "control"),  # kombu's default is ./control
    "polling_interval": 0.1,
}
CELERY_RESULT_BACKEND = f"file://{DATA_DIR / 'results'}"
CELERY_TASK_SERIALIZER = "pii"
CELERY_RESULT_SERIALIZER = "pii"
CELERY_ACCEPT_CONTENT = ["pii"]
CELERY_RESULT_ACCEPT_CONTENT = ["pii"]
CELERY_TASK_DEFAULT_QUEUE = f"shop-{os.getpid()}"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# celery-pii: pii_master_key -> CELERY_PII_MASTER_KEY, and so on.
CELERY_PII_MASTER_KEY = "env:CELERY_PII_MASTER_KEY"  # the setting names where the key is, not the key
CELERY_PII_KEY_STORE_URL = f"sqlite:///{DATA_DIR / 'keys.db'}"
CELERY_PII_DEFAULT_KEY = "shop-orders"
CELERY_PII_DEFAULT_RETENTION = RetentionPolicy.delete_after(timedelta(days=30))
CELERY_PII_ACTOR = "django-shop"
