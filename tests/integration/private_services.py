"""Private Redis and PostgreSQL servers that fault tests start, stop and restart by pid.

The machine's own services are never touched: each server here runs on a
free port with its data in a temporary folder, and is stopped by the pid
this module started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = next(Path("/usr/lib/postgresql").glob("*/bin"), Path("/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, *, up: bool, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.05)
    state = "up" if up else "down"
    msg = f"port {port} did not go {state}"
    raise TimeoutError(msg)


class PrivateRedis:
    """redis-server on its own port, persisting every write (so a restart loses nothing)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> PrivateRedis:
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, up=True)
        return self

    def stop(self, *, kill: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.process.wait(30)
        _wait_port(self.port, up=False)

    def restart(self, *, down_for: float = 1.0) -> None:
        self.stop(kill=True)
        time.sleep(down_for)
        self.start()


class PrivatePostgres:
    """A PostgreSQL cluster of its own (initdb in a temp folder), run as the postgres user."""

    def __init__(self) -> None:
        # Its own folder directly under /tmp: pytest's temporary folders are
        # private to root, and the server runs as the postgres user.
        self.folder = Path(tempfile.mkdtemp(prefix="celery-pii-pg-"))
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.data = self.folder / "data"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)

    def start(self) -> PrivatePostgres:
        if not self.data.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(self.folder, "postgres")
            subprocess.run(
                self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                                  "--no-sync", "-E", "UTF8"),
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
        command = self._as_postgres(
            str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.folder),
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
        )  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, up=True)
        time.sleep(0.3)  # the port opens just before the server accepts logins
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # SIGINT is PostgreSQL's fast shutdown (sessions end now); it goes to the
            # postmaster itself, whose pid it writes, since runuser does not forward it.
            postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(postmaster, signal.SIGINT)
            self.process.wait(60)
        _wait_port(self.port, up=False)

    def remove(self) -> None:
        """Stop it and delete its data."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
