"""Real databases for the key-store tests: a fresh schema (PostgreSQL), database (MariaDB) or file (SQLite)."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from celery.contrib.testing.worker import test_worker_started

from celery_pii._keys import KeyManager
from celery_pii._migrate import migrate
from celery_pii._sources import LocalMasterKey
from celery_pii._store import KeyStore

POSTGRES_URL = os.environ.get("PII_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("PII_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("PII_TEST_REDIS_URL", "redis://127.0.0.1:6379")
RABBITMQ_URL = os.environ.get("PII_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")

BACKENDS = ("postgresql", "mariadb", "sqlite")


@test_worker_started.connect(weak=False)
def _stop_in_worker_threads_promptly(worker, consumer, **_):
    """Wake a start_worker() worker's event loop every half second.

    Leaving start_worker() only asks the worker to stop: it sees that on its
    loop's next turn.  With RabbitMQ and nothing to do, the loop sleeps up to
    ten seconds, which every test leaving such a worker waited.
    """
    consumer.timer.call_repeatedly(0.5, _nothing)


def _nothing() -> None:
    pass


def _fresh_postgres() -> tuple[str, object]:
    schema = f"pii_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_URL, poolclass=sa.pool.NullPool)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')

    def drop() -> None:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()

    separator = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{separator}options={quote(f'-csearch_path={schema}')}", drop


def _fresh_mariadb() -> tuple[str, object]:
    name = f"pii_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(MARIADB_URL, poolclass=sa.pool.NullPool)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")

    def drop() -> None:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP DATABASE `{name}`")
        admin.dispose()

    return MARIADB_URL.rsplit("/", 1)[0] + "/" + name + "?charset=utf8mb4", drop


def fresh_database(backend: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object]:
    """A URL of an empty database of the given kind, and a function that drops it."""
    if backend == "postgresql":
        return _fresh_postgres()
    if backend == "mariadb":
        return _fresh_mariadb()
    path = tmp_path_factory.mktemp("sqlite") / "keys.db"
    return f"sqlite:///{path}", lambda: None


@pytest.fixture(params=BACKENDS)
def empty_db(request, tmp_path_factory):
    """An empty database (no celery-pii tables) on each backend."""
    url, drop = fresh_database(request.param, tmp_path_factory)
    yield url
    drop()


@pytest.fixture(scope="session", params=BACKENDS)
def migrated_db(request, tmp_path_factory):
    """A migrated database per backend, shared by a session (tables emptied per test)."""
    url, drop = fresh_database(request.param, tmp_path_factory)
    migrate(url)
    yield url
    drop()


MASTER = LocalMasterKey(bytes(range(32)))


@pytest.fixture
def db_url(migrated_db):
    """A migrated database with empty tables."""
    engine = sa.create_engine(migrated_db, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM celery_pii_keys")
        connection.exec_driver_sql("DELETE FROM celery_pii_key_audit")
    engine.dispose()
    return migrated_db


@pytest.fixture
def make_manager(db_url):
    """Build KeyManagers on the test database (closed at the end)."""
    managers = []

    def make(master=MASTER, **options):
        manager = KeyManager(KeyStore(db_url), master, **options)
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.store.dispose()


@pytest.fixture
def manager(make_manager):
    """A KeyManager on the test database."""
    return make_manager()


# -- Celery apps on the real Redis / RabbitMQ and PostgreSQL ---------------------------------------

TEST_MASTER_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="  # bytes(range(32)), test only
# Redis databases the tests write to (and the examples test's): point them elsewhere where these hold data.
BROKER_DB = int(os.environ.get("PII_TEST_REDIS_BROKER_DB", "3"))
BACKEND_DB = int(os.environ.get("PII_TEST_REDIS_BACKEND_DB", "4"))
EXAMPLES_DB = int(os.environ.get("PII_TEST_REDIS_EXAMPLES_DB", "7"))
APP_DIR = str(Path(__file__).parent)


@pytest.fixture(scope="session", autouse=True)
def _master_key_env():
    """Every app in the tests reads its master key from CELERY_PII_MASTER_KEY."""
    previous = os.environ.get("CELERY_PII_MASTER_KEY")
    os.environ["CELERY_PII_MASTER_KEY"] = TEST_MASTER_KEY
    yield
    if previous is None:
        os.environ.pop("CELERY_PII_MASTER_KEY", None)
    else:
        os.environ["CELERY_PII_MASTER_KEY"] = previous


@pytest.fixture(scope="session")
def key_store_url():
    """A migrated PostgreSQL key store (its own schema) shared by the Celery tests."""
    url, drop = _fresh_postgres()
    migrate(url)
    yield url
    drop()


@pytest.fixture(scope="session")
def testapp_module():
    """The pii_testapp module (importable by worker subprocesses too)."""
    import importlib
    import sys

    if APP_DIR not in sys.path:
        sys.path.insert(0, APP_DIR)
    return importlib.import_module("pii_testapp")


@pytest.fixture
def queue_name():
    """A queue of this test's own, so concurrent runs never share messages."""
    return f"pii-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_app(testapp_module, key_store_url, queue_name):
    """Build a PII test app on Redis (or another broker) with this test's queue."""

    def make(broker=None, backend=None, key_store=None, **conf):
        # In-process workers must leave pytest's log capture on the root logger alone.
        conf.setdefault("worker_hijack_root_logger", False)
        return testapp_module.make_app(
            broker=broker or f"{REDIS_URL}/{BROKER_DB}",
            backend=backend or f"{REDIS_URL}/{BACKEND_DB}",
            key_store=key_store or key_store_url,
            queue=queue_name,
            **conf,
        )

    return make


@pytest.fixture
def app(make_app):
    """A PII test app on Redis with result_extended and events on."""
    return make_app(result_extended=True, task_send_sent_event=True, worker_send_task_events=True)


@pytest.fixture
def worker(app):
    """An in-process solo worker consuming the app's queue."""
    from celery.contrib.testing.worker import start_worker

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20, loglevel="INFO") as w:
        yield w


# -- helpers to look at what really went over the wire ---------------------------------------------


def redis_client(db, **options):
    """A raw Redis client on the test server (``options``: redis-py's, e.g. ``socket_timeout``)."""
    import redis

    host_port = REDIS_URL.split("://", 1)[1]
    host, _, port = host_port.partition(":")
    return redis.Redis(host=host, port=int(port or 6379), db=db, **options)


def publish_raw(app, body, headers, **properties):
    """Put a ``pii`` message on the app's queue as given (a forged, damaged or foreign message)."""
    from kombu import Connection, Exchange, Producer, Queue

    queue = app.conf.task_default_queue
    with Connection(app.conf.broker_url) as connection:
        exchange = Exchange(queue, type="direct")
        Producer(connection).publish(
            body,
            exchange=exchange,
            routing_key=queue,
            declare=[Queue(queue, exchange, routing_key=queue)],
            content_type="application/x-celery-pii",
            content_encoding="binary",
            headers=headers,
            **properties,
        )


def queued_messages(queue, db=BROKER_DB):
    """Raw kombu messages (dicts) waiting in a Redis queue, oldest first."""
    import json

    with redis_client(db) as client:
        return [json.loads(raw) for raw in reversed(client.lrange(queue, 0, -1))]


def message_bytes(message):
    """Every byte of a raw Redis kombu message: the envelope JSON and the decoded body."""
    import base64
    import json

    body = message["body"]
    decoded = (
        base64.b64decode(body) if message.get("properties", {}).get("body_encoding") == "base64" else body
    )
    return (
        json.dumps(message).encode() + b"\n" + (decoded if isinstance(decoded, bytes) else decoded.encode())
    )


class EventCapture:
    """Collects every Celery event of an app in a background thread."""

    def __init__(self, app):
        import threading

        self.app = app
        self.events = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._receiver = None

    def _run(self):
        with self.app.connection_for_read() as connection:
            self._receiver = self.app.events.Receiver(connection, handlers={"*": self.events.append})
            self._ready.set()
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self):
        self._thread.start()
        self._ready.wait(10)
        import time

        time.sleep(0.3)  # the receiver's queue is bound once consume starts
        return self

    def __exit__(self, *exc):
        import time

        time.sleep(0.5)
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(10)

    def of_type(self, kind):
        """Events of one type (e.g. 'task-sent')."""
        return [event for event in self.events if event.get("type") == kind]


class TcpProxy:
    """A real TCP proxy in front of a service, which a test can cut and restore (a network outage)."""

    def __init__(self, target_host, target_port):
        import socket
        import threading

        self.target = (target_host, target_port)
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        self._up = threading.Event()
        self._up.set()
        self._flowing = threading.Event()  # cleared: connections stay open, nothing is forwarded
        self._flowing.set()
        self._connections = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if not self._up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source, sink):
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.close()

    def cut(self):
        """Refuse new connections and sever the open ones."""
        import socket

        self._up.clear()
        with self._lock:
            for sock in self._connections:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
                except OSError:
                    pass
            self._connections.clear()

    def restore(self):
        """Accept connections again."""
        self._up.set()

    def freeze(self):
        """Hang: connections are accepted and kept open, and nothing is forwarded (a stalled pooler)."""
        self._flowing.clear()

    def thaw(self):
        """Forward again what was held."""
        self._flowing.set()

    def close(self):
        """Stop the proxy."""
        self.thaw()
        self.cut()
        self._server.close()


# -- real worker processes --------------------------------------------------------------------------


class WorkerProcess:
    """`celery -A pii_testapp worker` in a subprocess, logging at DEBUG to a file."""

    def __init__(
        self,
        *,
        broker,
        backend,
        key_store,
        queue,
        pool,
        concurrency,
        logfile,
        acks_late=False,
        env=None,
        loglevel="DEBUG",
    ):
        import subprocess
        import sys

        self.logfile = logfile
        self.stderr = ""  # what it wrote outside its log file, once stopped
        extra_env = env
        env = dict(os.environ)
        env.update(
            PII_TESTAPP_BROKER=broker,
            PII_TESTAPP_BACKEND=backend,
            PII_TESTAPP_KEY_STORE=key_store,
            PII_TESTAPP_QUEUE=queue,
            PII_TESTAPP_ACKS_LATE="1" if acks_late else "0",
            PYTHONPATH=os.pathsep.join([APP_DIR, env.get("PYTHONPATH", "")]),
        )
        env.update(extra_env or {})
        command = [
            sys.executable, "-m", "celery", "-A", "pii_testapp", "worker",
            "-P", pool, "-c", str(concurrency), "-l", loglevel, "--logfile", str(logfile),
            "-Q", queue, "-E", "--without-mingle", "--without-gossip", "--without-heartbeat",
            "-n", f"{queue}@%h",
        ]  # fmt: skip
        # A session of its own: kill() ends the worker and its pool processes together.
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )

    def wait_ready(self, timeout=60):
        """Block until the worker logs that it is ready."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    "worker exited: " + self.process.stderr.read().decode(errors="replace")[-2000:]
                )
            if Path(self.logfile).exists() and " ready." in Path(self.logfile).read_text(errors="replace"):
                return self
            time.sleep(0.2)
        raise TimeoutError("worker did not become ready")

    def stop(self, timeout=30):
        """Warm shutdown (SIGTERM), then SIGKILL if it hangs."""
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._read_stderr()

    def kill(self):
        """SIGKILL to the worker and its pool processes: for a test that is over (no shutdown to wait for)."""
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self._read_stderr()

    def _read_stderr(self):
        if self.process.stderr and not self.process.stderr.closed:
            self.stderr = self.process.stderr.read().decode(errors="replace")
            self.process.stderr.close()

    def log(self):
        """Everything the worker logged."""
        return Path(self.logfile).read_text(errors="replace")


@pytest.fixture
def start_worker_process(key_store_url, queue_name, tmp_path):
    """Start real worker processes for this test (stopped at the end)."""
    started = []

    def start(
        broker=None,
        backend=None,
        pool="prefork",
        concurrency=2,
        acks_late=False,
        env=None,
        loglevel="DEBUG",
        key_store=None,
        wait=True,
    ):
        worker = WorkerProcess(
            broker=broker or f"{REDIS_URL}/{BROKER_DB}",
            backend=backend or f"{REDIS_URL}/{BACKEND_DB}",
            key_store=key_store or key_store_url,
            queue=queue_name,
            pool=pool,
            concurrency=concurrency,
            logfile=tmp_path / f"worker-{len(started)}.log",
            acks_late=acks_late,
            env=env,
            loglevel=loglevel,
        )
        started.append(worker)
        return worker.wait_ready() if wait else worker

    yield start
    # The test is over: a warm shutdown (two seconds of a prefork pool's) would serve no one.
    for worker in started:
        worker.kill()


class RedisMonitor:
    """Every command any client sends to Redis (all databases), as MONITOR shows it."""

    def __init__(self):
        import threading

        self.commands = []
        # No read timeout: redis-py 8 gives 5 s, and a slow machine can leave Redis quiet that long.
        self._client = redis_client(0, socket_timeout=None)
        self._monitor = self._client.monitor()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with self._monitor as monitor:
            for command in monitor.listen():
                self.commands.append(command["command"])
                if self._stop.is_set():
                    return

    def __enter__(self):
        import time

        self._thread.start()
        time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        with redis_client(0) as poke:
            poke.ping()
        self._thread.join(10)
        self._client.close()

    def captured(self):
        """The raw command text plus every base64 message body in it, decoded."""
        import base64
        import re

        raw = "\n".join(self.commands)
        bodies = []
        for match in re.finditer(r'"body": "([A-Za-z0-9+/=]+)"', raw):
            try:
                bodies.append(base64.b64decode(match.group(1)).decode("utf-8", "replace"))
            except ValueError:
                continue
        return raw + "\n" + "\n".join(bodies)


class RabbitFirehose:
    """Every message published to or delivered by RabbitMQ (the firehose tracer), with bodies."""

    def __init__(self, url):
        self.url = url
        self.messages = []

    def __enter__(self):
        import subprocess

        from kombu import Connection, Exchange, Queue

        subprocess.run(["rabbitmqctl", "trace_on"], check=True, capture_output=True)
        self._connection = Connection(self.url)
        self._queue = Queue(
            f"pii-firehose-{uuid.uuid4().hex[:8]}",
            Exchange("amq.rabbitmq.trace", type="topic", passive=True),
            routing_key="#",
            exclusive=True,
        )
        self._queue = self._queue(self._connection.default_channel)
        self._queue.declare()
        return self

    def __exit__(self, *exc):
        import subprocess

        self.drain()
        subprocess.run(["rabbitmqctl", "trace_off"], check=False, capture_output=True)
        self._connection.release()

    def drain(self):
        """Collect what the tracer has copied so far."""
        while True:
            message = self._queue.get(no_ack=True)
            if message is None:
                return
            self.messages.append((message.headers, message.body))

    def captured(self):
        """Headers and raw bodies of every traced message, as text."""
        import json

        return "\n".join(
            json.dumps(headers, default=str) + "\n" + body.decode("utf-8", "replace")
            if isinstance(body, bytes)
            else str(body)
            for headers, body in self.messages
        )
