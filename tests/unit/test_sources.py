"""Tests for celery_pii._sources."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys

import pytest

from celery_pii._sources import (
    LocalMasterKey,
    MasterKeyFileWarning,
    StaticMasterKeyWarning,
    generate_master_key,
    load_master_key,
    register_master_key_source,
)
from celery_pii.exceptions import ConfigurationError, DecryptionFailed

KEY = generate_master_key()


class TestLoading:
    """Tests for the env:, file: and static: sources."""

    def test_env(self, monkeypatch):
        """env:NAME reads base64 of 32 bytes from the environment."""
        monkeypatch.setenv("PII_TEST_MK", KEY)
        assert load_master_key("env:PII_TEST_MK").ref == load_master_key(f"static:{KEY}").ref

    def test_file(self, tmp_path):
        """file:PATH reads the key, ignoring surrounding whitespace."""
        path = tmp_path / "mk"
        path.write_text(KEY + "\n")
        path.chmod(0o600)
        assert isinstance(load_master_key(f"file:{path}"), LocalMasterKey)

    @pytest.mark.parametrize("mode", [0o644, 0o640, 0o606, 0o666])
    def test_a_key_file_open_to_other_users_warns(self, tmp_path, mode):
        """A key file the group or others can read or change loads, with a warning naming its mode.

        It loaded silently (SSH refuses such a private key file).
        """
        path = tmp_path / "mk"
        path.write_text(KEY)
        path.chmod(mode)
        with pytest.warns(MasterKeyFileWarning, match=f"mode {mode:04o}.*chmod 600"):
            assert isinstance(load_master_key(f"file:{path}"), LocalMasterKey)

    @pytest.mark.parametrize("source", ["env", "file"])
    @pytest.mark.parametrize("written", ["hex", "wrong length"])
    def test_a_refused_key_is_in_no_frame_of_the_traceback(self, tmp_path, monkeypatch, source, written):
        """An error tracker recording frames' locals (Sentry's default) gets no key from a refused one.

        A key written as hex (``openssl rand -hex 32``) was refused, but it sat
        in the raising frames' locals (``value``, ``text``): once converted to
        base64 it is the operator's master key.
        """
        material = os.urandom(32)
        text = material.hex() if written == "hex" else base64.b64encode(material[:31]).decode()
        if source == "env":
            monkeypatch.setenv("PII_TEST_MK", text)
            spec = "env:PII_TEST_MK"
        else:
            path = tmp_path / "mk"
            path.write_text(text)
            path.chmod(0o600)
            spec = f"file:{path}"
        with pytest.raises(ConfigurationError) as info:
            load_master_key(spec)
        traceback = info.value.__traceback__.tb_next  # past this test's own frame
        frames = 0
        while traceback is not None:
            for name, value in traceback.tb_frame.f_locals.items():
                shown = value if isinstance(value, (str, bytes)) else repr(value)
                assert text not in str(shown), name
                assert not isinstance(value, bytes) or material[:31] not in value, name
            frames += 1
            traceback = traceback.tb_next
        assert frames >= 3  # load_master_key, the source's loader, _decode

    def test_static_warns(self):
        """static: works but warns that it is for tests only."""
        with pytest.warns(StaticMasterKeyWarning, match="^pii_master_key uses a static: key"):
            load_master_key(f"static:{KEY}")

    def test_the_warning_names_the_option_it_came_from(self):
        """A static: key given to ``rewrap --new-master-key`` warned about pii_master_key."""
        with pytest.warns(StaticMasterKeyWarning, match="^--new-master-key uses a static: key"):
            load_master_key(f"static:{KEY}", setting="--new-master-key")

    def test_urlsafe_base64_accepted(self):
        """URL-safe base64 is accepted too."""
        raw = bytes(range(250, 256)) * 5 + b"\xfb\xff"
        load_master_key("static:" + base64.urlsafe_b64encode(raw).decode())

    @pytest.mark.parametrize(
        ("spec", "expected"),
        [
            ("env:PII_TEST_MISSING", "environment variable PII_TEST_MISSING is not set"),
            ("env:", "needs a variable name"),
            ("file:/nonexistent/mk", "cannot read key file '/nonexistent/mk'"),
            ("static:not*base64*at*all", "not valid base64"),
            ("static:" + base64.b64encode(b"short").decode(), "exactly 32 bytes"),
            ("vault:secret/x", "unknown key source"),
        ],
    )
    def test_errors_name_the_setting(self, spec, expected, monkeypatch):
        """Each failure names pii_master_key and what is wrong, never the key."""
        monkeypatch.delenv("PII_TEST_MISSING", raising=False)
        with pytest.raises(ConfigurationError) as info:
            load_master_key(spec)
        message = str(info.value)
        assert "pii_master_key" in message
        assert expected in message

    def test_the_missing_key_error_gives_a_command_that_runs_without_it(self, monkeypatch):
        """The hint works where the key is missing (``celery pii master-key generate`` loads the app, which needs it)."""
        monkeypatch.delenv("PII_TEST_MISSING", raising=False)
        with pytest.raises(ConfigurationError) as info:
            load_master_key("env:PII_TEST_MISSING")
        command = re.search(r"`python -c '([^']+)'`", str(info.value))
        assert command is not None
        env = {name: value for name, value in os.environ.items() if name != "CELERY_PII_MASTER_KEY"}
        printed = subprocess.run(
            [sys.executable, "-c", command.group(1)], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert len(base64.b64decode(printed.strip(), validate=True)) == 32

    @pytest.mark.parametrize(
        "spec",
        ["env:PII_TEST_MISSING", "static:not*base64*at*all", "static:" + base64.b64encode(b"x").decode()],
    )
    def test_a_previous_key_that_cannot_be_loaded_is_not_told_to_be_generated(self, spec, monkeypatch):
        """The previous master key is the one being replaced: a new one would open nothing it wrapped."""
        monkeypatch.delenv("PII_TEST_MISSING", raising=False)
        with pytest.raises(ConfigurationError) as info:
            load_master_key(spec, setting="pii_previous_master_key")
        message = str(info.value)
        assert message.startswith("setting pii_previous_master_key: ")
        assert "generate" not in message
        assert "the master key being replaced" in message

    def test_wrong_length_key_never_echoed(self, monkeypatch):
        """A 31-byte key in the environment is refused without echoing it."""
        value = base64.b64encode(b"k" * 31).decode()
        monkeypatch.setenv("PII_TEST_MK", value)
        with pytest.raises(ConfigurationError) as info:
            load_master_key("env:PII_TEST_MK")
        assert value not in str(info.value)

    def test_registry_plugs_in_new_schemes(self):
        """A registered scheme is used for its prefix (how aws-kms:// plugs in)."""
        seen = []

        def loader(rest, settings):
            seen.append(rest)
            return LocalMasterKey(bytes(32))

        register_master_key_source("pii-test-scheme", loader)
        load_master_key("pii-test-scheme://abc")
        assert seen == ["//abc"]


class TestLocalMasterKey:
    """Tests for wrapping with a local master key."""

    def test_wrap_round_trip_bound_to_context(self):
        """Wrapped material unwraps only with the same context and key."""
        master = LocalMasterKey(bytes(32))
        wrapped = master.wrap(b"m" * 32, context=b"orders/1/aes")
        assert master.unwrap(wrapped, context=b"orders/1/aes") == b"m" * 32
        with pytest.raises(DecryptionFailed):
            master.unwrap(wrapped, context=b"orders/2/aes")
        with pytest.raises(DecryptionFailed):
            LocalMasterKey(bytes([1]) * 32).unwrap(wrapped, context=b"orders/1/aes")

    def test_ref_is_stable_and_not_the_key(self):
        """The reference identifies the key without revealing it."""
        material = bytes(range(32))
        master = LocalMasterKey(material)
        assert master.ref == LocalMasterKey(material).ref != LocalMasterKey(bytes(32)).ref
        assert material.hex()[:16] not in master.ref
        assert master.ref in repr(master)
