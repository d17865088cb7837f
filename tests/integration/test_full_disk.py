"""A full disk under the data dir, for real: a tmpfs of 40 kB mounted on the folder adqueue writes
to (we run as root; a test that cannot mount says so and skips). Model files fail with one line
and leave nothing; evaluation maps cost the pixel metrics only the images they lost; heat maps
cost only themselves (the queued and embedded job of benchmarks/chaos.py, here embedded)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks.harness.chaos_faults import HEATMAP_DISK, Tmpfs
from benchmarks.harness.cli import FAST_MVG, cli_env, run_cli, run_json

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, textures) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("full-disk")
    env = cli_env(ADQUEUE_DATA_DIR=str(folder / "data"))
    run_cli(["train", "--data", str(textures[0]), "--name", "disk", *FAST_MVG], env)
    return env


@pytest.fixture
def full(trained: dict[str, str]) -> Iterator[Callable[[str], Path]]:
    mounts: list[Tmpfs] = []

    def mount(name: str) -> Path:
        tmpfs = Tmpfs(Path(trained["ADQUEUE_DATA_DIR"]) / name, HEATMAP_DISK)
        try:
            tmpfs.__enter__()
        except PermissionError as exc:
            pytest.skip(f"{exc}; a simulated ENOSPC would prove less, so this test needs a real mount")
        mounts.append(tmpfs)
        return tmpfs.folder

    yield mount
    for tmpfs in mounts:
        tmpfs.__exit__()


def test_a_model_file_on_a_full_disk_fails_in_one_line_and_leaves_nothing(trained, full, textures) -> None:
    models = full("models")
    done = run_cli(["train", "--data", str(textures[0]), "--name", "disk2", *FAST_MVG], trained, check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "No space left on device" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert [p for p in models.rglob("*") if p.is_file()] == []  # no half-written model, no temp file


def test_heat_maps_on_a_full_disk_cost_only_themselves(trained, full, textures) -> None:
    heatmaps = full("heatmaps")
    done = run_cli(["score", "--model", "disk", str(textures[1]), "--shard-size", "5", "--heatmaps", "all",
                    "--format", "json"], trained, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    job = json.loads(done.stdout)
    assert job["status"] == "done" and job["n_heatmaps_unwritten"] > 0, job
    assert job["unwritten"].endswith("heat map(s) not written: No space left on device"), job
    results = run_json(["results", str(job["job_id"])], trained)
    assert all(row["error"] is None or "space" not in row["error"] for row in results)
    scored = [row for row in results if row["score"] is not None]
    pointed = {Path(row["heatmap_path"]) for row in scored if row["heatmap_path"]}
    assert len(scored) == job["n_done"] and len(pointed) == len(scored) - job["n_heatmaps_unwritten"]
    on_disk = {p.resolve() for p in heatmaps.rglob("*") if p.is_file()}
    assert on_disk == pointed  # no orphan, no temp file, every row's heat map is there
    shown = run_cli(["jobs", str(job["job_id"])], trained).stdout
    assert "not written: No space left on device" in shown


def test_evaluation_maps_on_a_full_disk_leave_the_scores_and_say_what_is_missing(trained, full, textures) -> None:
    evaluations = full("evaluations")
    done = run_cli(["evaluate", "--model", "disk", "--data", str(textures[0]), "--shard-size", "50",
                    "--format", "json"], trained, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    job = json.loads(done.stdout)
    assert job["status"] == "done" and job["n_failed"] == 0, job
    assert job["n_eval_maps_unwritten"] == job["n_done"] > 0, job
    assert job["n_images_without_maps"] > 0 and "image_auroc" in job, job
    assert "pixel_auroc" not in job
    assert [p for p in evaluations.rglob("*") if p.is_file()] == []
