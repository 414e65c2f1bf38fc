"""Tests for celery_pii._config."""

from __future__ import annotations

import dataclasses
import math
from datetime import timedelta

import pytest
from celery import Celery

from celery_pii import RetentionPolicy
from celery_pii._config import OPTIONS, Settings, settings_from_conf
from celery_pii._crypto import Algorithm
from celery_pii.exceptions import ConfigurationError


def _conf(**settings):
    app = Celery("t", set_as_current=False)
    app.conf.update(settings)
    return app.conf


class TestTable:
    """Tests for the declarative table itself."""

    def test_table_and_settings_agree(self):
        """Every option fills exactly one Settings field and every field has an option."""
        assert [o.field for o in OPTIONS] == [f.name for f in dataclasses.fields(Settings)]
        assert all(o.name.startswith("pii_") and o.doc.endswith(".") for o in OPTIONS)

    def test_defaults_are_valid(self):
        """Every default passes its own validation."""
        settings = settings_from_conf(_conf())
        assert settings.algorithm is Algorithm.AES_256_GCM
        assert settings.rotation_interval == timedelta(days=90)
        assert settings.default_retention == RetentionPolicy.keep_indefinitely()
        assert settings.compression_threshold == 1024
        assert settings.detect == "off"

    def test_frozen(self):
        """Settings cannot be changed after parsing."""
        settings = settings_from_conf(_conf())
        with pytest.raises(dataclasses.FrozenInstanceError):
            settings.detect = "warn"  # type: ignore[misc]


class TestValidation:
    """Tests for reading settings from app.conf."""

    def test_values_are_read(self):
        """Valid values are converted to their real types."""
        settings = settings_from_conf(
            _conf(
                pii_algorithm="chacha20-poly1305",
                pii_rotation_interval=3600,
                pii_key_cache_ttl=timedelta(minutes=5),
                pii_key_cache_size=500,
                pii_compression_threshold=None,
                pii_detect="encrypt",
                pii_default_retention=RetentionPolicy.delete_after(timedelta(days=30)),
            )
        )
        assert settings.algorithm is Algorithm.CHACHA20_POLY1305
        assert settings.rotation_interval == timedelta(hours=1)
        assert settings.key_cache_ttl == 300.0
        assert settings.key_cache_size == 500
        assert settings.compression_threshold is None
        assert settings.detect == "encrypt"

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("pii_algorithm", "aes-128-cbc"),
            ("pii_detect", "maybe"),
            ("pii_max_key_versions", 0),
            ("pii_max_key_versions", True),
            ("pii_max_key_versions", "5"),
            ("pii_compression_threshold", -1),
            ("pii_key_cache_ttl", 0),
            ("pii_key_cache_size", 0),
            ("pii_key_cache_size", 2.5),
            ("pii_rotation_interval", timedelta(0)),
            ("pii_rotation_interval", "90d"),
            ("pii_redact_headers", "yes"),
            ("pii_allow_plaintext", 1),
            ("pii_default_key", "has space"),
            ("pii_default_key", ""),
            ("pii_default_key", "celery_pii.subject-index"),
            ("pii_default_key", "subject.0f3a9c"),
            ("pii_inner_serializer", "pickle"),
            ("pii_default_retention", "30 days"),
            ("pii_default_retention", RetentionPolicy.use_default()),
            ("pii_master_key", "just-a-key-without-scheme"),
            ("pii_rotation_max_messages", 2**40),
            ("pii_rotation_interval", timedelta.max),
            ("pii_rotation_interval", timedelta(days=10**6)),
            ("pii_rotation_interval", math.inf),
            ("pii_rotation_interval", -math.inf),
            ("pii_rotation_interval", math.nan),
            ("pii_rotation_interval", 1e300),
            ("pii_key_cache_ttl", math.nan),
            ("pii_key_recheck_interval", math.inf),
            ("pii_key_cache_ttl", timedelta.max),
            ("pii_actor", "billing-worker-" + "x" * 300),
            ("pii_actor", ""),
        ],
    )
    def test_bad_values_name_the_setting(self, name, value):
        """A wrong type or out-of-range value raises ConfigurationError naming the setting, not the value."""
        with pytest.raises(ConfigurationError) as info:
            settings_from_conf(_conf(**{name: value}))
        assert name in str(info.value)
        if isinstance(value, str) and len(value) > 3:
            assert value not in str(info.value)

    def test_limits_themselves_are_accepted(self):
        """100 years of rotation interval and a 255-character actor (the column size) are valid."""
        settings = settings_from_conf(_conf(pii_rotation_interval=timedelta(days=36525), pii_actor="a" * 255))
        assert settings.rotation_interval == timedelta(days=36525)
        assert settings.actor == "a" * 255

    def test_unknown_pii_setting(self):
        """An unknown pii_* key is refused with a suggestion."""
        with pytest.raises(ConfigurationError, match=r"unknown setting pii_detekt.*did you mean pii_detect"):
            settings_from_conf(_conf(pii_detekt="warn"))

    def test_other_settings_are_ignored(self):
        """Non-pii settings are not our business."""
        settings_from_conf(_conf(task_serializer="json", piinot="x"))

    def test_master_key_value_is_never_echoed(self):
        """Even an invalid master key spec does not appear in the message."""
        with pytest.raises(ConfigurationError) as info:
            settings_from_conf(_conf(pii_master_key="c2VjcmV0LWtleS1tYXRlcmlhbA=="))
        assert "c2VjcmV0" not in str(info.value)

    def test_repr_shows_no_secret(self):
        """The settings' repr (in logs, and in error trackers' captured locals) holds no key or password.

        It showed a static: master key and the key store URL with its password.
        """
        key = "c2VjcmV0LWtleS1tYXRlcmlhbC0wMTIzNDU2Nzg5YWI="
        settings = settings_from_conf(
            _conf(
                pii_master_key=f"static:{key}",
                pii_previous_master_key=f"static:{key[::-1]}",
                pii_key_store_url="postgresql+psycopg://app:hunter2-db-password@db.example.com/keys",
            )
        )
        shown = repr(settings)
        assert "default_key=" in shown
        for secret in (key, key[::-1], "hunter2-db-password"):
            assert secret not in shown


class TestDjango:
    """Settings given Django-style, CELERY_PII_* with namespace='CELERY'."""

    def test_namespace(self, tmp_path, monkeypatch):
        """CELERY_PII_* keys are read, and unknown ones are refused."""
        (tmp_path / "djsettings.py").write_text(
            "CELERY_PII_DETECT = 'warn'\nCELERY_PII_MAX_KEY_VERSIONS = 7\nCELERY_TASK_SERIALIZER = 'pii'\n"
        )
        (tmp_path / "djbad.py").write_text("CELERY_PII_DEFAULT_KEYS = 'x'\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        app = Celery("dj", set_as_current=False)
        app.config_from_object("djsettings", namespace="CELERY")
        settings = settings_from_conf(app.conf)
        assert (settings.detect, settings.max_key_versions) == ("warn", 7)
        bad = Celery("dj2", set_as_current=False)
        bad.config_from_object("djbad", namespace="CELERY")
        # Named as the user wrote it, with the suggestion in the same spelling.
        with pytest.raises(
            ConfigurationError, match=r"CELERY_PII_DEFAULT_KEYS \(did you mean CELERY_PII_DEFAULT_KEY"
        ):
            settings_from_conf(bad.conf)

    def test_a_wrong_value_names_the_setting_as_written(self, tmp_path, monkeypatch):
        """A bad CELERY_PII_ALGORITHM is named so, not as pii_algorithm, which the user never wrote."""
        (tmp_path / "djwrong.py").write_text("CELERY_PII_ALGORITHM = 'aes-128'\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        app = Celery("dj3", set_as_current=False)
        app.config_from_object("djwrong", namespace="CELERY")
        with pytest.raises(ConfigurationError, match=r"^setting CELERY_PII_ALGORITHM: must be one of"):
            settings_from_conf(app.conf)
        # Celery style stays as it was.
        with pytest.raises(ConfigurationError, match=r"^setting pii_algorithm: must be one of"):
            settings_from_conf(_conf(pii_algorithm="aes-128"))

    def test_master_key_and_key_store_errors_name_the_settings_as_written(self, tmp_path, monkeypatch):
        """Raised once the settings are read (setup_pii), they named pii_master_key / pii_key_store_url."""
        from celery_pii import setup_pii

        monkeypatch.delenv("PII_TEST_NO_SUCH_VARIABLE", raising=False)
        (tmp_path / "djkeys.py").write_text(
            "CELERY_TASK_SERIALIZER = 'pii'\nCELERY_RESULT_SERIALIZER = 'pii'\nCELERY_ACCEPT_CONTENT = ['pii']\n"
            "CELERY_PII_MASTER_KEY = 'env:PII_TEST_NO_SUCH_VARIABLE'\n"
            f"CELERY_PII_KEY_STORE_URL = 'sqlite:///{tmp_path}/keys.db'\n"
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        app = Celery("dj4", set_as_current=False)
        app.config_from_object("djkeys", namespace="CELERY")
        with pytest.raises(ConfigurationError, match=r"^setting CELERY_PII_MASTER_KEY: ") as info:
            setup_pii(app)
        assert "pii_master_key" not in str(info.value)

    def test_celery_settings_are_named_as_written_too(self, tmp_path, monkeypatch):
        """Errors about Celery's own settings name them as a Django user writes them (CELERY_TASK_SERIALIZER)."""
        from celery_pii import setup_pii

        (tmp_path / "djceleryside.py").write_text(
            "CELERY_TASK_SERIALIZER = 'json'\nCELERY_PII_DETECT = 'warn'\n"
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        app = Celery("dj5", set_as_current=False)
        app.config_from_object("djceleryside", namespace="CELERY")
        with pytest.raises(ConfigurationError) as info:
            setup_pii(app)
        assert str(info.value) == (
            "setting CELERY_TASK_SERIALIZER: must be 'pii', or task messages go out in plaintext; "
            "set CELERY_TASK_SERIALIZER='pii'"
        )

    def test_settings_without_the_namespace_are_refused(self, tmp_path, monkeypatch):
        """CELERY_PII_* loaded without namespace='CELERY': refused, not ignored.

        Celery maps its own CELERY_TASK_SERIALIZER and the like without a
        namespace, so its checks passed, while every CELERY_PII_* setting was
        ignored (a key store in each host's working directory, keep-forever
        retention).
        """
        (tmp_path / "djnons.py").write_text(
            "CELERY_TASK_SERIALIZER = 'pii'\nCELERY_PII_KEY_STORE_URL = 'postgresql://db.example.com/keys'\n"
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        app = Celery("dj6", set_as_current=False)
        app.config_from_object("djnons")
        with pytest.raises(
            ConfigurationError,
            match=r"^setting CELERY_PII_KEY_STORE_URL is not read: .*namespace='CELERY'",
        ):
            settings_from_conf(app.conf)


def test_configuration_doc_is_current():
    """docs/configuration.md is exactly what the settings table generates."""
    from pathlib import Path

    from celery_pii._config import reference_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert doc.read_text() == reference_markdown(), (
        "regenerate it from celery_pii._config.reference_markdown()"
    )
