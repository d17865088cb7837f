"""Verbs that only read SQL or submit to a broker import no torch, scikit-learn or scipy.

Each verb runs as a person runs it: `python -m adqueue ...` in a fresh process, through the
launcher and its malloc re-exec decision, with Python's import profiling on
(PYTHONPROFILEIMPORTTIME, which a re-executed process inherits with the rest of the environment):
every module imported anywhere in the run is a stderr line ending in `| NAME`. The check is shown
able to fail by an embedded `score`, which computes and must import all three.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from adqueue.cli import cli
from benchmarks.harness.cli import FAST_MVG, cli_env, run_cli
from benchmarks.harness.servers import redis_server
from tests.helpers.cli import invoke_cli

HEAVY = {"torch", "sklearn", "scipy"}


def imported(stderr: str) -> set[str]:
    """Every module named by the import profile in `stderr`."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def run_profiled(args: list[str], env: dict[str, str], *, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = run_cli(args, {**env, "PYTHONPROFILEIMPORTTIME": "1"}, check=False)
    modules = imported(done.stderr)
    assert "adqueue.cli" in modules, f"no import profile for adqueue {' '.join(args)}:\n{done.stderr[-2000:]}"
    if ok:
        errors = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
        assert done.returncode == 0, f"adqueue {' '.join(args)} exited {done.returncode}: {errors[-20:]}"
    return done


def assert_light(args: list[str], env: dict[str, str], *, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = run_profiled(args, env, ok=ok)
    heavy = HEAVY & imported(done.stderr)
    assert not heavy, f"adqueue {' '.join(args)} imported {sorted(heavy)}"
    return done


def stdout_of(done: subprocess.CompletedProcess[str]) -> str:
    return done.stdout.strip()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, textures) -> Path:
    """A data dir with a tiny model `m` trained on the embedded default."""
    folder = tmp_path_factory.mktemp("instant")
    invoke_cli(folder, "train", "--data", str(textures[0]), "--name", "m", *FAST_MVG)
    return folder


@pytest.fixture(scope="module")
def embedded_score(data_dir: Path, textures) -> tuple[int, set[str]]:
    """(job id, modules imported) of an embedded `adqueue score`, which computes in its process."""
    env = cli_env(ADQUEUE_DATA_DIR=str(data_dir))
    done = run_profiled(["score", "--model", "m", str(textures[1]), "--heatmaps", "none"], env)
    return int(stdout_of(done).splitlines()[0]), imported(done.stderr)


def test_the_check_sees_what_computing_imports(embedded_score: tuple[int, set[str]]) -> None:
    _, modules = embedded_score
    assert modules >= HEAVY


def _help_invocations() -> list[list[str]]:
    invocations = [["--help"]]
    for name, command in sorted(cli.commands.items()):
        invocations.append([name, "--help"])
        invocations += [[name, sub, "--help"] for sub in sorted(getattr(command, "commands", {}))]
    return invocations


@pytest.mark.parametrize("args", _help_invocations(), ids=" ".join)
def test_help_is_light(args: list[str], tmp_path: Path) -> None:
    done = assert_light(args, cli_env(ADQUEUE_DATA_DIR=str(tmp_path)))
    assert "Usage:" in done.stdout


@pytest.mark.parametrize("args", [
    ["jobs"],
    ["jobs", "{job}"],
    ["results", "{job}", "--top", "3"],
    ["models"],
    ["sql", "SELECT count(*) AS n FROM results"],
    ["detectors"],
    ["detectors", "encoder_flow", "--format", "json"],
    ["reconcile"],
    ["db", "upgrade"],
], ids=" ".join)
def test_reading_verbs_are_light(args: list[str], data_dir: Path, embedded_score: tuple[int, set[str]]) -> None:
    job_id, _ = embedded_score
    assert_light([arg.format(job=job_id) for arg in args], cli_env(ADQUEUE_DATA_DIR=str(data_dir)))


def test_submitting_to_a_broker_is_light(data_dir: Path, textures) -> None:
    root, dump = textures
    with redis_server() as broker:
        env = cli_env(ADQUEUE_DATA_DIR=str(data_dir), ADQUEUE_BROKER_URL=broker, ADQUEUE_QUEUE="instant-test")
        for detector, setting in [("mvg", "levels=3,4"), ("differnet", "score=z2"), ("ebm", "image_size=128"),
                                  ("encoder_flow", "augment=dihedral")]:
            done = assert_light(["train", "--detector", detector, "--data", str(root), "--name", f"q{detector}",
                                 "--set", setting, "--set", "fpr=0.05"], env)
            assert stdout_of(done).isdigit()
        for detector, setting, message in [("mvg", "levels=99", "levels 0-8"),
                                           ("ebm", "image_size=33", "multiple of 32"),
                                           ("differnet", "score=nope", "score must be one of"),
                                           ("encoder_flow", "bogus=1", "unknown setting")]:
            refused = assert_light(["train", "--detector", detector, "--data", str(root), "--name", "bad",
                                    "--set", setting], env, ok=False)
            assert refused.returncode != 0 and message in refused.stderr
        score_job = stdout_of(assert_light(["score", "--model", "m", str(dump)], env))
        assert_light(["evaluate", "--model", "m", "--data", str(root)], env)
        assert_light(["cancel", score_job], env)
        assert_light(["resume", score_job], env)
        report = json.loads(stdout_of(assert_light(["reconcile", "--format", "json"], env)))
        assert "messages_sent" in report
        assert_light(["jobs"], env)


def test_jobs_answers_quickly(data_dir: Path, embedded_score: tuple[int, set[str]]) -> None:
    """A generous bound, for a loaded CI machine; benchmarks/cli.py measures the real figure."""
    env = cli_env(ADQUEUE_DATA_DIR=str(data_dir))
    times = []
    for _ in range(3):
        started = time.perf_counter()
        run_cli(["jobs"], env)
        times.append(time.perf_counter() - started)
    assert statistics.median(times) <= 1.5, times


# The torch-free halves agree with what they were split from.


def test_settings_modules_match_the_detectors() -> None:
    import sys

    from adqueue.detectors import registry

    for name in registry.names():
        spec, cls = registry.config_spec(name), registry.detector_class(name)
        assert cls.Config is spec.config_class
        # `adqueue detectors` prints the settings module's summary in place of the detector's own.
        assert spec.summary == (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        spec.validate(spec.config_class())
        cls.validate_config(spec.config_class())
    with pytest.raises(ValueError, match="levels 0-8"):
        registry.config_spec("mvg").build({"levels": "99"})
    with pytest.raises(ValueError, match="levels 0-8"):
        registry.create("mvg", {"levels": "99"})


def test_head_revision_is_alembics() -> None:
    from alembic.script import ScriptDirectory

    from adqueue.store.migrate import alembic_config, head_revision, scanned_head

    expected = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert scanned_head() == expected and head_revision() == expected


def test_schema_fast_path_upgrades_an_older_database(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import text

    from adqueue.store.migrate import alembic_config, ensure_schema, head_revision, stored_revisions
    from adqueue.store.session import Store

    store = Store(f"sqlite:///{tmp_path / 'old.db'}")
    assert stored_revisions(store) == []  # fresh: no alembic_version table yet
    with store.engine.begin() as connection:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    assert stored_revisions(store) == ["0001"]
    assert ensure_schema(store) is True
    assert stored_revisions(store) == [head_revision()]
    assert ensure_schema(store) is False
    with store.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM runs")).scalar() == 0  # 0002's table exists
    store.engine.dispose()
