"""A deployment for integration tests: real redis-server, real workers, SQLite or PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks.harness.servers import postgres_server, redis_server
from tests.helpers.deployment import Deployment, database_for, make_deployment


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp(f"deploy-{request.param}")
    database = database_for(request, request.param, folder)
    deployment = make_deployment(request.param, folder, redis_url, database)
    deployment.start_workers(2)
    yield deployment
    deployment.stop()
