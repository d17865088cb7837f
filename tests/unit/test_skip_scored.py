"""Incremental nightly runs: `score --skip-scored` scores only what is new or changed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from benchmarks.harness.cli import FAST_MVG
from tests.helpers.cli import invoke_cli


@pytest.fixture(scope="module")
def nightly(tmp_path_factory: pytest.TempPathFactory, textures) -> tuple[Path, Path]:
    """A data dir with a model, and last night's dump already scored once."""
    root, dump = textures
    data_dir = tmp_path_factory.mktemp("nightly")
    tonight = data_dir.parent / f"{data_dir.name}-dump"
    shutil.copytree(dump, tonight)
    invoke_cli(data_dir, "train", "--data", str(root), "--name", "m", *FAST_MVG)
    first = _score(data_dir, tonight)
    assert first["n_skipped"] == 0 and first["n_total"] == len(list(tonight.iterdir()))
    return data_dir, tonight


def _score(data_dir: Path, dump: Path) -> dict:
    out = invoke_cli(data_dir, "score", "--model", "m", str(dump), "--skip-scored", "--format", "json").stdout
    return json.loads(out)


def _results(data_dir: Path, job_id: int) -> list[str]:
    rows = json.loads(invoke_cli(data_dir, "results", str(job_id), "--format", "json").stdout)
    return sorted(Path(r["path"]).name for r in rows)


def test_the_same_dump_again_scores_nothing(nightly: tuple[Path, Path]) -> None:
    data_dir, dump = nightly
    images = [p for p in dump.iterdir() if p.suffix == ".png" and "corrupt" not in p.name]
    again = _score(data_dir, dump)
    # Only files that gave an error last night come back (they were never scored).
    assert again["status"] == "done" and again["n_skipped"] == len(images)
    assert _results(data_dir, again["job_id"]) == sorted(p.name for p in dump.iterdir() if p not in images)


def test_a_new_file_is_the_only_one_scored(nightly: tuple[Path, Path]) -> None:
    data_dir, dump = nightly
    source = next(p for p in sorted(dump.glob("*.png")) if "corrupt" not in p.name)
    shutil.copy(source, dump / "zz_new_tonight.png")
    try:
        job = _score(data_dir, dump)
        assert "zz_new_tonight.png" in _results(data_dir, job["job_id"])
        assert [n for n in _results(data_dir, job["job_id"]) if n.endswith(".png") and "corrupt" not in n] == \
            ["zz_new_tonight.png"]
    finally:
        (dump / "zz_new_tonight.png").unlink()


def test_a_touched_file_is_skipped_and_a_changed_one_scored_again(nightly: tuple[Path, Path]) -> None:
    data_dir, dump = nightly
    touched, changed = sorted(p for p in dump.glob("*.png") if "corrupt" not in p.name)[:2]
    os.utime(touched, None)  # same bytes, new mtime: recognized by its SHA-256
    original = changed.read_bytes()
    other = next(p for p in sorted(dump.glob("*.png")) if p not in (touched, changed) and "corrupt" not in p.name)
    changed.write_bytes(other.read_bytes())  # new content under an old name
    try:
        job = _score(data_dir, dump)
        scored = _results(data_dir, job["job_id"])
        assert changed.name in scored and touched.name not in scored
    finally:
        changed.write_bytes(original)
