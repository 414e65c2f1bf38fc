"""The ``pii_*`` settings: one declarative table, parsed once into a frozen object.

Each :class:`Option` has a real Python type, a default, a converter that
validates and a one-line doc (docs/configuration.md is generated from this
table).  Celery's own string ``typemap`` is not used: it has drifted from its
table (``KeyError: 'bytes'``).

Settings come from ``app.conf`` (so Django's ``CELERY_PII_*`` with
``config_from_object(..., namespace="CELERY")`` works too).  An unknown
``pii_*`` key, a wrong type or an out-of-range value raises
:class:`~celery_pii.exceptions.ConfigurationError` naming the setting and the
fix.  Messages never echo a value: ``pii_master_key`` may hold key material.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

from ._crypto import Algorithm
from ._retention import MAX_DURATION, RetentionPolicy
from ._store import ACTOR_MAX_LENGTH
from .exceptions import ConfigurationError

__all__ = [
    "DETECT_MODES",
    "OPTIONS",
    "Option",
    "Settings",
    "as_written",
    "reference_markdown",
    "settings_from_conf",
]

DETECT_MODES: Final = ("off", "warn", "encrypt", "refuse")
INNER_SERIALIZERS: Final = ("json", "msgpack")
# Any key id in the store (derived ids add "@bucket" or start "subject.").
KEY_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@\-]{0,159}\Z")
# Key ids users choose: "@" and ":" are reserved for derived ids, "celery_pii." for ours,
# "subject." for subjects' keys (a derived message reads such an id as a subject's).
USER_KEY_ID_PATTERN: Final = re.compile(r"(?!celery_pii\.|subject\.)[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")


@dataclass(frozen=True, slots=True)
class Settings:
    """Every ``pii_*`` setting, validated.  Field names drop the ``pii_`` prefix."""

    # Not in the repr: a static: key, or the key store's password, would reach logs and error
    # trackers' captured locals with it.
    master_key: str = dataclasses.field(repr=False)
    previous_master_key: str | None = dataclasses.field(repr=False)
    key_store_url: str = dataclasses.field(repr=False)
    algorithm: Algorithm
    default_key: str
    inner_serializer: str
    compression_threshold: int | None
    key_cache_ttl: float
    key_cache_size: int
    key_recheck_interval: float
    rotation_interval: timedelta
    rotation_max_messages: int
    max_key_versions: int
    default_retention: RetentionPolicy
    detect: str
    redact_headers: bool
    allow_plaintext: bool
    quarantine_queue: str
    key_store_connect_timeout: float
    key_unavailable_retry_delay: float
    kms_endpoint_url: str | None
    kms_region: str | None
    actor: str | None


Converter = Callable[[Any, str], Any]


@dataclass(frozen=True, slots=True)
class Option:
    """One ``pii_*`` setting: its default, converter and documentation."""

    name: str
    default: Any
    convert: Converter
    doc: str
    type_doc: str

    @property
    def field(self) -> str:
        """The :class:`Settings` field this option fills."""
        return self.name.removeprefix("pii_")


def _fail(setting: str, expectation: str) -> ConfigurationError:
    return ConfigurationError(f"setting {setting}: {expectation}")


def _string(pattern: re.Pattern[str] | None = None, hint: str = "") -> Converter:
    def convert(value: Any, setting: str) -> str:
        if not isinstance(value, str) or not value:
            raise _fail(setting, "must be a non-empty string")
        if pattern is not None and not pattern.match(value):
            raise _fail(setting, hint)
        return value

    return convert


def _optional_string(value: Any, setting: str) -> str | None:
    if value is None:
        return None
    return _string()(value, setting)  # type: ignore[no-any-return]


def _optional_short_string(max_length: int) -> Converter:
    def convert(value: Any, setting: str) -> str | None:
        text = _optional_string(value, setting)
        if text is not None and len(text) > max_length:
            raise _fail(setting, f"must be at most {max_length} characters (the key store's column size)")
        return text

    return convert


def _choice(choices: tuple[str, ...]) -> Converter:
    def convert(value: Any, setting: str) -> str:
        if value not in choices:
            raise _fail(setting, "must be one of " + ", ".join(repr(c) for c in choices))
        return str(value)

    return convert


def _integer(low: int, high: int, *, allow_none: bool = False) -> Converter:
    def convert(value: Any, setting: str) -> int | None:
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            none = " or None" if allow_none else ""
            raise _fail(setting, f"must be an integer from {low} to {high}{none}")
        return value

    return convert


def _seconds(low: float, high: float) -> Converter:
    def convert(value: Any, setting: str) -> float:
        if isinstance(value, timedelta):
            value = value.total_seconds()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise _fail(setting, f"must be a number of seconds (or a timedelta) from {low} to {high}")
        return float(value)

    return convert


def _duration(value: Any, setting: str) -> timedelta:
    expectation = "must be a positive datetime.timedelta (or seconds) of at most 100 years"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            value = timedelta(seconds=value)
        except (OverflowError, ValueError):  # inf, nan, or too large for a timedelta
            raise _fail(setting, expectation) from None
    if not isinstance(value, timedelta) or not timedelta(0) < value <= MAX_DURATION:
        raise _fail(setting, expectation)
    return value


def _boolean(value: Any, setting: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(setting, "must be True or False")
    return value


def _algorithm(value: Any, setting: str) -> Algorithm:
    if isinstance(value, Algorithm):
        return value
    try:
        return Algorithm(value)
    except ValueError:
        choices = ", ".join(repr(a.value) for a in Algorithm)
        raise _fail(setting, f"must be one of {choices}") from None


def _retention(value: Any, setting: str) -> RetentionPolicy:
    if not isinstance(value, RetentionPolicy) or value.is_default:
        raise _fail(setting, "must be a RetentionPolicy other than use_default()")
    return value


def _master_key_spec(value: Any, setting: str) -> str:
    # Only the form is checked here; the key itself is loaded by _sources,
    # which never echoes it either.
    if not isinstance(value, str) or ":" not in value:
        raise _fail(
            setting,
            "must be a key source: 'env:NAME', 'file:PATH', 'static:BASE64' (tests only) "
            "or 'aws-kms://KEY-ID'",
        )
    return value


def _optional_master_key_spec(value: Any, setting: str) -> str | None:
    return None if value is None else _master_key_spec(value, setting)


#: What a key id users choose must look like (settings and the ``pii_key`` task option).
USER_KEY_ID_HINT: Final = (
    "must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit "
    "(not 'celery_pii.' or 'subject.', which are reserved)"
)

OPTIONS: Final[tuple[Option, ...]] = (
    Option(
        "pii_master_key",
        "env:CELERY_PII_MASTER_KEY",
        _master_key_spec,
        "Key source of the master key that wraps data keys (it never encrypts payloads): "
        "`env:NAME`, `file:PATH`, `static:BASE64` (tests only, warns) or `aws-kms://KEY-ID`.",
        "str",
    ),
    Option(
        "pii_previous_master_key",
        None,
        _optional_master_key_spec,
        "During a master-key rotation only: the master key being replaced, so keys wrapped under "
        "either key open (see docs/operations.md). Same forms as `pii_master_key`.",
        "str or None",
    ),
    Option(
        "pii_key_store_url",
        "sqlite:///celery_pii_keys.db",
        _string(),
        "SQLAlchemy URL of the key store (PostgreSQL, MySQL/MariaDB, SQLite).",
        "str",
    ),
    Option(
        "pii_algorithm",
        Algorithm.AES_256_GCM,
        _algorithm,
        "AEAD algorithm for newly generated data keys: `aes-256-gcm` or `chacha20-poly1305`.",
        "str",
    ),
    Option(
        "pii_default_key",
        "default",
        _string(USER_KEY_ID_PATTERN, USER_KEY_ID_HINT),
        "Key id for tasks that name none with the `pii_key=` task option.",
        "str",
    ),
    Option(
        "pii_inner_serializer",
        "json",
        _choice(INNER_SERIALIZERS),
        "How the rest of the message body is encoded: `json` or `msgpack` (extra `msgpack`; it writes no "
        "undeclared datetime, Decimal, UUID or integer beyond 64 bits: see migration.md).",
        "str",
    ),
    Option(
        "pii_compression_threshold",
        1024,
        _integer(0, 2**31, allow_none=True),
        "Bytes; a task's declared fields above it are zlib-compressed before encryption (never results "
        "or envelopes holding other arguments: lengths would leak, see security.md). `None` disables.",
        "int or None",
    ),
    Option(
        "pii_key_cache_ttl",
        3600.0,
        _seconds(1, 86400 * 7),
        "Seconds a data key stays in process memory; a process that cannot reach the key store "
        "stops using a key destroyed elsewhere within this time.",
        "float",
    ),
    Option(
        "pii_key_cache_size",
        10_000,
        _integer(1, 10_000_000),
        "Data key versions a process keeps in memory (about 3.5 KB each: one per data subject or "
        "retention bucket met); past it, the longest-held is dropped and read again from the key "
        "store when next needed.",
        "int",
    ),
    Option(
        "pii_key_recheck_interval",
        30.0,
        _seconds(0.1, 86400),
        "Seconds between a process's checks of the key store for keys destroyed elsewhere "
        "(erasure, retention, `destroy_key`) and versions retired elsewhere (a rotation, "
        "`retire_key`); every process stops opening a destroyed key, and sealing with a retired "
        "version, within about this time.",
        "float",
    ),
    Option(
        "pii_rotation_interval",
        timedelta(days=90),
        _duration,
        "Age after which `celery_pii.rotate_keys` makes a new key version (at most 100 years).",
        "timedelta",
    ),
    Option(
        "pii_rotation_max_messages",
        2**31,
        _integer(1, 2**32),
        "Encryptions under one key version after which it rotates (random 96-bit nonces).",
        "int",
    ),
    Option(
        "pii_max_key_versions",
        5,
        _integer(1, 1000),
        "Versions kept decryptable per key id (one active, the rest retired); "
        "`rotate_keys` destroys older ones, once retired for `pii_key_recheck_interval` + 5 min.",
        "int",
    ),
    Option(
        "pii_default_retention",
        RetentionPolicy.keep_indefinitely(),
        _retention,
        "Retention for tasks without `pii_retention=`.",
        "RetentionPolicy",
    ),
    Option(
        "pii_detect",
        "off",
        _choice(DETECT_MODES),
        "Automatic PII detection on publish: `off`, `warn` (log and count undeclared PII), "
        "`encrypt` (seal what it finds), `refuse` (publishing undeclared PII raises).",
        "str",
    ),
    Option(
        "pii_redact_headers",
        True,
        _boolean,
        "Replace argsrepr/kwargsrepr and every other repr of PII with redacted text.",
        "bool",
    ),
    Option(
        "pii_allow_plaintext",
        False,
        _boolean,
        "Rollout mode: workers also accept legacy plaintext `json` messages.",
        "bool",
    ),
    Option(
        "pii_quarantine_queue",
        "celery_pii.quarantine",
        _string(),
        "Queue where messages that fail authentication are parked, never silently dropped.",
        "str",
    ),
    Option(
        "pii_key_store_connect_timeout",
        5.0,
        _seconds(0.1, 300),
        "Seconds to wait for a connection to the key store before raising `KeyStoreUnavailable` "
        "(an answer on the publish and consume paths is waited for 10 s at most, whatever this is).",
        "float",
    ),
    Option(
        "pii_key_unavailable_retry_delay",
        5.0,
        _seconds(0, 3600),
        "Seconds before a task whose key store was unreachable is retried (doubling, at most "
        "ten times that).",
        "float",
    ),
    Option(
        "pii_kms_endpoint_url",
        None,
        _optional_string,
        "Endpoint of the AWS KMS API for `aws-kms://` master keys (default: AWS's own).",
        "str or None",
    ),
    Option(
        "pii_kms_region",
        None,
        _optional_string,
        "AWS region for `aws-kms://` master keys (default: a key ARN's own region, then the standard AWS "
        "settings); must match a key ARN's region.",
        "str or None",
    ),
    Option(
        "pii_actor",
        None,
        _optional_short_string(ACTOR_MAX_LENGTH),
        "Name recorded as the actor in key audit records, at most 255 characters (default: host and pid).",
        "str or None",
    ),
)

_BY_NAME: Final = {option.name: option for option in OPTIONS}


def settings_from_conf(conf: Mapping[str, Any]) -> Settings:
    """Read and validate every ``pii_*`` setting from a Celery ``app.conf``.

    Raises:
        ConfigurationError: an unknown ``pii_*`` key or an invalid value; the
            message names the setting and what it must be.
    """
    # Reading first also finalizes a lazy Celery configuration, which is when
    # it learns its namespace prefix (needed by _pii_keys).
    raw = {option.name: conf.get(option.name, option.default) for option in OPTIONS}
    spelled = _pii_keys(conf)
    if not _prefix(conf):
        unread = sorted(key for key in conf if key.upper().startswith("CELERY_PII_"))
        if unread:
            # Celery maps its own old CELERY_* names without a namespace, not these: they
            # would be ignored, and every pii_* setting left at its default.
            msg = (
                f"setting {unread[0]} is not read: the configuration has no namespace; load it with "
                "app.config_from_object('django.conf:settings', namespace='CELERY')"
            )
            raise ConfigurationError(msg)
    for key, written in spelled.items():
        if key not in _BY_NAME:
            close = difflib.get_close_matches(key, _BY_NAME, n=1)
            # Suggest in the spelling the user wrote (pii_x, or CELERY_PII_X under Django).
            suggestion = (
                written[: len(written) - len(key)] + close[0].upper() if close and written != key else None
            )
            hint = f" (did you mean {suggestion or close[0]}?)" if close else ""
            msg = f"unknown setting {written}{hint}; the pii_* settings are listed in docs/configuration.md"
            raise ConfigurationError(msg)
    # Errors name a setting as the user wrote it (CELERY_PII_* under Django's namespace).
    values = {
        option.field: option.convert(raw[option.name], spelled.get(option.name, option.name))
        for option in OPTIONS
    }
    return Settings(**values)


def as_written(error: ConfigurationError, conf: Mapping[str, Any]) -> ConfigurationError:
    """``error`` naming its settings as the configuration spells them (``CELERY_*`` under Django).

    For errors raised after the settings were read (the master key, the key
    store, Celery's own settings), which name them by their lowercase names.
    """
    spelled = _pii_keys(conf)
    prefix = _prefix(conf)

    def written(found: re.Match[str]) -> str:
        name = found.group(0)
        return spelled.get(name) or (prefix + name.upper() if prefix else name)

    text = str(error)
    renamed = _SETTING_NAME.sub(written, text)
    return error if renamed == text else ConfigurationError(renamed)


# The settings celery-pii's errors name: its own, and the Celery settings it checks.
_SETTING_NAME: Final = re.compile(
    r"\b(?:pii_[a-z_]+|task_serializer|task_protocol|result_accept_content|accept_content|result_serializer"
    r"|result_backend)\b"
)


def _prefix(conf: Mapping[str, Any]) -> str:
    """The namespace prefix a configuration was loaded with (``CELERY_`` for Django's), or ``""``."""
    prefix: str = getattr(conf, "__dict__", {}).get("prefix") or ""
    return prefix


def _pii_keys(conf: Mapping[str, Any]) -> dict[str, str]:
    """``pii_*`` keys of a configuration, normalized, mapped to how they were written."""
    # With config_from_object(..., namespace="CELERY"), Django-style keys are
    # stored as CELERY_PII_*; Celery resolves them on get() but keys() shows
    # them as written.
    prefix = _prefix(conf)
    found = {}
    for key in conf:
        name = key
        if prefix and name.upper().startswith(prefix.upper()):
            name = name[len(prefix) :]
        name = name.lower()
        if name.startswith("pii_"):
            found[name] = key
    return found


def reference_markdown() -> str:
    """docs/configuration.md, generated from :data:`OPTIONS` so the two cannot drift.

    Regenerate with ``python -c "from celery_pii._config import reference_markdown as r;
    print(r(), end='')" > docs/configuration.md``.
    """
    lines = [
        "# Configuration",
        "",
        "<!-- Generated from the settings table in celery_pii/_config.py; do not edit by hand. -->",
        "",
        "Every setting is read from `app.conf` (Celery style: lowercase, `pii_` prefix), so Django",
        'projects can set them as `CELERY_PII_*` with `app.config_from_object("django.conf:settings",',
        'namespace="CELERY")`. They are validated once, when `setup_pii(app)` runs: an unknown `pii_*`',
        "key, a wrong type or an out-of-range value raises `ConfigurationError` naming the setting.",
        "Set them before `setup_pii(app)`: one changed after it would not apply, so calling",
        "`setup_pii` again, or starting a worker, raises `ConfigurationError` naming it (and so does a",
        "Celery setting changed since that would let plaintext through, such as `task_serializer`).",
        "",
        "| setting | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for option in OPTIONS:
        default = option.default
        shown = default.value if isinstance(default, Algorithm) else default
        lines.append(f"| `{option.name}` | {option.type_doc} | `{shown!r}` | {option.doc} |")
    lines += [
        "",
        "Per-task options: `pii_fields` (field paths, see field-paths.md), `pii_key` (key id),",
        "`pii_retention` (a `RetentionPolicy`), `pii_subject` (field path of the data subject's id),",
        "`pii_detect` (overrides `pii_detect` for one task). Give them to the task decorator, as class",
        "attributes of a task class, or in Celery's `task_annotations` (for tasks you cannot decorate).",
        "Any other `pii_*` option the decorator, the task's own class body or the annotations give is",
        "refused when the task is registered (a misspelt one would otherwise leave the field unsealed);",
        "methods, and attributes a base class carries, are left alone.",
        "",
    ]
    return "\n".join(lines)
