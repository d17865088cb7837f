"""Throwaway servers for tests: redis-server and PostgreSQL on free ports, and worker processes.

Nothing already running on this machine is used. When a server binary is missing the test is
skipped with the reason, unless ADQUEUE_REQUIRE_SERVERS=1 (set by .ci/run), where it fails.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def missing(what: str) -> None:
    message = f"{what} not found: install it (Debian: apt-get install {what.split()[0]}) or run .ci/run"
    if os.environ.get("ADQUEUE_REQUIRE_SERVERS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def wait_until(check, timeout: float, what: str, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


@contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        missing("redis-server")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="adqueue-redis-") as folder:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", folder, "--logfile", str(Path(folder) / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            import redis

            client = redis.Redis(port=port, socket_connect_timeout=1)
            wait_until(client.ping, 20, "redis-server")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(10)


def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "postgres").exists():
            return folder
    return None


@contextmanager
def postgres_server() -> Iterator[str]:
    """A fresh cluster in a temp dir. As root, it runs as the `postgres` user (PostgreSQL refuses root)."""
    bindir = _pg_bindir()
    if bindir is None:
        missing("postgresql (initdb, postgres)")
    port = free_port()
    run_as: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="adqueue-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            missing("postgresql (a 'postgres' system user)")
        os.chown(folder, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                    "--no-sync", "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL, env=env)
    process = subprocess.Popen(
        [*run_as, str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
         "-k", str(folder), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
         "-c", "max_connections=100"],
        stdout=subprocess.DEVNULL, stderr=open(folder / "postgres.log", "wb"), env=env,
    )
    try:
        import psycopg

        def ready() -> bool:
            with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", connect_timeout=2):
                return True

        wait_until(ready, 30, "postgres")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGINT)  # fast shutdown
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(folder, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    import psycopg

    port = server_url.rsplit(":", 1)[1]
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"


class Worker:
    """An `adqueue worker` process, with its log in a file."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        self._stream = open(log, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "adqueue", "worker", "--loglevel", "INFO", *args],
            env=env, stdout=self._stream, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 90) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log.read_text()[-3000:]}")
            return " ready." in self.log.read_text(errors="replace")

        wait_until(ready, timeout, f"worker (log {self.log})", interval=0.25)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._stream.close()
