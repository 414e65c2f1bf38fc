"""Master-key sources: where the key that wraps data keys comes from.

``pii_master_key`` names a source: ``env:NAME``, ``file:PATH``,
``static:BASE64`` (tests only; warns) or, with the ``aws`` extra,
``aws-kms://KEY-ID``.  Local sources hold base64 of exactly 32 bytes.

A master key only wraps and unwraps data keys; it never touches payloads.
Each master key has a *reference* (``MasterKey.ref``) stored beside every
wrapped key, so the key store can tell at start-up whether it was given the
right master key, and a re-wrap can proceed row by row.

Errors name the setting, the environment variable or the file, never the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from ._crypto import KEY_SIZE, Algorithm, DataKey
from .exceptions import ConfigurationError, DecryptionFailed

if TYPE_CHECKING:
    from ._config import Settings

__all__ = [
    "LocalMasterKey",
    "MasterKey",
    "MasterKeyFileWarning",
    "StaticMasterKeyWarning",
    "UnloadedMasterKey",
    "generate_master_key",
    "load_master_key",
    "register_master_key_source",
]

_SETTING: Final = "pii_master_key"
# Works without an app (`celery -A proj pii master-key generate` needs one that loads).
_GENERATE_HINT: Final = (
    "generate one with `python -c 'import celery_pii; print(celery_pii.generate_master_key())'`"
)
_PREVIOUS_SETTING: Final = "pii_previous_master_key"
_PREVIOUS_HINT: Final = (
    "give it the master key being replaced (the one the store's keys are wrapped under), "
    "or remove the setting once no key needs it (see 'Master-key rotation' in docs/operations.md)"
)
_WRAP_FORMAT: Final = b"\x01"


class StaticMasterKeyWarning(UserWarning):
    """A ``static:`` master key sits in configuration: fine for tests only."""


class MasterKeyFileWarning(UserWarning):
    """A ``file:`` master key that users other than its owner can read or change."""


class MasterKey(Protocol):
    """What the key store needs from a master key."""

    @property
    def ref(self) -> str:
        """A non-secret name of this master key, stored beside wrapped keys."""
        ...

    def wrap(self, material: bytes, *, context: bytes) -> bytes:
        """Wrap data-key material, binding ``context`` (key id, version, algorithm)."""
        ...

    def unwrap(self, wrapped: bytes, *, context: bytes) -> bytes:
        """Unwrap; ``DecryptionFailed`` if the key or context do not match."""
        ...


class LocalMasterKey:
    """A 32-byte master key held in process memory (env:, file:, static:)."""

    __slots__ = ("_aead", "ref")

    def __init__(self, material: bytes) -> None:
        if len(material) != KEY_SIZE:
            msg = f"master key must be {KEY_SIZE} bytes"
            raise ValueError(msg)
        self._aead = DataKey("master", 0, Algorithm.AES_256_GCM, material)
        digest = hmac.new(material, b"celery-pii master key reference", hashlib.sha256)
        self.ref = "local:" + digest.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"<LocalMasterKey {self.ref}>"

    def wrap(self, material: bytes, *, context: bytes) -> bytes:
        """Wrap with AES-256-GCM; ``context`` is the associated data."""
        return _WRAP_FORMAT + self._aead.seal(material, context)

    def unwrap(self, wrapped: bytes, *, context: bytes) -> bytes:
        """Unwrap what :meth:`wrap` made.

        Raises:
            DecryptionFailed: wrong master key, wrong context or damaged data.
        """
        if not wrapped.startswith(_WRAP_FORMAT):
            raise DecryptionFailed
        return self._aead.open(wrapped[1:], context)


SourceLoader = Callable[[str, "Settings | None"], MasterKey]
_SOURCES: dict[str, SourceLoader] = {}


def register_master_key_source(scheme: str, loader: SourceLoader) -> None:
    """Make ``pii_master_key = "<scheme>:..."`` load through ``loader``.

    ``loader(rest, settings)`` gets what follows ``scheme:``.
    """
    _SOURCES[scheme] = loader


def load_master_key(spec: str, settings: Settings | None = None, *, setting: str = _SETTING) -> MasterKey:
    """Load the master key a ``pii_master_key`` (or ``pii_previous_master_key``) value names.

    Raises:
        ConfigurationError: unknown source, missing variable or file, bad
            base64 or wrong length; the message names ``setting``, never the key.
    """
    scheme, sep, rest = spec.partition(":")
    loader = _SOURCES.get(scheme) if sep else None
    if loader is None:
        known = ", ".join(sorted(f"{name}:" for name in _SOURCES))
        msg = f"setting {setting}: unknown key source (known: {known})"
        raise ConfigurationError(msg)
    if setting == _SETTING:
        return loader(rest, settings)
    # Loaders name pii_master_key: another setting or option (--new-master-key) is named as given.
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            key = loader(rest, settings)
    except ConfigurationError as error:
        text = str(error).replace(_SETTING, setting)
        if setting == _PREVIOUS_SETTING:  # a new key opens nothing the old one wrapped
            text = text.replace(_GENERATE_HINT, _PREVIOUS_HINT)
        raise ConfigurationError(text) from None
    for warning in warned:
        warnings.warn(str(warning.message).replace(_SETTING, setting), warning.category, stacklevel=2)
    if hasattr(key, "setting"):  # a key whose errors come later, from its service (aws-kms://)
        cast("Any", key).setting = setting
    return key


class UnloadedMasterKey:
    """Stands in for a master key that could not be loaded, where a command needs none.

    ``celery -A proj pii db upgrade`` (run where the deploy builds, often
    without secrets), ``pii scan`` and ``pii master-key generate`` (how a first
    key is made) import the app, and ``setup_pii`` with it.  Any use raises the
    error loading the key raised.
    """

    __slots__ = ("_error",)

    def __init__(self, error: ConfigurationError) -> None:
        self._error = str(error)

    def __repr__(self) -> str:
        return "<UnloadedMasterKey>"

    @property
    def ref(self) -> str:
        """Never: raises the error loading the key raised."""
        raise ConfigurationError(self._error)

    def wrap(self, material: bytes, *, context: bytes) -> bytes:  # noqa: ARG002 - MasterKey's signature
        """Never: raises the error loading the key raised."""
        raise ConfigurationError(self._error)

    def unwrap(self, wrapped: bytes, *, context: bytes) -> bytes:  # noqa: ARG002 - MasterKey's signature
        """Never: raises the error loading the key raised."""
        raise ConfigurationError(self._error)


def generate_master_key() -> str:
    """A new random master key, base64-encoded for ``env:`` or ``file:``."""
    return base64.b64encode(os.urandom(KEY_SIZE)).decode("ascii")


def _decode(text: str, origin: str) -> LocalMasterKey:
    """The master key in ``text`` (base64 of 32 bytes).

    The text is held in no other frame of a traceback it raises: error trackers
    record frames' locals (Sentry does by default), and a key written as hex,
    say, is refused here but is the operator's key all the same.  So it is
    deleted, with what it decoded to, before an error is raised.
    """
    try:
        material = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        try:
            material = base64.urlsafe_b64decode(text.strip())
        except (binascii.Error, ValueError):
            del text
            msg = f"setting {_SETTING}: {origin} is not valid base64; {_GENERATE_HINT}"
            raise ConfigurationError(msg) from None
    if len(material) != KEY_SIZE:
        del text, material
        msg = f"setting {_SETTING}: {origin} must hold base64 of exactly {KEY_SIZE} bytes; {_GENERATE_HINT}"
        raise ConfigurationError(msg)
    return LocalMasterKey(material)


def _from_env(name: str, _settings: Settings | None) -> MasterKey:
    # The value is passed on, never named here (see _decode).
    return _decode(_environment_value(name), f"environment variable {name}")


def _environment_value(name: str) -> str:
    if not name:
        msg = f"setting {_SETTING}: 'env:' needs a variable name, e.g. env:CELERY_PII_MASTER_KEY"
        raise ConfigurationError(msg)
    if not os.environ.get(name):
        msg = f"setting {_SETTING}: environment variable {name} is not set; {_GENERATE_HINT}"
        raise ConfigurationError(msg)
    return os.environ[name]


def _from_file(path: str, _settings: Settings | None) -> MasterKey:
    # The text is passed on, never named here (see _decode).
    return _decode(_key_file_text(path), f"key file {path!r}")


def _key_file_text(path: str) -> str:
    try:
        mode = Path(path).stat().st_mode
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"setting {_SETTING}: cannot read key file {path!r} ({type(exc).__name__})"
        raise ConfigurationError(msg) from None
    if os.name == "posix" and mode & 0o077:
        warnings.warn(
            f"{_SETTING}: key file {path!r} is open to other users (mode {stat.S_IMODE(mode):04o}); "
            f"chmod 600 it, owned by the user the workers run as",
            MasterKeyFileWarning,
            stacklevel=4,
        )
    return text


def _from_static(text: str, _settings: Settings | None) -> MasterKey:
    warnings.warn(
        f"{_SETTING} uses a static: key written in configuration; use env: or file: outside tests",
        StaticMasterKeyWarning,
        stacklevel=3,
    )
    return _decode(text, "the static: key")


register_master_key_source("env", _from_env)
register_master_key_source("file", _from_file)
register_master_key_source("static", _from_static)

# aws-kms:// lives in its own module (boto3 is imported only when such a key is loaded).
from ._kms import register as _register_aws_kms  # noqa: E402 - after the names _kms imports from here

_register_aws_kms()
