"""Benchmarks for celery-pii (run as modules: python -m benchmarks.<name>)."""
