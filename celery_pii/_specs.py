"""What celery-pii knows about each task: its PII options, validated once.

Users declare options on the task decorator (``@app.task(pii_fields=...)``),
as class attributes, or in Celery's ``task_annotations``; Celery turns them
into class attributes.  They are read and validated when the task is
registered (or when ``setup_pii`` runs, for tasks registered before it), so
a malformed path or a misspelt option fails at import time, not at first
publish.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ._config import DETECT_MODES, USER_KEY_ID_HINT, USER_KEY_ID_PATTERN, Settings
from ._keys import KeySpec
from ._paths import WILDCARD, Binder, parse_path
from ._retention import RetentionPolicy
from .exceptions import ConfigurationError

__all__ = ["TASK_OPTIONS", "TaskSpec", "spec_for_task"]

#: Task options celery-pii reads (DESIGN §1).
TASK_OPTIONS: Final = ("pii_fields", "pii_key", "pii_retention", "pii_subject", "pii_detect")


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """The PII configuration of one task."""

    name: str
    binder: Binder | None
    key_id: str
    retention: RetentionPolicy
    subject: Binder | None
    subject_path: str | None
    detect: str
    #: The key of this task when no subject or retention bucket applies.
    key_spec: KeySpec

    #: True when sealing a call of this task needs only its declared fields
    #: (names and dict keys) and its one fixed key: no subject, no retention
    #: deadline, no detection.  Set from the fields above.
    simple_sealing: bool = field(init=False)
    #: The parameter names the declared paths start with (``customer`` of ``customer.email``).
    declared_names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        # Worked out once: every publish of the task asks.
        heads = self.binder.heads if self.binder is not None else frozenset()
        object.__setattr__(self, "declared_names", heads)
        simple = (
            self.binder is not None
            and self.binder.simple
            and self.subject is None
            and self.retention.is_indefinite
            and self.detect == "off"
        )
        object.__setattr__(self, "simple_sealing", simple)

    @property
    def seals(self) -> bool:
        """True if publishing this task seals declared fields."""
        return self.binder is not None or self.subject is not None

    @property
    def is_pii(self) -> bool:
        """True if the task handles PII at all (declared or detected)."""
        return self.seals or self.detect != "off"


def check_user_key_id(key_id: object, where: str) -> str:
    """Validate a key id chosen by a user (``pii_key=`` or ``pii_default_key``).

    Raises:
        ConfigurationError: the id is empty, too long, uses reserved characters.
    """
    if not isinstance(key_id, str) or not USER_KEY_ID_PATTERN.match(key_id):
        msg = f"{where}: key ids {USER_KEY_ID_HINT}"
        raise ConfigurationError(msg)
    return key_id


def spec_for_task(task: Any, settings: Settings, annotations: Iterable[Any] = ()) -> TaskSpec | None:
    """Build the spec of a registered task, or ``None`` if it has no PII options.

    ``annotations``: the app's ``task_annotations``, prepared as Celery
    prepares them (Celery sets them on the task when it binds it, after it
    registered it: read here, or the options they give would be missed).

    Raises:
        ConfigurationError: an option is invalid; the message names the task and option.
    """
    name = str(getattr(task, "name", None) or type(task).__name__)
    options = _options_of(task, name, annotations)
    if all(value is None for value in options.values()):
        return None
    from ._taskclass import call_target  # noqa: PLC0415 - it imports the task context, which imports this

    return build_spec(name, call_target(task.run), options, settings)


def _options_of(task: Any, name: str, annotations: Iterable[Any]) -> dict[str, Any]:
    """The task's ``pii_*`` options, as Celery will have set them once the task is bound.

    Raises:
        ConfigurationError: an option celery-pii does not know (a misspelt
            ``pii_field`` would otherwise publish the field in plaintext).
    """
    from celery.app.annotations import resolve_all  # noqa: PLC0415 - Celery's own order of annotations

    given = {option: getattr(task, option, None) for option in TASK_OPTIONS}  # inherited ones too
    # What the decorator or the task's own class body sets (base classes may carry helpers and
    # flags of their own), and the annotations: where a misspelt option would be.
    declared = {
        name for name, value in vars(type(task)).items() if name.startswith("pii_") and not callable(value)
    }
    # Celery annotates the task class (Task.annotate); later annotations win, as its setattr calls.
    for annotation in resolve_all(annotations, type(task)):
        declared.update(key for key in annotation if isinstance(key, str) and key.startswith("pii_"))
        given.update((key, value) for key, value in annotation.items() if key in given)
    for option in sorted(declared - set(TASK_OPTIONS)):
        close = difflib.get_close_matches(option, TASK_OPTIONS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        msg = (
            f"task {name!r}: unknown task option {option}{hint}; celery-pii's task options are "
            f"{', '.join(TASK_OPTIONS)}"
        )
        raise ConfigurationError(msg)
    return {option: given.get(option) for option in TASK_OPTIONS}


def default_spec(name: str, settings: Settings) -> TaskSpec:
    """The spec of a task without options: only the app-wide detection mode applies."""
    return TaskSpec(
        name=name,
        binder=None,
        key_id=settings.default_key,
        retention=settings.default_retention,
        subject=None,
        subject_path=None,
        detect=settings.detect,
        key_spec=KeySpec(settings.default_key),
    )


def build_spec(name: str, fun: Any, options: Mapping[str, Any], settings: Settings) -> TaskSpec:
    """Validate task options against the task function's signature.

    Raises:
        ConfigurationError: naming the task and the option at fault.
    """
    fields = options.get("pii_fields")
    # A collection, read as often as the task is registered: an iterator's paths would be
    # used up by the first reading, and the fields then published in plaintext.
    if fields is not None and (
        isinstance(fields, str)
        or not isinstance(fields, Collection)
        or not all(isinstance(p, str) for p in fields)
    ):
        msg = f"task {name!r}: pii_fields must be a list of field paths (strings)"
        raise ConfigurationError(msg)
    subject_path = options.get("pii_subject")
    sealed_paths = list(fields or ())
    if isinstance(subject_path, str) and subject_path not in sealed_paths:
        # The subject's id says whom the message is about: personal data itself (often an email).
        sealed_paths.append(subject_path)
    binder = Binder(fun, sealed_paths, task=name) if sealed_paths else None

    key_id = options.get("pii_key")
    key_id = settings.default_key if key_id is None else check_user_key_id(key_id, f"task {name!r}: pii_key")

    retention = options.get("pii_retention")
    if retention is None:
        retention = settings.default_retention
    elif not isinstance(retention, RetentionPolicy):
        msg = (
            f"task {name!r}: pii_retention must be a RetentionPolicy (e.g. RetentionPolicy.delete_after(...))"
        )
        raise ConfigurationError(msg)
    retention = retention.resolve(settings.default_retention)

    subject = None
    if subject_path is not None:
        if WILDCARD in parse_path(subject_path, task=name):
            # Several values, one key: erasing any but the one picked would leave the message readable.
            msg = f"task {name!r}: pii_subject {subject_path!r} must name one value, not every item ([*])"
            raise ConfigurationError(msg)
        # Never a guess among positional arguments: a subject's id given so on a task that
        # lost its signature is absent, and publishing refuses (EncryptionFailed).
        subject = Binder(fun, [subject_path], task=name, sealing=False)

    detect = options.get("pii_detect")
    if detect is None:
        detect = settings.detect
    elif detect not in DETECT_MODES:
        msg = f"task {name!r}: pii_detect must be one of " + ", ".join(repr(m) for m in DETECT_MODES)
        raise ConfigurationError(msg)
    return TaskSpec(
        name=name,
        binder=binder,
        key_id=key_id,
        retention=retention,
        subject=subject,
        subject_path=subject_path,
        detect=detect,
        key_spec=KeySpec(key_id),
    )
