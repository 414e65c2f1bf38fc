"""Encode + decode cost per message: celery-pii against what users would use instead.

    python -m benchmarks.codec [--json OUT]

A 1 KB task body with 2 PII fields (a card number and an email), encoded and
decoded once, as a publisher and a worker would:

* ``json``                kombu's json dumps + loads (the baseline)
* ``pii aes-256-gcm``     seal (in as_task_v2) + pii dumps + loads + open (before_start)
* ``pii chacha20``        the same with ChaCha20-Poly1305 data keys
* ``seal+open only``      just the sealing and opening work, no body encoding
* ``seal+open floor``     the same steps written out by hand for this one task
                          (what issue 2's 0.25x target leaves room for)
* ``fernet whole body``   the hand-rolled serializer most teams write: json + Fernet
* ``aes-gcm whole body``  json + one AES-GCM over the body
* ``auth rsa-2048``       Celery's own ``auth`` serializer (signing, not encrypting)

and the whole publish + consume path of Celery (``create_task_message`` with
its argsrepr/kwargsrepr, dumps, loads, open) for ``json`` and ``pii``, and a
worker's share of it (decode, then Celery's tracer with the opening step).
"""

from __future__ import annotations

import argparse
import base64
import os
import tempfile
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import serialization

from benchmarks import _harness
from celery_pii._sealer import EMBED_KEY

TASK_ID = "0c1d2e3f-0000-4000-8000-000000000000"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
CARD = "4111 1111 1111 1111"
EMAIL = "ann@example.com"


def body_of_size(size: int, *, pii_fields: int = 2) -> tuple[list[Any], dict[str, Any]]:
    """Arguments whose JSON body is about ``size`` bytes, with ``pii_fields`` PII values."""
    items: list[dict[str, Any]] = []
    args: list[Any] = [CARD, 99.5, {"email": EMAIL, "tier": "gold", "name": "Ann Example"}, items]
    extra = {f"note{i}": f"customer-{i}@example.com" for i in range(max(0, pii_fields - 2))}
    args[2].update(extra)
    while len(serialization.dumps((args, {}, EMBED), "json")[2]) < size:
        i = len(items)
        items.append(
            {"sku": f"SKU-{i:05d}", "qty": i % 7, "price": round(9.99 + i, 2), "desc": "widget blue"}
        )
    return args, {}


def make_pii_app(
    folder: Path,
    *,
    algorithm: str = "aes-256-gcm",
    fields: list[str] | None = None,
    detect: str = "off",
    **conf: Any,
) -> Celery:
    """A pii app on the in-memory broker with a SQLite key store in ``folder``."""
    from celery_pii import migrate, setup_pii

    os.environ.setdefault("CELERY_PII_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    url = f"sqlite:///{folder / f'keys-{algorithm}-{detect}.db'}"
    migrate(url)
    app = Celery(f"bench-{algorithm}-{detect}", broker="memory://", set_as_current=False)
    app.conf.update(
        task_serializer="pii",
        result_serializer="pii",
        accept_content=["pii"],
        pii_key_store_url=url,
        pii_algorithm=algorithm,
        pii_default_key=f"bench-{algorithm.split('-', maxsplit=1)[0]}",
        pii_detect=detect,
    )
    app.conf.update(conf)
    setup_pii(app)

    @app.task(name="bench.charge", shared=False, pii_fields=fields or ["card_number", "customer.email"])
    def charge(card_number: str, amount: float, customer: dict[str, str], items: object = ()) -> None:
        return None

    app.finalize()
    return app


def make_json_app() -> Celery:
    """The same task on a plain json app."""
    app = Celery("bench-json", broker="memory://", set_as_current=False)

    @app.task(name="bench.charge", shared=False)
    def charge(card_number: str, amount: float, customer: dict[str, str], items: object = ()) -> None:
        return None

    app.finalize()
    return app


def pii_codec(app: Celery, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Seal, encode, decode and open one message, as the real paths do."""
    from celery_pii import get_pii
    from celery_pii._serializer import PublishTicket, publish_ticket

    sealer = get_pii(app).sealer

    def run() -> None:
        sealed = sealer.seal_message("bench.charge", TASK_ID, {"args": args, "kwargs": kwargs, **EMBED})
        root = sealed.root
        body = (root["args"], root["kwargs"], {**EMBED, EMBED_KEY: [sealed.token]})
        publish_ticket.set(PublishTicket(body, "bench.charge"))
        content_type, encoding, data = serialization.dumps(body, "pii")
        got_args, got_kwargs, embed = serialization.loads(data, content_type, encoding)
        sealer.open_message(
            "bench.charge", TASK_ID, {"args": got_args, "kwargs": got_kwargs, **EMBED}, embed[EMBED_KEY]
        )

    return run


def seal_open_only(app: Celery, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Only the celery-pii work: seal into copies, then open them back."""
    from celery_pii import get_pii

    sealer = get_pii(app).sealer

    def run() -> None:
        sealed = sealer.seal_message("bench.charge", TASK_ID, {"args": args, "kwargs": kwargs, **EMBED})
        root = sealed.root
        opened = {"args": list(root["args"]), "kwargs": dict(root["kwargs"]), **EMBED}
        opened["args"][2] = dict(opened["args"][2])
        sealer.open_message("bench.charge", TASK_ID, opened, [sealed.token])

    return run


def seal_open_floor(args: list[Any], kwargs: dict[str, Any]) -> Any:
    """The essential steps of sealing and opening, flattened by hand for this task's two fields.

    Not the library: a reference point.  It does what the envelope needs
    (the two values as JSON read back as a check, a header binding key, task
    id and locations, a random nonce, AES-GCM both ways, base64 both ways,
    copies with markers, putting the values back) and nothing general: no
    task lookup, key cache, retention, canvas, detection or validation of
    hostile input.  The gap between this and ``seal+open only`` is what the
    library's generality costs per message.
    """
    import binascii
    import struct

    import orjson
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(os.urandom(32))
    prefix = b"\x01\x00\x01\x00\x00\x00\x01\x09bench-aes"
    where = orjson.dumps([["args", 0], ["args", 2, "email"]])
    framed_where = struct.pack(">I", len(where)) + where
    ad_tail = b"bench.charge"
    marker = "[pii:sealed]"
    unpack_length = struct.Struct(">I").unpack_from

    def seal(call: list[Any]) -> tuple[list[Any], str]:
        values = [call[0], call[2]["email"]]
        plaintext = orjson.dumps(values)
        if orjson.loads(plaintext) != values:
            raise TypeError
        task_id = TASK_ID.encode()
        header = b"".join((prefix, bytes((len(task_id),)), task_id, framed_where))
        nonce = os.urandom(12)
        sealed = aead.encrypt(nonce, plaintext, header + ad_tail)
        token = binascii.b2a_base64(header + nonce + sealed, newline=False).decode()
        copy = list(call)
        copy[0] = marker
        copy[2] = {**call[2], "email": marker}
        return copy, token

    def open_into(call: list[Any], token: str) -> None:
        data = binascii.a2b_base64(token)
        start = len(prefix)
        if data[:start] != prefix:
            raise ValueError
        end = start + 1 + data[start]
        if data[start + 1 : end].decode() != TASK_ID:
            raise ValueError
        end += 4 + unpack_length(data, end)[0]
        body = memoryview(data)
        values = orjson.loads(aead.decrypt(body[end : end + 12], body[end + 12 :], data[:end] + ad_tail))
        call[0] = values[0]
        call[2]["email"] = values[1]

    def run() -> None:
        sealed_args, token = seal(args)
        opened = list(sealed_args)
        opened[2] = dict(opened[2])
        open_into(opened, token)

    return run


def json_codec(args: list[Any], kwargs: dict[str, Any]) -> Any:
    """kombu json dumps + loads."""
    body = (args, kwargs, EMBED)

    def run() -> None:
        content_type, encoding, data = serialization.dumps(body, "json")
        serialization.loads(data, content_type, encoding)

    return run


def whole_body(args: list[Any], kwargs: dict[str, Any], kind: str) -> Any:
    """json + one cipher over the whole body (what teams hand-roll)."""
    from cryptography.fernet import Fernet
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    body = (args, kwargs, EMBED)
    if kind == "fernet":
        fernet = Fernet(Fernet.generate_key())
        encrypt, decrypt = fernet.encrypt, fernet.decrypt
    else:
        aead = AESGCM(os.urandom(32))

        def encrypt(data: bytes) -> bytes:
            nonce = os.urandom(12)
            return nonce + aead.encrypt(nonce, data, None)

        def decrypt(token: bytes) -> bytes:
            return aead.decrypt(token[:12], token[12:], None)

    def run() -> None:
        _, _, data = serialization.dumps(body, "json")
        token = encrypt(data.encode() if isinstance(data, str) else data)
        serialization.loads(decrypt(token), "application/json", "utf-8")

    return run


def auth_serializer(args: list[Any], kwargs: dict[str, Any], folder: Path) -> Any:
    """Celery's auth serializer (RSA-2048 signatures)."""
    from celery.security.certificate import Certificate, CertStore
    from celery.security.key import PrivateKey
    from celery.security.serialization import SecureSerializer

    key_pem, cert_pem = _self_signed()
    cert = Certificate(cert_pem)
    store = CertStore()
    store.add_cert(cert)
    serializer = SecureSerializer(PrivateKey(key_pem), cert, store, digest="sha256", serializer="json")
    body = (args, kwargs, EMBED)

    def run() -> None:
        serializer.deserialize(serializer.serialize(body))

    return run


def _self_signed() -> tuple[str, str]:
    from datetime import datetime, timedelta, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization as crypto_serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        crypto_serialization.Encoding.PEM,
        crypto_serialization.PrivateFormat.TraditionalOpenSSL,
        crypto_serialization.NoEncryption(),
    ).decode()
    return key_pem, cert.public_bytes(crypto_serialization.Encoding.PEM).decode()


def message_path(app: Celery, args: list[Any], kwargs: dict[str, Any], *, pii: bool) -> Any:
    """Celery's own message creation (argsrepr included), then encode, decode (and open)."""
    create = app.amqp.create_task_message
    serializer = "pii" if pii else "json"
    sealer = None
    if pii:
        from celery_pii import get_pii

        sealer = get_pii(app).sealer

    def run() -> None:
        message = create(TASK_ID, "bench.charge", args, kwargs)
        content_type, encoding, data = serialization.dumps(message.body, serializer)
        got_args, got_kwargs, embed = serialization.loads(data, content_type, encoding)
        if sealer is not None:
            root = {"args": got_args, "kwargs": got_kwargs, **EMBED}
            sealer.open_message("bench.charge", TASK_ID, root, embed[EMBED_KEY])

    return run


def worker_path(app: Celery, args: list[Any], kwargs: dict[str, Any], *, pii: bool) -> Any:
    """What a worker does per task once a message is in: decode it, then Celery's tracer runs it.

    The tracer is Celery's own (``build_tracer``, set as ``task.__trace__``, as ``fast_trace_task`` uses it),
    so a ``pii`` task pays its opening step (``before_start``), its context
    and its ``task_postrun`` receiver here; the task function does nothing.
    """
    from celery.app.trace import build_tracer

    task = app.tasks["bench.charge"]
    task.ignore_result = True  # as in the end-to-end benchmark: nothing stored
    message = app.amqp.create_task_message(TASK_ID, "bench.charge", args, kwargs)
    serializer = "pii" if pii else "json"
    if pii:
        from celery_pii._serializer import PublishTicket, publish_ticket

        # The publish step's ticket (the body was sealed by create_task_message).
        publish_ticket.set(PublishTicket(message.body, "bench.charge"))
    content_type, encoding, data = serialization.dumps(message.body, serializer)
    headers = dict(message.headers)
    # Set on the task as a worker sets it (a PII app's task wraps it there: see _redelivery.py).
    task.__trace__ = build_tracer("bench.charge", task, app=app, eager=False, propagate=True)
    tracer = task.__trace__

    def run() -> None:
        got_args, got_kwargs, embed = serialization.loads(data, content_type, encoding)
        request = dict(headers, args=got_args, kwargs=got_kwargs, hostname="bench", is_eager=False)
        request.update(embed)
        tracer(TASK_ID, got_args, got_kwargs, request)

    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="encode+decode per message, side by side")
    parser.add_argument("--json", help="where to write the results (default benchmarks/results/codec.json)")
    parser.add_argument("--size", type=int, default=1024, help="body size in bytes (default 1024)")
    parser.add_argument("--rounds", type=int, default=15)
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        args, kwargs = body_of_size(options.size)
        aes, chacha = make_pii_app(folder), make_pii_app(folder, algorithm="chacha20-poly1305")
        plain = make_json_app()
        codec = _harness.compare(
            {
                "json": json_codec(args, kwargs),
                "pii aes-256-gcm": pii_codec(aes, args, kwargs),
                "pii chacha20-poly1305": pii_codec(chacha, args, kwargs),
                "seal+open only": seal_open_only(aes, args, kwargs),
                "seal+open floor": seal_open_floor(args, kwargs),
                "fernet whole body": whole_body(args, kwargs, "fernet"),
                "aes-gcm whole body": whole_body(args, kwargs, "aesgcm"),
                "auth rsa-2048": auth_serializer(args, kwargs, folder),
            },
            baseline="json",
            rounds=options.rounds,
        )
        warn = make_pii_app(folder, detect="warn")
        encrypt = make_pii_app(folder, detect="encrypt")
        path = _harness.compare(
            {
                "json message path": message_path(plain, args, kwargs, pii=False),
                "pii message path": message_path(aes, args, kwargs, pii=True),
                "pii + pii_detect=warn": message_path(warn, args, kwargs, pii=True),
                "pii + pii_detect=encrypt": message_path(encrypt, args, kwargs, pii=True),
            },
            baseline="json message path",
            rounds=options.rounds,
        )
        worker = _harness.compare(
            {
                "json worker path": worker_path(plain, args, kwargs, pii=False),
                "pii worker path": worker_path(aes, args, kwargs, pii=True),
            },
            baseline="json worker path",
            rounds=options.rounds,
        )
    size = len(serialization.dumps((args, kwargs, EMBED), "json")[2])
    print(_harness.table(f"encode + decode, {size}-byte body, 2 PII fields", codec, baseline="json"))
    print()
    print(
        _harness.table("Celery's publish + consume path (incl. argsrepr)", path, baseline="json message path")
    )
    print()
    print(
        _harness.table(
            "a worker: decode + Celery's tracer (incl. opening)", worker, baseline="json worker path"
        )
    )
    data = {"body_bytes": size, "pii_fields": 2, "codec": codec, "message_path": path, "worker_path": worker}
    print("\nwritten to", _harness.write("codec", data, options.json))
    return data


if __name__ == "__main__":
    main()
