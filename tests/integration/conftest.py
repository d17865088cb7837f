"""A deployment for integration tests: real redis-server, real workers, SQLite or PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import cli_env
from tests.servers import Worker, create_database, postgres_server, redis_server


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


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


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp(f"deploy-{request.param}")
    database = database_for(request, request.param, folder)
    deployment = make_deployment(request.param, folder, redis_url, database)
    deployment.start_workers(2)
    yield deployment
    deployment.stop()
