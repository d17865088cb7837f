"""A model file must be exactly what was registered, SQL's threshold is the one that flags, and a
broken model can never pass images as normal. Also: one unreadable mask costs one image of the
pixel metrics, not the evaluation."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import Result
from safetensors.torch import load_file, save_file

from adqueue.core.config import Settings
from adqueue.core.hashing import file_sha256
from adqueue.jobs.context import Context
from adqueue.store.models import Model
from benchmarks.harness.cli import FAST_MVG
from tests.helpers.cli import invoke_cli


def invoke(data_dir: Path, *args: str, ok: bool = True) -> Result:
    return invoke_cli(data_dir, *args, ok=ok)


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory: pytest.TempPathFactory, textures) -> Path:
    data_dir = tmp_path_factory.mktemp("model-files")
    invoke(data_dir, "train", "--data", str(textures[0]), "--name", "m", *FAST_MVG)
    return data_dir


@pytest.fixture
def trained(tmp_path: Path, trained_once: Path) -> tuple[Path, Context, Model]:
    """A data dir of its own per test (the tests edit the model), copied from one training."""
    data_dir = tmp_path / "data"
    shutil.copytree(trained_once, data_dir)
    ctx = Context(Settings.load(data_dir=data_dir, broker_url=""))
    with ctx.store.session() as session:
        model = session.query(Model).filter_by(name="m").one()
    return data_dir, ctx, model


def _score(data_dir: Path, dump: Path) -> tuple[int, dict, list[dict]]:
    result = invoke(data_dir, "score", "--model", "m", str(dump), "--format", "json", ok=False)
    job = json.loads(result.stdout)
    rows = json.loads(invoke(data_dir, "results", str(job["job_id"]), "--format", "json").stdout)
    return result.exit_code, job, rows


def _rewrite(ctx: Context, model: Model, change, metadata: dict | None = None, *, register: bool) -> None:
    """Rewrite the model file's tensors (and metadata); `register` records its new hash in SQL, as
    if it had been registered like that."""
    from safetensors import safe_open

    path = ctx.data_dir.resolve(model.artifact_path)
    with safe_open(str(path), framework="pt") as handle:
        stored = dict(handle.metadata())
    tensors = {key: change(value) for key, value in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata=metadata if metadata is not None else stored)
    if register:
        with ctx.store.session() as session:
            session.get_one(Model, model.id).artifact_sha256 = file_sha256(path)


def test_the_file_hash_is_recorded_at_registration(trained) -> None:
    _, ctx, model = trained
    assert model.artifact_sha256 == file_sha256(ctx.data_dir.resolve(model.artifact_path))


def test_an_edited_model_file_fails_the_job_at_once(trained, textures) -> None:
    data_dir, ctx, model = trained
    _rewrite(ctx, model, lambda t: t * 1.0001 if t.is_floating_point() else t, register=False)
    code, job, rows = _score(data_dir, textures[1])
    assert code == 1 and job["status"] == "failed" and "changed since m:1 was registered" in job["error"]
    assert rows == []


def test_a_model_with_nan_weights_passes_nothing_as_normal(trained, textures) -> None:
    data_dir, ctx, model = trained
    _rewrite(ctx, model, lambda t: torch.full_like(t, math.nan) if t.is_floating_point() else t, register=True)
    code, job, rows = _score(data_dir, textures[1])
    images = [r for r in rows if "not an image" not in (r["error"] or "") and "corrupt" not in (r["error"] or "")]
    assert code == 0 and job["status"] == "done" and images
    assert all(r["score"] is None and r["is_anomaly"] is None for r in rows)
    assert all("non-finite score" in r["error"] for r in images)
    assert job["n_failed"] == len(rows) and job["n_done"] == 0


def test_malformed_model_metadata_is_one_clear_line(trained, textures) -> None:
    data_dir, ctx, model = trained
    _rewrite(ctx, model, lambda t: t, metadata={"format": "1"}, register=True)
    code, job, _ = _score(data_dir, textures[1])
    assert code == 1 and job["status"] == "failed"
    assert "malformed metadata" in job["error"] and "\n" not in job["error"]


@pytest.mark.parametrize(("threshold", "flagged"), [(-1e30, "all"), (1e30, "none")])
def test_the_threshold_in_sql_is_the_one_that_flags(trained, textures, threshold: float, flagged: str) -> None:
    data_dir, ctx, model = trained
    with ctx.store.session() as session:
        session.get_one(Model, model.id).threshold = threshold  # the file still says otherwise
    _, job, rows = _score(data_dir, textures[1])
    scored = [r for r in rows if r["score"] is not None]
    assert job["status"] == "done" and scored
    assert all(r["is_anomaly"] is (flagged == "all") for r in scored)


def test_an_unreadable_mask_leaves_one_image_out_of_the_pixel_metrics(trained, textures) -> None:
    data_dir, _, _ = trained
    root = textures[0]
    masks = sorted((root / "ground_truth").rglob("*.png"))
    broken = masks[0]
    original = broken.read_bytes()
    broken.write_bytes(b"not a png")
    try:
        out = json.loads(invoke(data_dir, "evaluate", "--model", "m", "--data", str(root), "--format", "json").stdout)
    finally:
        broken.write_bytes(original)
    assert out["status"] == "done" and out["n_unreadable_masks"] == 1
    assert out["pixel_auroc"] > 0.5 and out["n_pixel_images"] == out["n_images"] - 1


def test_a_truncated_file_without_a_recorded_hash_is_one_clear_line(trained, textures) -> None:
    data_dir, ctx, model = trained
    path = ctx.data_dir.resolve(model.artifact_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with ctx.store.session() as session:  # as a model registered before hashes were recorded
        session.get_one(Model, model.id).artifact_sha256 = None
    code, job, _ = _score(data_dir, textures[1])
    assert code == 1 and "is unreadable (truncated or corrupt?)" in job["error"] and "\n" not in job["error"]
