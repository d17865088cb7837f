"""The CLI on the embedded default (no broker): the whole job flow in this process, plus errors."""

import json
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from adqueue.cli import cli
from benchmarks.harness.cli import FAST_MVG, cli_env, run_cli
from tests.helpers.cli import invoke_cli


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedded")


def invoke(data_dir: Path, *args: str, ok: bool = True) -> Result:
    return invoke_cli(data_dir, *args, ok=ok)


@pytest.fixture(scope="module")
def trained(data_dir: Path, textures) -> dict:
    root, _ = textures
    out = invoke(data_dir, "train", "--data", str(root), "--name", "bricks", *FAST_MVG, "--format", "json")
    return json.loads(out.stdout)


def test_train_registers_a_version(data_dir: Path, trained: dict, textures) -> None:
    assert trained["status"] == "done" and trained["model"] == "bricks:1" and trained["job_id"] >= 1
    models = json.loads(invoke(data_dir, "models", "--format", "json").stdout)
    assert [m["model"] for m in models] == ["bricks:1"] and models[0]["threshold"] > 0
    again = json.loads(invoke(data_dir, "train", "--data", str(textures[0]), "--name", "bricks", *FAST_MVG,
                              "--format", "json").stdout)
    assert again["model"] == "bricks:2"


def test_scripts_get_timestamps_to_the_microsecond_and_people_to_the_second(data_dir: Path, trained: dict) -> None:
    # A job's duration from its JSON timestamps (how benchmarks/decode.py takes images/s) was
    # whole seconds apart: a 5 s run could read 4 or 6.
    job = json.loads(invoke(data_dir, "jobs", str(trained["job_id"]), "--format", "json").stdout)
    stamps = [datetime.fromisoformat(job[key]) for key in ("created_at", "started_at", "finished_at")]
    assert any(stamp.microsecond for stamp in stamps), stamps
    table = invoke(data_dir, "jobs", str(trained["job_id"])).stdout
    assert stamps[1].isoformat(timespec="seconds") in table and not re.search(r":\d\d\.\d{6}", table)


def test_score_a_dump_with_broken_files(data_dir: Path, trained: dict, textures) -> None:
    _, dump = textures
    out = invoke(data_dir, "score", "--model", "bricks:1", str(dump), "--shard-size", "5", "--heatmaps", "all")
    job_id = int(out.stdout.splitlines()[0])
    rows = json.loads(invoke(data_dir, "results", str(job_id), "--format", "json").stdout)
    files = sorted(p.name for p in dump.iterdir())
    assert sorted(Path(r["path"]).name for r in rows) == files  # one row per file, none lost
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"line3_corrupt.png", "operator_notes.txt"}
    assert "corrupt PNG" in errors["line3_corrupt.png"] and "not an image" in errors["operator_notes.txt"]
    scored = [r for r in rows if not r["error"]]
    assert all(Path(r["heatmap_path"]).is_file() for r in scored)
    assert [r["score"] for r in scored] == sorted((r["score"] for r in scored), reverse=True)
    # painted defects are the odd indices of the dump; they should dominate the top of the ranking
    top = [int(Path(r["path"]).stem.split("_")[1]) % 2 for r in scored[:4]]
    assert sum(top) >= 3
    job = json.loads(invoke(data_dir, "jobs", str(job_id), "--format", "json").stdout)
    assert job["status"] == "done" and job["n_total"] == len(files) and job["n_failed"] == 2
    assert job["shards"] == 4 and job["shards_done"] == 4


def test_evaluate_prints_and_stores_metrics(data_dir: Path, trained: dict, textures) -> None:
    root, _ = textures
    out = json.loads(invoke(data_dir, "evaluate", "--model", "bricks:1", "--data", str(root),
                            "--format", "json").stdout)
    assert out["status"] == "done"
    assert out["image_auroc"] > 0.9 and out["pixel_auroc"] > 0.85 and 0 < out["pro"] <= 1
    assert {"image_auroc[scratch]", "image_auroc[stain]", "image_auroc[gravel]", "false_alarm_rate",
            "recall"} <= set(out)
    stored = json.loads(invoke(data_dir, "sql", "SELECT name, value FROM metrics WHERE job_id = "
                               f"{out['job_id']} AND name = 'image_auroc'", "--format", "json").stdout)
    assert stored == [{"name": "image_auroc", "value": pytest.approx(out["image_auroc"])}]


def test_masks_beside_images_are_left_out_of_training_and_counted_when_scored(data_dir: Path, trained: dict,
                                                                              textures, tmp_path: Path) -> None:
    folder = tmp_path / "with_masks"
    folder.mkdir()
    masks = sorted((textures[0] / "ground_truth").rglob("*_mask.png"))
    for index, image in enumerate(sorted((textures[0] / "train" / "good").glob("*.png"))):
        shutil.copy(image, folder / image.name)
        shutil.copy(masks[index % len(masks)], folder / f"{image.stem}_mask.png")
    out = invoke(data_dir, "train", "--data", str(folder), "--name", "masked", *FAST_MVG)
    assert "24 masks beside their images left out of training" in " ".join(out.stderr.split())
    job = json.loads(invoke(data_dir, "jobs", out.stdout.splitlines()[0], "--format", "json").stdout)
    assert job["status"] == "done" and job["n_total"] == 24  # the 24 images, none of their masks

    # a dump's every file gets its row (a name is only a guess): scored, and counted in a note
    result = invoke(data_dir, "score", "--model", "bricks:1", str(folder), "--heatmaps", "none", "--format", "json")
    scored = json.loads(result.stdout)
    assert scored["n_total"] == 48 and scored["n_masks_beside_images"] == 24
    assert "24 files look like masks beside images (" in " ".join(result.stderr.split())


@pytest.mark.parametrize("statement", [
    "DELETE FROM results",
    "INSERT INTO metrics (model_id, name, value, created_at) VALUES (1, 'x', 1, '2020-01-01')",
    "DROP TABLE jobs",
    "SELECT 1; DELETE FROM results",
    "PRAGMA query_only = OFF",
    "WITH x AS (SELECT 1) DELETE FROM results",
])
def test_sql_is_read_only(data_dir: Path, trained: dict, statement: str) -> None:
    before = invoke(data_dir, "sql", "SELECT count(*) AS n FROM models", "--format", "json").stdout
    result = invoke(data_dir, "sql", statement, ok=False)
    assert result.exit_code != 0 and "read-only" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert invoke(data_dir, "sql", "SELECT count(*) AS n FROM models", "--format", "json").stdout == before


@pytest.mark.parametrize(("args", "message"), [
    (["score", "--model", "nope", "."], "no model nope"),
    (["score", "--model", "bricks:9", "."], "no model bricks:9"),
    (["score", "--model", "bricks", "/does/not/exist"], "no such file"),
    (["train", "--data", ".", "--name", "x", "--set", "levels=99"], "levels 0-8"),
    (["train", "--data", ".", "--name", "x", "--set", "bogus=1"], "unknown setting"),
    (["train", "--data", ".", "--name", "bad name!"], "invalid model name"),
    (["jobs", "999"], "no job 999"),
    (["cancel", "999"], "no job 999"),
    (["resume", "1"], "job 1 is done: nothing to resume"),
    (["cancel", "1"], "job 1 is done already: nothing to cancel"),
    (["--db", "mysql://x/y", "jobs"], "unsupported database URL"),
    (["results", "1"], "job 1 is a train job: it has no per-image results; its outcome is in `adqueue jobs 1` "
                       "(status, counts, synthetic AUROC) and `adqueue models`"),
    (["train", "--data", ".", "--name", "x", "--set", "nosuchkey=1"],
     "unknown setting(s) nosuchkey; mvg settings: backbone, batch_size, image_size, levels, local_samples, "
     "map_levels, map_sigma, map_variance, variance; training settings (any detector): fpr, calib_fraction, seed, "
     "max_images, min_images"),
])
def test_bad_arguments_are_one_clear_line(data_dir: Path, trained: dict, args: list[str], message: str) -> None:
    result = invoke(data_dir, *args, ok=False)
    assert result.exit_code != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_evaluate_on_a_plain_folder_says_it_has_no_labels(data_dir: Path, trained: dict, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    result = invoke(data_dir, "evaluate", "--model", "bricks", "--data", str(tmp_path), ok=False)
    assert result.exit_code == 1 and "--split" not in result.stderr  # nobody gave one
    assert result.stderr == (f"Error: {tmp_path} is a plain folder without labels: evaluate needs an MVTec-style "
                             "root (train/good, test/<defect>, ground_truth/<defect>) or a manifest CSV\n")


def test_every_verb_has_help() -> None:
    for verb in ["train", "score", "evaluate", "jobs", "results", "models", "sql", "worker", "db", "demo",
                 "detectors", "cancel", "resume", "reconcile"]:
        result = CliRunner().invoke(cli, [verb, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output and len(result.output) > 200


def test_detectors_lists_settings_with_defaults(data_dir: Path) -> None:
    rows = json.loads(invoke(data_dir, "detectors", "--format", "json").stdout)
    mvg = {r["setting"]: r["default"] for r in rows if r["detector"] == "mvg"}
    assert mvg["backbone"] == "efficientnet_lite2" and mvg["levels"] == "3,4,5,6,7 (per backbone)"
    differnet = {r["setting"]: r["default"] for r in rows if r["detector"] == "differnet"}
    assert differnet["levels"] == "per backbone" and differnet["rotation"] is True
    assert {r["setting"] for r in rows if r["detector"] == "(training)"} == {
        "fpr", "calib_fraction", "seed", "max_images", "min_images"}
    assert "seed" not in mvg  # one seed for everything, set as a training key
    assert invoke(data_dir, "detectors", "nope", ok=False).exit_code != 0


def test_reconcile_on_a_healthy_database_changes_nothing(data_dir: Path, trained: dict) -> None:
    before = invoke(data_dir, "jobs", "--format", "json").stdout
    report = json.loads(invoke(data_dir, "reconcile", "--format", "json").stdout)
    assert set(report) >= {"shards_requeued", "messages_resent", "embedded_stopped"} and not any(report.values())
    assert invoke(data_dir, "jobs", "--format", "json").stdout == before


def test_a_signal_whose_exception_was_swallowed_still_stops_the_run() -> None:
    """SIGTERM raises Interrupted wherever the process is; raised inside a database driver's call it
    can come out as the driver's own error and be handled as a failed shard. The shard loop's check
    must still raise it (a chaos run on PostgreSQL once finished the whole job after its SIGTERM)."""
    import os
    import signal

    from adqueue.core.errors import Interrupted
    from adqueue.jobs.interrupts import raise_if_signalled, signals_interrupt

    with signals_interrupt():
        raise_if_signalled()  # nothing received yet
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except BaseException as exc:  # noqa: BLE001 - what the interrupted driver code did
            swallowed = exc
        assert isinstance(swallowed, Interrupted)
        with pytest.raises(Interrupted) as raised:
            raise_if_signalled()
        assert raised.value.signum == signal.SIGTERM
    raise_if_signalled()  # outside, a past signal no longer counts


def test_the_demo_says_what_training_concluded(tmp_path: Path) -> None:
    """`make demo` in a fresh process: training's outcome (the model, its self-check, its warning)
    is printed once, after training, with no raw log line; the heat-map line says what it prints."""
    data = tmp_path / "data"
    done = run_cli(["demo", "--normal", "20", "--dump", "4"], cli_env(ADQUEUE_DATA_DIR=str(data),
                                                                    ADQUEUE_BROKER_URL=""))
    stderr = " ".join(done.stderr.split())
    assert "trained model demo-bricks:1 (job 1)" in stderr
    assert stderr.count("calibrated on only 4 held-out images") == 1
    assert "warning: the threshold is calibrated on only 4 held-out images" in stderr
    assert re.search(r"synthetic_auroc\s+│ [01]\.\d+", done.stdout), done.stdout
    assert not re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|WARNING", done.stderr, re.MULTILINE), done.stderr
    heatmaps = data / "heatmaps" / "job2"
    assert f"heat maps: {heatmaps} (heatmap_path above is relative to the data dir, {data})" in stderr
    assert any(heatmaps.glob("*.jpg"))


MISSING = ("no adqueue data dir at {}: run from the folder that holds it, or pass --data-dir DIR (ADQUEUE_DATA_DIR) "
           "or --db URL (ADQUEUE_DATABASE_URL); only the verbs that write (train, score, evaluate, demo, db upgrade, "
           "worker) create one")


@pytest.mark.parametrize("args", [["jobs"], ["jobs", "1"], ["results", "1"], ["models"], ["sql", "SELECT 1"],
                                  ["reconcile"], ["cancel", "1"], ["resume", "1"]])
def test_verbs_that_read_refuse_a_data_dir_that_does_not_exist(tmp_path: Path, args: list[str]) -> None:
    missing = tmp_path / "adqueue-data"
    result = invoke_cli(missing, *args, ok=False)
    assert result.exit_code == 1 and result.stderr == f"Error: {MISSING.format(missing)}\n"
    assert not missing.exists()


def test_run_from_another_folder_a_verb_says_where_it_looked(tmp_path: Path) -> None:
    """`cd /tmp && adqueue jobs` (a cron line run from /) listed an empty table from a new ./adqueue-data."""
    env = cli_env()
    for args in (["jobs"], ["serve", "--port", "1"]):
        done = subprocess.run([sys.executable, "-m", "adqueue", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 1 and " ".join(done.stderr.split()) == f"Error: {MISSING.format(tmp_path / 'adqueue-data')}"
    assert list(tmp_path.iterdir()) == []
    # what writes creates it; a database named elsewhere needs no data dir to be read
    invoke_cli(tmp_path / "new", "db", "upgrade")
    assert (tmp_path / "new" / "adqueue.db").is_file()
    elsewhere = f"sqlite:///{tmp_path / 'new' / 'adqueue.db'}"
    listed = invoke_cli(tmp_path / "absent", "--db", elsewhere, "jobs", "--format", "json")
    assert json.loads(listed.stdout) == [] and not (tmp_path / "absent").exists()
