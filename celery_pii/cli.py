"""``celery -A proj pii ...``: the operator's commands (entry point group ``celery.commands``).

Every command has ``--help``; errors exit 1, usage errors 2 (and an app that
``setup_pii`` refuses as it is imported: Celery reports that).  Commands that
list things take ``--json``; the others print short human lines.  Commands
that destroy or replace things ask first (``--yes`` skips the question).
Nothing here prints a payload value or key material, except ``master-key
generate``, whose whole point is to print a new key (to standard output only).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, Final, TypeVar

import click
from alembic.util import CommandError as AlembicError
from dateutil.parser import isoparse
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import SQLAlchemyError

from . import _celery, _quarantine, _rewrap
from ._detect import locate_with_status, shown_path
from ._keys import KeyInfo, KeyManager, check_not_reserved
from ._migrate import current_revision, known_revision, migrate
from ._pii import PII
from ._sources import generate_master_key, load_master_key
from ._store import DESTROYED, failure_reason, utcnow
from .exceptions import KeyNotFound, PIIError

__all__ = ["pii"]

try:  # py-amqp (kombu's own dependency) raises its own errors: a refused login, a missing vhost
    from amqp.exceptions import AMQPError

    _BROKER_ERRORS: tuple[type[BaseException], ...] = (BrokerError, AMQPError)
except ImportError:  # pragma: no cover - a kombu without py-amqp
    _BROKER_ERRORS = (BrokerError,)

_F = TypeVar("_F", bound=Callable[..., Any])


def _defers_store_checks(argv: Sequence[str]) -> bool:
    """True for ``celery ... pii db ...`` (the store may have no tables yet) and commands needing no store.

    Those are ``scan``, ``master-key generate``, ``--help`` and a group alone.  Only the
    command itself counts, the words right after ``pii``: ``pii keys generate
    db`` or ``worker -Q db`` must not skip the check that the master key
    matches the store (nor ``worker -Q pii``: ``pii`` alone at the end is no
    command).  A ``--help`` anywhere after a ``pii`` only prints help.
    """
    words = list(argv)
    for at, word in enumerate(words):  # every "pii": the app itself may be named so (-A pii)
        if word != "pii":
            continue
        command = words[at + 1 : at + 3]
        if command[:1] in (["db"], ["scan"]) or command == ["master-key", "generate"]:
            return True
        if "--help" in words[at + 1 :]:
            return True
    # ``pii`` or one of its groups alone prints the commands (as --help does).
    after = words[words.index("pii") + 1 :] if _celery.celery_subcommand(words) == "pii" else None
    return after is not None and (after == [] or (len(after) == 1 and after[0] in _GROUPS))


# ``pii`` and its groups: given alone, they print their commands.
_GROUPS: Final = frozenset(("db", "keys", "master-key", "quarantine"))


# Celery imports this module (an entry point) before it imports the app named
# with -A; ``setup_pii`` in that app then leaves the key-store checks to the
# ``db`` commands, which exist to create what those checks look for.
_celery.defer_store_checks(enabled=_defers_store_checks(sys.argv))


def _app(ctx: click.Context) -> Any:
    app = getattr(ctx.obj, "app", None)  # celery's CLIContext
    if app is None:
        msg = "no Celery app: run it as `celery -A proj pii ...`"
        raise click.UsageError(msg)
    return app


def _pii(ctx: click.Context) -> PII:
    try:
        return _celery.get_pii(_app(ctx))
    except PIIError as error:
        if ctx.find_root().params.get("app") is None:  # no -A: Celery gave its default app
            msg = "no Celery app given: run it as `celery -A proj pii ...` (proj calls setup_pii)"
            raise click.UsageError(msg) from None
        raise click.ClickException(str(error)) from None


def _errors(fun: _F) -> _F:
    """Turn the library's errors into exit code 1 with their (value-free) message."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fun(*args, **kwargs)
        except PIIError as error:
            msg = f"{type(error).__name__}: {error}"
            raise click.ClickException(msg) from None
        except SQLAlchemyError as error:  # the db commands reach the store without the library's wrapping
            msg = f"setting pii_key_store_url: the key store failed ({failure_reason(error)})"
            raise click.ClickException(msg) from None
        except _BROKER_ERRORS as error:  # down, a refused login, a missing vhost
            msg = f"setting broker_url: the broker cannot be used ({_broker_reason(error)})"
            raise click.ClickException(msg) from None
        except AlembicError as error:  # `db upgrade --revision` naming no revision, a lost upgrade race
            msg = f"pii db: {error}"
            raise click.ClickException(msg) from None

    wrapper.__name__ = fun.__name__
    wrapper.__doc__ = fun.__doc__
    return wrapper  # type: ignore[return-value]


def _broker_reason(error: BaseException) -> str:
    """The error's type and the first line of what the broker or its client said (never a password)."""
    lines = str(error).strip().splitlines()
    reason = _URL_PASSWORD.sub(r"\1***@", lines[0].strip()) if lines else ""
    if len(reason) > _REASON_LENGTH:
        reason = reason[: _REASON_LENGTH - 1] + "…"
    return f"{type(error).__name__}: {reason}" if reason else type(error).__name__


# ``scheme://user:password@``: a client that quotes the URL it was given.
_URL_PASSWORD: Final = re.compile(r"(\w+://[^:/@\s]*:)[^@\s]*@")
_REASON_LENGTH: Final = 160


def _json_option(fun: _F) -> _F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fun)


def _yes_option(fun: _F) -> _F:
    return click.option("--yes", is_flag=True, help="Do not ask for confirmation.")(fun)


def _emit(rows: Iterable[dict[str, Any]], columns: Sequence[str], *, as_json: bool) -> None:
    rows = list(rows)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=_plain))
        return
    if not rows:
        click.echo("(none)")
        return
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    click.echo("  ".join(column.upper().ljust(widths[i]) for i, column in enumerate(columns)).rstrip())
    for line in cells:
        click.echo("  ".join(value.ljust(widths[i]) for i, value in enumerate(line)).rstrip())


def _plain(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    # Parked messages' headers come from whoever wrote to the broker: a newline would
    # print a row of its own, an escape sequence would reach the terminal.
    return str(value).translate(_CONTROL_ESCAPES)


# C0 and C1 controls (0x9b starts an escape sequence on some terminals) and the bidi
# overrides that reorder what is shown.
_CONTROL_ESCAPES: Final = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in [*range(0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
}


def _confirm(message: str, *, yes: bool) -> None:
    if not yes:
        click.confirm(message, abort=True)


@click.group(name="pii")
def pii() -> None:
    """celery-pii: key store, keys, master key, PII scan, erasure and quarantine."""


# -- db ---------------------------------------------------------------------------------------------


@pii.group(name="db")
def db() -> None:
    """The key store's tables (Alembic migrations)."""


@db.command(name="upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@click.pass_context
@_errors
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Create or upgrade the key store's tables (pii_key_store_url); never downgrades."""
    url = _settings_url(ctx)
    before = current_revision(url)
    if before is not None and known_revision(before) is None:
        msg = (
            f"the key store is at revision {before}, which this release of celery-pii does not know: "
            "a newer release upgraded it (db upgrade does not downgrade; use that release)"
        )
        raise click.ClickException(msg)
    migrate(url, revision=revision)
    now = current_revision(url)
    click.echo(f"key store at revision {now}")
    target = known_revision(revision)  # None for head, or a relative one (+1): Alembic went there
    if target is not None and now != target:
        msg = f"the key store was already past revision {revision}: db upgrade does not downgrade"
        raise click.ClickException(msg)


@db.command(name="current")
@click.pass_context
@_errors
def db_current(ctx: click.Context) -> None:
    """Print the key store's migration revision."""
    click.echo(current_revision(_settings_url(ctx)) or "(no celery-pii tables yet)")


def _settings_url(ctx: click.Context) -> str:
    from ._config import settings_from_conf  # noqa: PLC0415 - only the db commands need it alone

    return settings_from_conf(_app(ctx).conf).key_store_url


# -- keys -------------------------------------------------------------------------------------------

_KEY_COLUMNS = ("key_id", "version", "status", "algorithm", "created_at", "expires_at", "usage_count")


#: A key version as the store holds it (a 32-bit integer): a larger one is a typo, not a lookup.
_VERSION: Final = click.IntRange(1, 2**31 - 1)


@pii.group(name="keys")
def keys() -> None:
    """Data keys: list, generate, rotate, retire, destroy, audit, stats."""


@keys.command(name="list")
@click.argument("key_id", required=False)
@_json_option
@click.pass_context
@_errors
def keys_list(ctx: click.Context, key_id: str | None, as_json: bool) -> None:
    """List key versions (metadata only, never key material); a key id's retention bucket keys too.

    A version past its retention deadline (``expires_at``) that the
    enforce_retention beat task has not destroyed yet opens nowhere any more:
    it is listed as ``expired``.
    """
    now = utcnow()
    rows = [_listed(info, now) for info in _pii(ctx).keys.list_keys(key_id, buckets=True)]
    _emit(rows, _KEY_COLUMNS, as_json=as_json)


def _listed(info: KeyInfo, now: datetime) -> dict[str, Any]:
    row = dataclasses.asdict(info)
    if info.status != DESTROYED and info.expires_at is not None and info.expires_at <= now:
        row["status"] = "expired"
    return row


@keys.command(name="generate")
@click.argument("key_id")
@click.option(
    "--algorithm",
    type=click.Choice(["aes-256-gcm", "chacha20-poly1305"]),
    default=None,
    help="The AEAD of its versions (default: pii_algorithm).",
)
@click.pass_context
@_errors
def keys_generate(ctx: click.Context, key_id: str, algorithm: str | None) -> None:
    """Create a new key id (version 1)."""
    version = _pii(ctx).keys.generate_key(key_id, algorithm)
    click.echo(f"generated {key_id} version {version}")


@keys.command(name="rotate")
@click.argument("key_id")
@_yes_option
@click.pass_context
@_errors
def keys_rotate(ctx: click.Context, key_id: str, yes: bool) -> None:
    """Make a new active version; older ones still decrypt, up to pii_max_key_versions.

    A key id's retention bucket keys (KEY_ID@deadline, what tasks with a
    pii_retention seal under) are rotated too, those still in use.  Versions
    beyond pii_max_key_versions are destroyed, oldest first, as the
    rotate_keys task does (asked first; those retired only minutes ago stay
    until a later rotation).
    """
    manager = _pii(ctx).keys
    buckets = manager.bucket_key_ids(key_id)
    live = {each: _live_versions(manager, each) for each in (key_id, *buckets)}
    limit = manager.max_key_versions
    if any(len(versions) >= limit for versions in live.values()):
        _confirm(
            f"Rotating {key_id} destroys its oldest versions beyond pii_max_key_versions={limit} (those "
            "not retired just now): data sealed under them can never be read again. Continue?",
            yes=yes,
        )
    for each, before in live.items():
        try:
            version = manager.rotate_key(each)
        except KeyNotFound:
            if each != key_id or not buckets:  # a typo must not look like success
                raise
            continue  # only bucket keys: the key id itself has no version
        click.echo(f"rotated {each} to version {version}")
        for gone in sorted(before - _live_versions(manager, each)):
            click.echo(f"destroyed {each} version {gone} (beyond pii_max_key_versions={limit})")


def _live_versions(manager: KeyManager, key_id: str) -> set[int]:
    return {info.version for info in manager.list_keys(key_id) if info.status != "destroyed"}


@keys.command(name="retire")
@click.argument("key_id")
@click.argument("version", type=_VERSION)
@click.pass_context
@_errors
def keys_retire(ctx: click.Context, key_id: str, version: int) -> None:
    """Stop a version from encrypting (it still decrypts)."""
    _pii(ctx).keys.retire_key(key_id, version)
    click.echo(f"retired {key_id} version {version}")


@keys.command(name="destroy")
@click.argument("key_id")
@click.option("--version", type=_VERSION, default=None, help="Only this version (default: all).")
@_yes_option
@click.pass_context
@_errors
def keys_destroy(ctx: click.Context, key_id: str, version: int | None, yes: bool) -> None:
    """Destroy a key's material: everything sealed under it becomes unreadable, for good.

    Without --version, a key id's retention bucket keys (KEY_ID@deadline) go too.
    """
    check_not_reserved(key_id)  # refuse, like a key that is not there, before asking
    manager = _pii(ctx).keys
    known = manager.list_keys(key_id, buckets=version is None)
    if version is not None:
        known = [info for info in known if info.version == version]
    if not known:
        which = f"key {key_id!r}" + (f" version {version}" if version is not None else "")
        msg = f"{which} not found in the key store"
        if version is not None and manager.bucket_key_ids(key_id):
            msg += f"; its retention bucket keys take --version with their whole id (keys list {key_id})"
        raise KeyNotFound(msg)
    key_ids = sorted({info.key_id for info in known})
    if version is not None:
        which = f"version {version} of {key_id}"
    elif key_ids == [key_id]:
        which = f"every version of {key_id}"
    else:
        which = f"every version of {key_id} and of its retention bucket keys ({len(key_ids)} key ids)"
    _confirm(f"Destroy {which}? Data sealed under it can never be read again", yes=yes)
    for each in key_ids:
        click.echo(f"destroyed {manager.destroy_key(each, version)} version(s) of {each}")


class _Moment(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    """A moment in ISO 8601, as ``--json`` prints them (``2026-11-30T10:18:02.060263+00:00``, ``...Z``)."""

    name = "ISO-8601"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            # dateutil's, not fromisoformat: before Python 3.11 that reads only what isoformat() writes
            # (no "Z", "+0000", 1-5 digit fractions or the basic format 20261130T101802Z).
            moment = isoparse(str(value))
            _utc(moment)  # in range once moved to UTC (9999-12-31T23:59-05:00 is not)
        except ValueError:
            self.fail(f"{value!r} is not a date and time in ISO 8601 (e.g. 2026-11-30T10:18:02Z)", param, ctx)
        except OverflowError:
            self.fail(f"{value!r} is out of range in UTC", param, ctx)
        return moment


@keys.command(name="audit")
@click.argument("key_id", required=False)
@click.option(
    "--since", type=_Moment(), default=None, help="Only records at or after (ISO 8601; UTC if no offset)."
)
@click.option(
    "--until", type=_Moment(), default=None, help="Only records at or before (ISO 8601; UTC if no offset)."
)
@_json_option
@click.pass_context
@_errors
def keys_audit(
    ctx: click.Context, key_id: str | None, since: datetime | None, until: datetime | None, as_json: bool
) -> None:
    """The audit trail (generate, rotate, destroy, tamper_detected, ...); a key id's buckets' too."""
    records = _pii(ctx).keys.audit_trail(key_id, _utc(since), _utc(until), buckets=True)
    rows = [dataclasses.asdict(record) for record in records]
    _emit(rows, ("timestamp", "key_id", "version", "operation", "actor", "details"), as_json=as_json)


def _utc(moment: datetime | None) -> datetime | None:
    from datetime import timezone  # noqa: PLC0415

    if moment is None:
        return None
    return moment.astimezone(timezone.utc) if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


@keys.command(name="stats")
@_json_option
@click.pass_context
@_errors
def keys_stats(ctx: click.Context, as_json: bool) -> None:
    """Counts of key versions by status, and rotations performed (key cache counts are per process)."""
    stats = dataclasses.asdict(_pii(ctx).keys.get_stats())
    # This process's own cache, which has served nothing: workers report theirs (get_stats()).
    for per_process in ("cache_hits", "cache_misses"):
        stats.pop(per_process, None)
    if as_json:
        click.echo(json.dumps(stats, indent=2))
    else:
        for name, value in stats.items():
            click.echo(f"{name:<20} {value}")


# -- master key -------------------------------------------------------------------------------------


@pii.group(name="master-key")
def master_key() -> None:
    """The master key that wraps data keys: generate one, move the store to a new one."""


@master_key.command(name="generate")
def master_key_generate() -> None:
    """Print a new random master key (base64), for pii_master_key='env:NAME' or 'file:PATH'."""
    click.echo(generate_master_key())


@master_key.command(name="rewrap")
@click.option("--new-master-key", "source", default=None, help="Source of the new key, e.g. env:NEW_KEY.")
@click.option("--finish", is_flag=True, help="Drop the old wrappings (after every process uses the new key).")
@click.option(
    "--abort",
    is_flag=True,
    help="Abandon an unfinished rotation: drop the new key's wrappings (every process back on the old key).",
)
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=200, show_default=True)
@_yes_option
@click.pass_context
@_errors
def master_key_rewrap(  # noqa: PLR0913, PLR0917 - click passes each option
    ctx: click.Context, source: str | None, finish: bool, abort: bool, batch_size: int, yes: bool
) -> None:
    """Re-wrap every data key under a new master key, in resumable batches (docs/operations.md)."""
    if [source is not None, finish, abort].count(True) != 1:
        msg = "give one of --new-master-key SOURCE, --finish or --abort"
        raise click.UsageError(msg)
    manager = _pii(ctx).keys
    if finish or abort:
        _end_rotation(manager, "finish" if finish else "abort", batch_size=batch_size, yes=yes)
        return
    new = load_master_key(str(source), _pii(ctx).settings, setting="--new-master-key")
    _rewrap.refuse_overwriting_another_rotation(manager, new.ref)  # before asking, not after a yes
    total = _rewrap.pending(manager, new.ref)
    _confirm(f"Re-wrap {total} key version(s) under master key {new.ref}?", yes=yes)
    with click.progressbar(length=total, label="re-wrapping", file=sys.stderr) as bar:
        report = _rewrap.rewrap(manager, new, batch_size=batch_size, progress=bar.update)
    click.echo(f"re-wrapped {report.done} key version(s) under {new.ref}")
    if report.unreadable:
        msg = f"{report.unreadable} key version(s) are wrapped by a master key this process does not hold"
        raise click.ClickException(msg)
    if not report.complete:
        msg = (
            f"{report.skipped} key version(s) still have no wrapping under {new.ref} "
            "(busy in another transaction, or created during the run); run rewrap again"
        )
        raise click.ClickException(msg)


def _end_rotation(manager: KeyManager, ending: str, *, batch_size: int, yes: bool) -> None:
    """``rewrap --finish`` (keep the new master key's wrappings) or ``--abort`` (keep the old one's)."""
    if ending == "finish":
        _confirm("Drop the old master key's wrappings? Processes still on it will stop working", yes=yes)
        report = _rewrap.finish(manager, batch_size=batch_size)
        outcome = "finished"
    else:
        _confirm("Drop the new master key's wrappings? Processes on it will stop working", yes=yes)
        report = _rewrap.abort(manager, batch_size=batch_size)
        outcome = "abandoned"
    click.echo(f"{outcome} {report.done} key version(s); {report.skipped} not {outcome}")
    if not report.complete:
        msg = (
            f"some key versions are not {outcome}: not wrapped under this process's master key "
            f"(run rewrap), or busy in another transaction; then run --{ending} again"
        )
        raise click.ClickException(msg)


# -- scan, erasure ------------------------------------------------------------------------------------


@pii.command(name="scan")
@click.argument("document", type=click.File("r"))
@_json_option
def scan(document: Any, as_json: bool) -> None:
    """Detect PII in a JSON document (FILE or - for standard input): paths and categories only."""
    try:
        value = json.load(document)
        # Paths as printed for people: a dict key that looks like PII is not shown.
        findings = [
            {"path": shown_path(parts), "category": category}
            for parts, category in locate_with_status(value)[0]
        ]
    except ValueError:
        msg = "not a JSON document"
        raise click.ClickException(msg) from None
    except RecursionError:
        msg = "the JSON document is nested too deeply to scan"
        raise click.ClickException(msg) from None
    _emit(findings, ("path", "category"), as_json=as_json)


@pii.command(name="forget-subject")
@click.argument("subject_id")
@_yes_option
@click.pass_context
@_errors
def forget_subject(ctx: click.Context, subject_id: str, yes: bool) -> None:
    """Erasure: destroy a data subject's keys; all their sealed data becomes unreadable."""
    _confirm("Destroy this data subject's keys? Their sealed data can never be read again", yes=yes)
    destroyed = _pii(ctx).forget_subject(subject_id)
    click.echo(f"destroyed {destroyed} key version(s) of the subject")
    if not destroyed:  # not an error: a request may name someone never processed (exit 0)
        click.echo(
            "no live key of this subject: nothing was sealed for this id as written (case and spaces "
            "count), or it was forgotten before"
        )


# -- quarantine ---------------------------------------------------------------------------------------


@pii.group(name="quarantine")
def quarantine() -> None:
    """Parked messages: failed authentication, undecodable, of a refused content type or an unknown task."""


@quarantine.command(name="list")
@_json_option
@click.pass_context
@_errors
def quarantine_list(ctx: click.Context, as_json: bool) -> None:
    """List parked messages (ids, task, reason — never bodies); they stay parked."""
    pii_object = _pii(ctx)
    rows = _quarantine.list_parked(pii_object.app, pii_object.settings.quarantine_queue)
    _emit(rows, ("id", "task", "reason", "parked_at", "bytes"), as_json=as_json)


@quarantine.command(name="replay")
@click.option("--id", "ids", multiple=True, help="Only this task id (repeatable; default: all).")
@_yes_option
@click.pass_context
@_errors
def quarantine_replay(ctx: click.Context, ids: tuple[str, ...], yes: bool) -> None:
    """Re-publish parked messages where they came from (after the cause is fixed)."""
    pii_object = _pii(ctx)
    _confirm(f"Re-publish {'the given' if ids else 'all'} parked message(s)?", yes=yes)
    queue = pii_object.settings.quarantine_queue
    report = _quarantine.replay(pii_object.app, queue, set(ids) if ids else None)
    click.echo(f"replayed {len(report.replayed)} message(s)")
    problems = [f"left parked: {task_id}: {why}" for task_id, why in report.left_parked]
    if report.interrupted is not None:
        problems.append(f"stopped: {report.interrupted}; the rest stays parked: run replay again")
    missing = sorted(set(ids) - set(report.replayed) - {task_id for task_id, _ in report.left_parked})
    if missing and report.interrupted is None:  # an interrupted run did not look at every message
        problems.append(f"not parked: {', '.join(missing)}")
    if problems:
        raise click.ClickException("\n".join(problems))


@quarantine.command(name="purge")
@click.option("--id", "ids", multiple=True, help="Only this task id (repeatable; default: all).")
@_yes_option
@click.pass_context
@_errors
def quarantine_purge(ctx: click.Context, ids: tuple[str, ...], yes: bool) -> None:
    """Delete parked messages (all, or those given by --id)."""
    pii_object = _pii(ctx)
    queue = pii_object.settings.quarantine_queue
    if not ids:
        _confirm("Delete every parked message?", yes=yes)
        click.echo(f"purged {_quarantine.purge(pii_object.app, queue)} message(s)")
        return
    _confirm("Delete the given parked message(s)?", yes=yes)
    deleted = _quarantine.purge_ids(pii_object.app, queue, set(ids))
    click.echo(f"purged {len(deleted)} message(s)")
    missing = sorted(set(ids) - set(deleted))
    if missing:
        msg = f"not parked: {', '.join(missing)}"
        raise click.ClickException(msg)
