"""Shared test configuration.

Integration tests (tests/integration) use the real PostgreSQL, MariaDB, Redis and RabbitMQ of
this machine; override their addresses with PII_TEST_POSTGRES_URL, PII_TEST_MARIADB_URL,
PII_TEST_REDIS_URL and PII_TEST_RABBITMQ_URL.
"""
