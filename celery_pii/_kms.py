"""The ``aws-kms://KEY-ID`` master-key source (the ``aws`` extra: boto3, imported on use).

AWS KMS ``Encrypt`` wraps data-key material and ``Decrypt`` unwraps it; the
master key never leaves KMS.  The row's context (key id, version, algorithm)
is the KMS *encryption context*, so a wrapped key moved to another row fails.
An outage (network, throttling, 5xx, credentials) raises KeyStoreUnavailable,
a wrapped key KMS finds damaged or bound to another context DecryptionFailed,
and any other refusal (a missing, disabled or other KMS key, a permission
missing) ConfigurationError, naming what to fix.  There is never a fallback key.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

from ._sources import MasterKey, register_master_key_source
from .exceptions import ConfigurationError, DecryptionFailed, KeyStoreUnavailable

if TYPE_CHECKING:
    from ._config import Settings

__all__ = ["KmsMasterKey", "register"]

logger = logging.getLogger("celery_pii.kms")

_SETTING: Final = "pii_master_key"
_SCHEME: Final = "aws-kms"
_CONTEXT_KEY: Final = "celery-pii"
# KMS answers in milliseconds; a caller must not hang on it.
_READ_TIMEOUT: Final = 5.0
_TOTAL_ATTEMPTS: Final = 3
_UNAVAILABLE: Final = frozenset({
    "DependencyTimeoutException", "KMSInternalException", "KeyUnavailableException", "Throttling",
    "ThrottlingException", "LimitExceededException", "RequestLimitExceeded", "ServiceUnavailable",
    "ServiceUnavailableException", "InternalFailure", "RequestTimeout", "RequestTimeoutException",
    # credentials refused: they may be rotated or refreshed while we retry
    "UnrecognizedClientException", "InvalidSignatureException", "ExpiredToken", "ExpiredTokenException",
    "InvalidClientTokenId", "IncompleteSignature", "MissingAuthenticationToken", "RequestExpired",
})  # fmt: skip
_UNUSABLE_KEY: Final = frozenset({
    "NotFoundException", "DisabledException", "KMSInvalidStateException", "InvalidArnException",
})  # fmt: skip
# A wrapped key KMS will not open as given: damaged, or made under another context (moved to
# another row): DecryptionFailed.  Any other refusal (AccessDenied, IncorrectKey: the alias now
# names another key) is a deployment error, ConfigurationError: a message whose key it concerns
# is retried, not parked as tampered, and the error says what to fix.
_NOT_OURS: Final = frozenset({"InvalidCiphertextException"})


class KmsMasterKey:
    """A master key held by AWS KMS; wraps and unwraps data keys through its API.

    Arguments:
        key_id: a KMS key id, key ARN, alias ARN or ``alias/NAME``.
        endpoint_url: the KMS endpoint (``pii_kms_endpoint_url``); default AWS's.
        region: the AWS region (``pii_kms_region``); default the key ARN's
            region, then the standard AWS configuration.
        connect_timeout: seconds to wait for a connection (``pii_key_store_connect_timeout``).

    Raises:
        ConfigurationError: boto3 is missing, or no AWS region is configured.
    """

    __slots__ = ("_client", "_endpoint_url", "_key_id", "_pid", "_region", "_timeout", "ref", "setting")

    def __init__(
        self,
        key_id: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self._key_id = key_id
        self._endpoint_url = endpoint_url
        in_arn = _arn_region(key_id)
        if region and in_arn and region != in_arn:
            # A KMS key exists in its own region only: requests elsewhere could never find it.
            msg = (
                f"setting pii_kms_region: {region!r} is not the region of the KMS key ARN in {_SETTING} "
                f"({in_arn!r}); remove pii_kms_region or make them agree"
            )
            raise ConfigurationError(msg)
        self._region = region or in_arn
        self._timeout = connect_timeout
        self.ref = f"{_SCHEME}:{key_id}"
        #: The setting (or option) that named this key, for errors: KMS answers long after loading.
        self.setting = _SETTING
        self._pid = os.getpid()
        self._client = self._new_client()  # fails now, at start-up, without a region

    def __repr__(self) -> str:
        return f"<KmsMasterKey {self.ref}>"

    def wrap(self, material: bytes, *, context: bytes) -> bytes:
        """Wrap data-key material with KMS ``Encrypt``, binding ``context``.

        Raises:
            KeyStoreUnavailable: KMS cannot be reached or refuses the credentials.
            ConfigurationError: the KMS key does not exist, is disabled or may not encrypt.
        """
        with self._translated("Encrypt"):
            response = self._kms().encrypt(
                KeyId=self._key_id, Plaintext=material, EncryptionContext=_encryption_context(context)
            )
        return bytes(response["CiphertextBlob"])

    def unwrap(self, wrapped: bytes, *, context: bytes) -> bytes:
        """Unwrap what :meth:`wrap` made, with KMS ``Decrypt``.

        Raises:
            DecryptionFailed: another KMS key or another context wrapped it, or it is damaged.
            KeyStoreUnavailable: KMS cannot be reached or refuses the credentials.
            ConfigurationError: the KMS key does not exist or is disabled.
        """
        with self._translated("Decrypt"):
            response = self._kms().decrypt(
                CiphertextBlob=wrapped, KeyId=self._key_id, EncryptionContext=_encryption_context(context)
            )
        return bytes(response["Plaintext"])

    def _kms(self) -> Any:
        # A client's connection pool must not be shared with a forked child.
        if self._pid != os.getpid():
            self._client, self._pid = self._new_client(), os.getpid()
        return self._client

    def _new_client(self) -> Any:
        boto3 = _import_boto3()
        _keep_bodies_out_of_logs()
        from botocore.config import Config  # noqa: PLC0415 - the optional aws extra
        from botocore.exceptions import InvalidRegionError, NoRegionError  # noqa: PLC0415

        config = Config(
            connect_timeout=self._timeout,
            read_timeout=_READ_TIMEOUT,
            retries={"mode": "standard", "total_max_attempts": _TOTAL_ATTEMPTS},
        )
        try:
            return boto3.session.Session().client(
                "kms", region_name=self._region, endpoint_url=self._endpoint_url, config=config
            )
        except NoRegionError:
            msg = (
                f"setting pii_kms_region: no AWS region for KMS key {self._key_id!r}; "
                "set pii_kms_region or AWS_DEFAULT_REGION"
            )
            raise ConfigurationError(msg) from None
        except InvalidRegionError:
            if self._region is None:
                named_by = "the AWS configuration (AWS_DEFAULT_REGION)"
            elif self._region == _arn_region(self._key_id):
                named_by = f"setting {_SETTING} (its key ARN's region)"
            else:
                named_by = "setting pii_kms_region"
            msg = f"{named_by}: not a valid AWS region name, for KMS key {self._key_id!r}"
            raise ConfigurationError(msg) from None

    @contextmanager
    def _translated(self, operation: str) -> Iterator[None]:
        # ``from None`` throughout: botocore messages can echo request parameters.
        from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError  # noqa: PLC0415

        where = f"AWS KMS key {self._key_id!r}"
        try:
            yield
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", "Unknown"))
            status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in _UNAVAILABLE or status >= 500 or status == 429:
                msg = f"{where} is unavailable: {operation} failed ({code}); retry later"
                raise KeyStoreUnavailable(msg) from None
            if code in _UNUSABLE_KEY:
                msg = f"setting {self.setting}: {where} is missing, disabled or pending deletion ({code})"
                raise ConfigurationError(msg) from None
            if operation == "Decrypt" and code in _NOT_OURS:
                logger.debug("celery-pii: %s refused %s (%s)", where, operation, code)
                raise DecryptionFailed from None
            if operation == "Decrypt" and code == "IncorrectKeyException":
                # The row names this key (its reference matches) and another KMS key wrapped it.
                msg = (
                    f"setting {self.setting}: {where} is not the KMS key that wrapped this data key "
                    f"({code}); was the alias pointed at another key? Point it back (and move keys to a "
                    "new KMS key with `pii master-key rewrap`, docs/operations.md)"
                )
                raise ConfigurationError(msg) from None
            if code == "InvalidKeyUsageException":  # a signing, HMAC or asymmetric key: no IAM change helps
                msg = (
                    f"setting {self.setting}: {where} is not a symmetric encryption key ({code}); use a KMS "
                    "key with KeySpec SYMMETRIC_DEFAULT and KeyUsage ENCRYPT_DECRYPT"
                )
                raise ConfigurationError(msg) from None
            permission = "kms:Decrypt" if operation == "Decrypt" else "kms:Encrypt"
            msg = (
                f"setting {self.setting}: {where} cannot be used for {operation} ({code}); "
                f"the key policy or IAM role must allow {permission}"
            )
            raise ConfigurationError(msg) from None
        except ParamValidationError:
            msg = f"setting {self.setting}: {where} is not a valid KMS key id, ARN or alias"
            raise ConfigurationError(msg) from None
        except BotoCoreError as error:  # connection, timeout, credentials
            kind = type(error).__name__
            if kind == "NoCredentialsError":  # none configured, or the instance role's service did not answer
                msg = (
                    f"{where} cannot be used: {operation} found no AWS credentials ({kind}); configure them "
                    "(environment, profile or instance role); retried meanwhile"
                )
            else:
                msg = f"{where} cannot be reached: {operation} failed ({kind}); retry later"
            raise KeyStoreUnavailable(msg) from None


class _NoBodies(logging.Filter):
    """Drops botocore's DEBUG records, which quote requests and responses whole."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


# At DEBUG (``celery worker -l DEBUG`` sets the root logger so) botocore logs every
# request's parameters and every response's body: Encrypt's and Decrypt's carry
# data-key material in plaintext ("Plaintext": ...).  A filter on the loggers
# themselves holds whatever level or handlers the application configures.
_BODY_LOGGERS: Final = ("botocore.endpoint", "botocore.parsers")
_NO_BODIES: Final = _NoBodies()


def _keep_bodies_out_of_logs() -> None:
    for name in _BODY_LOGGERS:
        body_logger = logging.getLogger(name)
        if _NO_BODIES not in body_logger.filters:
            body_logger.addFilter(_NO_BODIES)


def _encryption_context(context: bytes) -> dict[str, str]:
    # KMS wants a str -> str map; it authenticates the map with the ciphertext.
    return {_CONTEXT_KEY: base64.b64encode(context).decode("ascii")}


def _arn_region(key_id: str) -> str | None:
    # arn:aws:kms:REGION:ACCOUNT:key/ID names its region; a bare id or alias does not.
    parts = key_id.split(":")
    if key_id.startswith("arn:") and len(parts) >= 6 and parts[3]:
        return parts[3]
    return None


def _import_boto3() -> Any:
    try:
        import boto3  # noqa: PLC0415 - the optional aws extra, imported on use
    except ImportError:
        msg = f"setting {_SETTING}: aws-kms:// needs the extra: pip install 'celery-pii[aws]'"
        raise ConfigurationError(msg) from None
    return boto3


def _from_kms(rest: str, settings: Settings | None) -> MasterKey:
    """Load ``aws-kms://KEY-ID``; ``rest`` is ``//KEY-ID``.

    Arguments:
        rest: what follows ``aws-kms:`` in ``pii_master_key``.
        settings: supplies ``pii_kms_endpoint_url``, ``pii_kms_region`` and
            ``pii_key_store_connect_timeout`` (defaults when ``None``).

    Raises:
        ConfigurationError: no key id, boto3 missing or no AWS region.
    """
    key_id = rest.removeprefix("//").strip()
    if not rest.startswith("//") or not key_id or any(c.isspace() for c in key_id):
        msg = f"setting {_SETTING}: use aws-kms://KEY-ID (a key id, key ARN or alias/NAME)"
        raise ConfigurationError(msg)
    if settings is None:
        return KmsMasterKey(key_id)
    return KmsMasterKey(
        key_id,
        endpoint_url=settings.kms_endpoint_url,
        region=settings.kms_region,
        connect_timeout=settings.key_store_connect_timeout,
    )


def register() -> None:
    """Make ``pii_master_key = "aws-kms://KEY-ID"`` load a :class:`KmsMasterKey`."""
    register_master_key_source(_SCHEME, _from_kms)
