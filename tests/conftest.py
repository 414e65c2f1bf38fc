"""Shared test configuration: where the real services are."""

from __future__ import annotations

import os

POSTGRES_URL = os.environ.get("PII_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("PII_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("PII_TEST_REDIS_URL", "redis://127.0.0.1:6379")
RABBITMQ_URL = os.environ.get("PII_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
