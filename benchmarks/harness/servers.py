"""Throwaway servers for tests and benchmarks: redis-server and PostgreSQL on free ports, and
worker processes.

Nothing already running on this machine is used. When a server binary is missing a test is
skipped with the reason, unless ADQUEUE_REQUIRE_SERVERS=1 (set by .ci/run), where it fails; a
benchmark stops with the reason.
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
from contextlib import contextmanager, suppress
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def missing(what: str) -> None:
    message = f"{what} not found: install it (Debian: apt-get install {what.split()[0]}) or run .ci/run"
    if "pytest" not in sys.modules:
        raise SystemExit(message)
    import pytest

    if os.environ.get("ADQUEUE_REQUIRE_SERVERS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def wait_until(check, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - not up yet, in whatever way: try again until the deadline
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


class RedisServer:
    """A redis-server of our own on a free port, restartable on the same port: with its
    append-only file kept (`persist`), a restart keeps the queues; with `lose_data` it comes
    back empty, like a Redis without persistence."""

    def __init__(self, *, persist: bool = False) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            missing("redis-server")
        self.port = free_port()
        self.persist = persist
        self.folder = Path(tempfile.mkdtemp(prefix="adqueue-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        wait_until(redis.Redis(port=self.port, socket_connect_timeout=1).ping, 20, "redis-server")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis writes its append-only file and exits
            self.process.wait(20)

    def restart(self, *, lose_data: bool = False) -> None:
        self.stop()
        if lose_data:
            for path in self.folder.iterdir():
                if path.name != "redis.log":
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def redis_server(*, persist: bool = False) -> Iterator[str]:
    server = RedisServer(persist=persist)
    try:
        yield server.url
    finally:
        server.close()


def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "postgres").exists():
            return folder
    return None


class PostgresServer:
    """A fresh cluster in a temp dir on a free port, restartable on the same port and data.
    As root, it runs as the `postgres` user (PostgreSQL refuses root)."""

    def __init__(self) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            missing("postgresql (initdb, postgres)")
        assert bindir is not None
        self.bindir = bindir
        self.port = free_port()
        self.run_as: list[str] = []
        self.folder = Path(tempfile.mkdtemp(prefix="adqueue-pg-"))
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                missing("postgresql (a 'postgres' system user)")
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self.env = {**os.environ, "LC_ALL": "C.UTF-8"}
        subprocess.run([*self.run_as, str(bindir / "initdb"), "-D", str(self.folder / "data"), "-U", "postgres",
                        "-A", "trust", "--no-sync", "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL, env=self.env)
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [*self.run_as, str(self.bindir / "postgres"), "-D", str(self.folder / "data"), "-p", str(self.port),
             "-h", "127.0.0.1", "-k", str(self.folder), "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=open(self.folder / "postgres.log", "ab"),  # noqa: SIM115 - the server's
            env=self.env,
        )
        import psycopg

        def ready() -> bool:
            with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", connect_timeout=2):
                return True

        wait_until(ready, 30, "postgres")

    def stop(self) -> None:
        """Fast shutdown: open connections are cut. Signalled through pg_ctl, since as root the
        process we started is `runuser`, which does not pass signals on to the postmaster."""
        if self.process is None or self.process.poll() is not None:
            return
        subprocess.run([*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast",
                        "-w", "-t", "30", "stop"], check=False, stdout=subprocess.DEVNULL, env=self.env)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends, as a crash or an OOM kill would: no shutdown."""
        pid_file = self.folder / "data" / "postmaster.pid"
        postmaster = int(pid_file.read_text().split()[0])
        children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == postmaster]
        for pid in [postmaster, *children]:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(30)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@contextmanager
def postgres_server() -> Iterator[str]:
    server = PostgresServer()
    try:
        yield server.url
    finally:
        server.close()


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
        self._stream = open(log, "wb")  # noqa: SIM115 - open as long as the worker runs; closed by stop()
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
