"""A deployment for integration tests: real redis-server, real workers, SQLite or PostgreSQL."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from benchmarks.harness.cli import cli_env
from benchmarks.harness.servers import Worker, create_database


@dataclass
class Deployment:
    """One adqueue installation: a database, a data dir, a queue on the shared Redis, workers."""

    name: str
    env: dict[str, str]
    folder: Path
    workers: list[Worker] = field(default_factory=list)

    def start_workers(self, count: int, **extra_env: str) -> list[Worker]:
        started = []
        for _ in range(count):
            log = self.folder / f"worker{len(self.workers)}.log"
            worker = Worker({**self.env, **extra_env}, log)
            self.workers.append(worker)
            started.append(worker)
        for worker in started:
            worker.wait_ready()
        return started

    def embedded_env(self) -> dict[str, str]:
        return {**self.env, "ADQUEUE_BROKER_URL": ""}

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


def make_deployment(kind: str, folder: Path, redis: str, database: str, **settings: str) -> Deployment:
    env = cli_env(
        ADQUEUE_DATA_DIR=str(folder / "data"),
        ADQUEUE_DATABASE_URL=database,
        ADQUEUE_BROKER_URL=redis,
        ADQUEUE_QUEUE=f"test-{uuid.uuid4().hex[:8]}",  # a private queue on the shared Redis
        **settings,
    )
    return Deployment(kind, env, folder)


def database_for(request: pytest.FixtureRequest, kind: str, folder: Path) -> str:
    """A fresh database: a SQLite file in `folder`, or a new database on the test PostgreSQL."""
    if kind == "sqlite":
        return f"sqlite:///{folder / 'adqueue.db'}"
    return create_database(request.getfixturevalue("postgres_url"), f"adq_{uuid.uuid4().hex[:10]}")
