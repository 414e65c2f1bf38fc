"""aws-kms:// master keys against a real HTTP KMS endpoint (moto's server mode in a subprocess).

Unknown or disabled KMS keys raise ConfigurationError naming pii_master_key, for wrap and
unwrap alike: the setting is wrong, not the data.  Only a wrapped key that the configured
KMS key will not open (another key, another context, damaged) raises DecryptionFailed.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import boto3
import pytest
from botocore.stub import Stubber

import celery_pii
import celery_pii._kms
from celery_pii._config import settings_from_conf
from celery_pii._keys import KeyManager, KeySpec
from celery_pii._kms import KmsMasterKey
from celery_pii._sources import load_master_key
from celery_pii._store import KeyStore
from celery_pii.exceptions import ConfigurationError, DecryptionFailed, KeyStoreUnavailable

pytestmark = pytest.mark.integration

REGION = "us-east-1"
MATERIAL = bytes(range(100, 132))
CONTEXT = b"celery-pii key\x00orders\x001\x00aes-256-gcm"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def kms_endpoint(tmp_path_factory):
    """URL of a moto server (real HTTP on 127.0.0.1), stopped by pid at the end."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"moto server exited: {log.read_text()}")
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            try:
                connection.request("GET", "/moto-api/")
                connection.getresponse().read()
                break
            except (OSError, http.client.HTTPException):
                if time.monotonic() > deadline:
                    pytest.fail("moto server did not answer within 30 s")
                time.sleep(0.1)
            finally:
                connection.close()
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    """Fake credentials, and nothing from this machine's own AWS configuration."""
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_KMS",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    celery_pii._kms.register()


@pytest.fixture(scope="module")
def kms_admin(kms_endpoint):
    """A plain boto3 KMS client on the moto server, for setting up keys."""
    return boto3.session.Session().client(
        "kms",
        endpoint_url=kms_endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def make_kms_key(kms_admin):
    """Create a new symmetric KMS key; returns its key id."""

    def make() -> str:
        return str(kms_admin.create_key(Description="celery-pii test")["KeyMetadata"]["KeyId"])

    return make


@pytest.fixture
def key_id(make_kms_key):
    return make_kms_key()


@pytest.fixture
def master(kms_endpoint, key_id):
    return KmsMasterKey(key_id, endpoint_url=kms_endpoint, region=REGION)


def _settings(**conf):
    return settings_from_conf(conf)


class TestWrapping:
    def test_round_trip(self, master):
        wrapped = master.wrap(MATERIAL, context=CONTEXT)
        assert MATERIAL not in wrapped
        assert master.unwrap(wrapped, context=CONTEXT) == MATERIAL

    def test_context_is_bound(self, master):
        wrapped = master.wrap(MATERIAL, context=CONTEXT)
        with pytest.raises(DecryptionFailed) as caught:
            master.unwrap(wrapped, context=CONTEXT.replace(b"\x001\x00", b"\x002\x00"))
        assert str(caught.value) == DecryptionFailed.MESSAGE

    def test_damaged_blob(self, master):
        wrapped = bytearray(master.wrap(MATERIAL, context=CONTEXT))
        wrapped[-1] ^= 1
        with pytest.raises(DecryptionFailed):
            master.unwrap(bytes(wrapped), context=CONTEXT)

    def test_other_kms_key_cannot_unwrap(self, master, make_kms_key, kms_endpoint):
        """Refused, and said to be a deployment error (an alias pointed at another key), not tampering.

        AWS answers IncorrectKeyException; moto answers AccessDeniedException.
        """
        other = KmsMasterKey(make_kms_key(), endpoint_url=kms_endpoint, region=REGION)
        with pytest.raises(
            ConfigurationError, match=r"not the KMS key that wrapped|cannot be used for Decrypt"
        ):
            other.unwrap(master.wrap(MATERIAL, context=CONTEXT), context=CONTEXT)

    def test_ref_is_stable_and_not_secret(self, master, key_id, kms_endpoint):
        wrapped = master.wrap(MATERIAL, context=CONTEXT)
        again = KmsMasterKey(key_id, endpoint_url=kms_endpoint, region=REGION)
        assert master.ref == again.ref == f"aws-kms:{key_id}"
        assert repr(master) == f"<KmsMasterKey aws-kms:{key_id}>"
        for secret in (MATERIAL.hex(), wrapped.hex(), "testing"):
            assert secret not in master.ref

    def test_alias_and_arn(self, kms_admin, kms_endpoint, key_id):
        alias = f"alias/celery-pii-{uuid.uuid4().hex[:8]}"
        kms_admin.create_alias(AliasName=alias, TargetKeyId=key_id)
        arn = kms_admin.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"]
        by_alias = KmsMasterKey(alias, endpoint_url=kms_endpoint)
        by_arn = KmsMasterKey(arn, endpoint_url=kms_endpoint, region=None)
        assert by_arn.unwrap(by_alias.wrap(MATERIAL, context=CONTEXT), context=CONTEXT) == MATERIAL


class TestFailures:
    def test_unreachable_endpoint_fails_fast(self, key_id):
        master = KmsMasterKey(key_id, endpoint_url=f"http://127.0.0.1:{_free_port()}", connect_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(KeyStoreUnavailable) as caught:
            master.wrap(MATERIAL, context=CONTEXT)
        with pytest.raises(KeyStoreUnavailable):
            master.unwrap(b"x" * 64, context=CONTEXT)
        assert time.monotonic() - started < 15
        assert key_id in str(caught.value)
        assert "EndpointConnectionError" in str(caught.value)
        assert caught.value.__cause__ is None and caught.value.__suppress_context__

    def test_missing_credentials(self, master, monkeypatch):
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        fresh = KmsMasterKey(master._key_id, endpoint_url=master._endpoint_url)
        # Kept retryable (an instance role's credential service may not answer for a while), but
        # said as it is: it was "cannot be reached ... retry later", like a network outage.
        with pytest.raises(
            KeyStoreUnavailable, match=r"found no AWS credentials \(NoCredentialsError\); configure"
        ):
            fresh.wrap(MATERIAL, context=CONTEXT)

    @pytest.mark.parametrize(
        "unknown", ["0b9d3f51-6c2e-4a8e-9a51-2f3c8e6d1a77", "alias/celery-pii-no-such-alias"]
    )
    def test_unknown_key_is_a_configuration_error(self, kms_endpoint, master, unknown):
        missing = KmsMasterKey(unknown, endpoint_url=kms_endpoint)
        with pytest.raises(ConfigurationError, match="pii_master_key") as caught:
            missing.wrap(MATERIAL, context=CONTEXT)
        assert unknown in str(caught.value)
        with pytest.raises(ConfigurationError, match="pii_master_key"):
            missing.unwrap(master.wrap(MATERIAL, context=CONTEXT), context=CONTEXT)

    def test_malformed_key_id(self, kms_endpoint):
        empty = KmsMasterKey("", endpoint_url=kms_endpoint)
        with pytest.raises(ConfigurationError, match="not a valid KMS key id"):
            empty.wrap(MATERIAL, context=CONTEXT)

    @pytest.mark.parametrize(
        ("method", "code", "status", "expected"),
        [
            ("encrypt", "ThrottlingException", 400, KeyStoreUnavailable),
            ("decrypt", "KMSInternalException", 500, KeyStoreUnavailable),
            ("encrypt", "SomethingNew", 503, KeyStoreUnavailable),
            ("decrypt", "UnrecognizedClientException", 400, KeyStoreUnavailable),
            ("encrypt", "ExpiredTokenException", 400, KeyStoreUnavailable),
            ("encrypt", "DisabledException", 400, ConfigurationError),
            ("decrypt", "KMSInvalidStateException", 400, ConfigurationError),
            ("encrypt", "AccessDeniedException", 400, ConfigurationError),
            ("decrypt", "DisabledException", 400, ConfigurationError),
            ("encrypt", "InvalidKeyUsageException", 400, ConfigurationError),
            # A refusal that is no damaged or moved blob is a deployment error (retried, not parked
            # as tampered): a missing permission, an alias pointed at another key.
            ("decrypt", "AccessDeniedException", 400, ConfigurationError),
            ("decrypt", "IncorrectKeyException", 400, ConfigurationError),
            ("decrypt", "InvalidKeyUsageException", 400, ConfigurationError),
            ("decrypt", "InvalidCiphertextException", 400, DecryptionFailed),
            ("decrypt", "SomethingNew", 400, ConfigurationError),
            ("encrypt", "ValidationException", 400, ConfigurationError),
        ],
    )
    def test_error_mapping(self, master, method, code, status, expected):
        with Stubber(master._client) as stub:
            stub.add_client_error(method, service_error_code=code, http_status_code=status)
            call = master.wrap if method == "encrypt" else master.unwrap
            with pytest.raises(expected) as caught:
                call(MATERIAL, context=CONTEXT)
        assert MATERIAL.hex() not in str(caught.value)
        if expected is not DecryptionFailed:
            assert master._key_id in str(caught.value) and code in str(caught.value)
        if code == "InvalidKeyUsageException":  # a signing or HMAC key: no IAM change helps
            assert "not a symmetric encryption key" in str(caught.value)
            assert "IAM" not in str(caught.value)


class TestLoading:
    @pytest.mark.parametrize("setting", ["--new-master-key", "pii_previous_master_key"])
    def test_errors_name_the_setting_that_named_the_key(self, kms_endpoint, setting):
        """KMS answers long after loading: a typo in rewrap's new key blamed pii_master_key (which was fine)."""
        settings = _settings(pii_kms_endpoint_url=kms_endpoint, pii_kms_region=REGION)
        typo = load_master_key("aws-kms://alias/no-such-alias", settings, setting=setting)
        with pytest.raises(
            ConfigurationError, match=rf"^setting {setting}: AWS KMS key 'alias/no-such-alias'"
        ):
            typo.wrap(MATERIAL, context=CONTEXT)

    def test_loader_uses_settings(self, kms_endpoint, key_id):
        settings = _settings(pii_kms_endpoint_url=kms_endpoint, pii_kms_region=REGION)
        master = load_master_key(f"aws-kms://{key_id}", settings)
        assert isinstance(master, KmsMasterKey)
        assert master.ref == f"aws-kms:{key_id}"
        assert master.unwrap(master.wrap(MATERIAL, context=CONTEXT), context=CONTEXT) == MATERIAL

    @pytest.mark.parametrize("spec", ["aws-kms:", "aws-kms://", "aws-kms:abc", "aws-kms://a b"])
    def test_malformed_spec(self, spec):
        with pytest.raises(ConfigurationError, match="pii_master_key: use aws-kms://KEY-ID"):
            load_master_key(spec)

    def test_without_boto3(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "boto3", None)
        with pytest.raises(ConfigurationError) as caught:
            load_master_key("aws-kms://alias/x")
        assert str(caught.value) == (
            "setting pii_master_key: aws-kms:// needs the extra: pip install 'celery-pii[aws]'"
        )

    @pytest.mark.parametrize(
        ("spec", "region", "named"),
        [
            ("aws-kms://alias/x", "eu west 1", "setting pii_kms_region"),
            (
                "aws-kms://arn:aws:kms:eu_west_1:111122223333:key/1234abcd",
                None,
                r"pii_master_key \(its key ARN",
            ),
        ],
    )
    def test_a_malformed_region_names_where_it_came_from(self, spec, region, named):
        """botocore's ``InvalidRegionError`` named no setting (and broke ``pii db upgrade``'s import)."""
        with pytest.raises(ConfigurationError, match=rf"{named}.*not a valid AWS region name"):
            load_master_key(spec, _settings(pii_kms_region=region))

    def test_a_region_other_than_the_key_arns_is_refused(self):
        """Requests went to that region, where the key does not exist, without a word."""
        arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        with pytest.raises(
            ConfigurationError, match=r"pii_kms_region: 'us-east-1' is not the region of the KMS"
        ):
            load_master_key(f"aws-kms://{arn}", _settings(pii_kms_region="us-east-1"))
        agreeing = load_master_key(f"aws-kms://{arn}", _settings(pii_kms_region="eu-west-1"))
        assert agreeing._client.meta.region_name == "eu-west-1"

    def test_no_region(self, monkeypatch):
        monkeypatch.delenv("AWS_DEFAULT_REGION")
        with pytest.raises(ConfigurationError, match="pii_kms_region"):
            load_master_key("aws-kms://alias/x")
        arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        assert load_master_key(f"aws-kms://{arn}")._client.meta.region_name == "eu-west-1"


class TestKeyManager:
    @pytest.fixture
    def store_url(self, tmp_path):
        url = f"sqlite:///{tmp_path}/k.db"
        celery_pii.migrate(url)
        return url

    @pytest.fixture
    def make_manager(self, store_url):
        managers = []

        def make(master):
            manager = KeyManager(KeyStore(store_url), master)
            managers.append(manager)
            return manager

        yield make
        for manager in managers:
            manager.store.dispose()

    def test_round_trip_through_the_key_store(self, make_manager, master, key_id, kms_endpoint):
        sealing = make_manager(master).encryption_key(KeySpec("orders"))
        fresh = make_manager(KmsMasterKey(key_id, endpoint_url=kms_endpoint))
        opening = fresh.decryption_key("orders", 1)
        assert (opening.key_id, opening.version) == ("orders", sealing.version) == ("orders", 1)
        nonce_and_ciphertext = sealing.seal(b"4111 1111 1111 1111", b"aad")
        assert opening.open(nonce_and_ciphertext, b"aad") == b"4111 1111 1111 1111"
        fresh.check_master_key()

    def test_a_new_key_costs_one_encrypt_and_no_decrypt(self, make_manager, master):
        """Its material is at hand: the row just written was unwrapped again (a Decrypt per new subject)."""
        calls = []
        master._kms().meta.events.register("before-call.kms.*", lambda model, **_: calls.append(model.name))
        manager = make_manager(master)
        key = manager.encryption_key(KeySpec("orders-calls"))
        assert calls == ["Encrypt"]
        sealed = key.seal(b"4111 1111 1111 1111", b"aad")
        assert manager.decryption_key("orders-calls", 1).open(sealed, b"aad") == b"4111 1111 1111 1111"

    def test_debug_logging_shows_no_key_material(self, make_manager, master, caplog):
        """With the root logger at DEBUG (a worker's -l DEBUG), botocore logged KMS bodies whole.

        Decrypt's response and Encrypt's request carry the data key's material.
        """
        import logging

        with caplog.at_level(logging.DEBUG):
            make_manager(master).encryption_key(KeySpec("orders-logged"))
            make_manager(master).decryption_key("orders-logged", 1)
        logged = "\n".join(record.getMessage() for record in caplog.records)
        assert "Plaintext" not in logged
        assert any(record.name.startswith("botocore") for record in caplog.records)  # it did log

    def test_an_unusable_kms_key_fails_the_start_up_check_on_a_new_store(self, make_manager, kms_endpoint):
        """With no keys to unwrap yet, a misspelt key id passed start-up and failed at the first publish."""
        typo = make_manager(KmsMasterKey("alias/no-such-alias", endpoint_url=kms_endpoint, region=REGION))
        with pytest.raises(ConfigurationError, match=r"alias/no-such-alias' is missing"):
            typo.check_master_key()

    def test_a_kms_that_does_not_answer_is_named_with_the_store(self, make_manager, master, monkeypatch):
        """A key load waits for KMS too: the error blamed the key store alone (pii_key_store_url)."""
        import threading

        from celery_pii import KeyStoreUnavailable, _keys

        monkeypatch.setattr(_keys, "STORE_ANSWER_TIMEOUT", 0.5)
        released = threading.Event()
        monkeypatch.setattr(KmsMasterKey, "wrap", lambda *_args, **_kwargs: released.wait(5) and b"")
        try:
            with pytest.raises(KeyStoreUnavailable, match=r"the key store \(pii_key_store_url\) or AWS KMS"):
                make_manager(master).encryption_key(KeySpec("orders-hung"))
        finally:
            released.set()

    def test_other_kms_key_fails_the_start_up_check(self, make_manager, master, make_kms_key, kms_endpoint):
        make_manager(master).encryption_key(KeySpec("orders"))
        other = make_manager(KmsMasterKey(make_kms_key(), endpoint_url=kms_endpoint))
        with pytest.raises(ConfigurationError, match="pii_master_key"):
            other.check_master_key()
