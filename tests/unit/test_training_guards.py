"""Training guards: no silently useless model. Bad settings are refused before a job exists, too few
images or a broken threshold fail the job with one line, a shaky threshold registers with warnings."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result

from adqueue.core.errors import AdqueueError
from adqueue.detectors.components.thresholds import calibrate_threshold, gaussian_bound
from adqueue.jobs.train_settings import split_train_settings
from adqueue.pipeline.calibrate import (
    MIN_CALIB_IMAGES,
    Calibration,
    calibration_warnings,
    check_scores_finite,
    check_threshold,
)
from benchmarks.harness.cli import FAST_MVG, cli_env, run_cli
from tests.helpers.cli import invoke_cli

# encoder_flow at its smallest: trains in about a second, and its threshold rule extrapolates.
TINY_FLOW = ["--detector", "encoder_flow", "--set", "image_size=32", "--set", "ae_epochs=1", "--set", "flow_epochs=1",
             "--set", "flow_blocks=2", "--set", "flow_hidden=32"]
FEW_CALIB = ("the threshold is calibrated on only 5 held-out images: its false-alarm rate is a rough guess; "
             "add defect-free images or raise calib_fraction")
IN_SAMPLE = "calib_fraction=0: the threshold is calibrated on the training images themselves"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("guards")


def invoke(data_dir: Path, *args: str, ok: bool = True) -> Result:
    return invoke_cli(data_dir, *args, ok=ok)


def train(data_dir: Path, data: Path, name: str, *args: str, ok: bool = True) -> Result:
    return invoke(data_dir, "train", "--data", str(data), "--name", name, *args, ok=ok)


def flat(text: str) -> str:
    """The terminal console wraps long lines: compare messages with whitespace collapsed."""
    return " ".join(text.split())


def job_error(data_dir: Path, result: Result) -> str:
    job_id = result.stdout.splitlines()[0]
    return json.loads(invoke(data_dir, "jobs", job_id, "--format", "json").stdout)["error"]


def models(data_dir: Path) -> dict[str, dict]:
    return {m["model"]: m for m in json.loads(invoke(data_dir, "models", "--format", "json").stdout)}


def stored_params(data_dir: Path, name: str) -> dict:
    rows = json.loads(invoke(data_dir, "sql", f"SELECT params FROM models WHERE name = '{name}'",
                             "--format", "json").stdout)
    (row,) = rows
    return row["params"] if isinstance(row["params"], dict) else json.loads(row["params"])


@pytest.mark.parametrize(("setting", "message"), [
    ("max_images=-5", "max_images must be 0 (all) or a positive count, not -5"),
    ("min_images=-1", "min_images must be 0 (the detector's own minimum) or a positive count, not -1"),
    ("calib_fraction=1", "calib_fraction must be in [0, 1), not 1.0"),
    ("fpr=-0.1", "fpr must be in [0, 1), not -0.1"),
    ("seed=-3", "seed must be 0 or a positive integer, not -3"),
    ("max_images=ten", "training setting max_images must be an integer, not 'ten'"),
    ("fpr=nan", "fpr must be in [0, 1), not nan"),
    ("map_sigma=nan", "map_sigma must be in [0, 128] (input pixels, at most image_size), not nan"),
    ("map_sigma=inf", "map_sigma must be in [0, 128] (input pixels, at most image_size), not inf"),
    ("map_sigma=-1", "map_sigma must be in [0, 128] (input pixels, at most image_size), not -1.0"),
])
def test_bad_training_settings_are_refused_before_a_job_exists(data_dir: Path, textures, setting: str,
                                                               message: str) -> None:
    before = invoke(data_dir, "jobs", "--format", "json").stdout
    result = train(data_dir, textures[0], "refused", *FAST_MVG, "--set", setting, ok=False)
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"Error: {message}"  # one line, and only that
    assert invoke(data_dir, "jobs", "--format", "json").stdout == before  # nothing was queued
    count = invoke(data_dir, "sql", "SELECT count(*) AS n FROM jobs WHERE params LIKE '%refused%'", "--format", "json")
    assert json.loads(count.stdout) == [{"n": 0}]


def test_min_images_setting_defaults_to_the_detectors_own() -> None:
    train_settings, detector_settings = split_train_settings({"min_images": "8", "levels": "3"})
    assert train_settings["min_images"] == 8 and detector_settings == {"levels": "3"}
    assert split_train_settings({})[0]["min_images"] == 0


def test_too_few_fit_images_fail_with_a_hint_and_min_images_overrides(data_dir: Path, textures) -> None:
    # 10 images: 2 held out to calibrate, 8 to fit, half of what mvg needs
    failed = train(data_dir, textures[0], "few", *FAST_MVG, "--set", "max_images=10", ok=False)
    hint = ("mvg needs at least 16 defect-free images to fit, got 8; 2 more files are held out to calibrate the "
            "threshold; --set min_images=8 to train anyway")
    assert failed.exit_code == 1 and hint in flat(failed.stderr)
    assert job_error(data_dir, failed) == hint
    assert not any(model.startswith("few:") for model in models(data_dir))

    forced = train(data_dir, textures[0], "few", *FAST_MVG, "--set", "max_images=10", "--set", "min_images=8")
    assert "trained model few:1" in flat(forced.stderr)
    params = stored_params(data_dir, "few")
    assert params["train"]["min_images"] == 8 and params["fit"]["n_images"] == 8


def test_unreadable_images_do_not_count_toward_the_minimum(data_dir: Path, textures, tmp_path: Path) -> None:
    folder = tmp_path / "good"
    folder.mkdir()
    for path in sorted((textures[0] / "train" / "good").glob("*.png"))[:20]:
        shutil.copy(path, folder / path.name)
    for path in sorted(folder.iterdir())[:5]:
        path.write_bytes(b"not a png")
    # 20 files, all fitted (no hold-out): enough on paper, but only 15 can be read
    failed = train(data_dir, folder, "broken", *FAST_MVG, "--set", "calib_fraction=0", ok=False)
    assert failed.exit_code == 1
    assert job_error(data_dir, failed) == ("mvg needs at least 16 defect-free images to fit: 15 of the 20 files are "
                                           "readable images (5 are not images or unreadable); --set min_images=15 "
                                           "to train anyway")


def test_the_minimum_counts_readable_images_not_files(data_dir: Path, textures, tmp_path: Path) -> None:
    """2 images among 7 files: the message says 2 images, and its hint (min_images=2) trains."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted((textures[0] / "train" / "good").glob("*.png"))[:2]:
        shutil.copy(path, folder / path.name)
    for index in range(5):
        (folder / f"notes{index}.txt").write_text("shift log\n")
    failed = train(data_dir, folder, "mixed", *FAST_MVG, "--set", "calib_fraction=0", ok=False)
    message = ("mvg needs at least 16 defect-free images to fit: 2 of the 7 files are readable images (5 are not "
               "images or unreadable); --set min_images=2 to train anyway")
    assert failed.exit_code == 1 and f"failed: {message}" in flat(failed.stderr)
    assert job_error(data_dir, failed) == message  # plain words: no exception class in front
    hinted = train(data_dir, folder, "mixed", *FAST_MVG, "--set", "calib_fraction=0", "--set", "min_images=2")
    assert "trained model mixed:1" in flat(hinted.stderr)


def stored_threshold(data_dir: Path, name: str) -> float:
    rows = json.loads(invoke(data_dir, "models", "--format", "json").stdout)
    return next(float(r["threshold"]) for r in rows if r["model"].startswith(f"{name}:"))


def test_few_calibration_images_warn_on_the_terminal_and_in_the_model(data_dir: Path, textures) -> None:
    # 24 defect-free images with calib_fraction 0.2: 5 held out
    result = train(data_dir, textures[0], "bricks", *FAST_MVG)
    assert f"warning: {FEW_CALIB}" in flat(result.stderr)
    params = stored_params(data_dir, "bricks")
    assert {k: params["calibration"][k] for k in ("n_images", "in_sample")} == {"n_images": 5, "in_sample": False}
    scores = params["calibration"]["scores"]  # kept for comparing later nights with
    assert len(scores) == 5 and max(scores) == pytest.approx(stored_threshold(data_dir, "bricks"), rel=1e-5)
    assert params["warnings"] == [FEW_CALIB]
    assert models(data_dir)["bricks:1"]["warnings"] == [FEW_CALIB]
    table = invoke(data_dir, "models").stdout
    assert "warnings" in table and "rough guess" in flat(table)


def test_a_terminal_shows_each_warning_once_after_the_bars_and_no_raw_log_line(textures, tmp_path: Path) -> None:
    """In a fresh process, as a user runs it: training's warning was logged across the progress bars
    (timestamped) and then printed again; it is printed once, after training, and the one log line
    training writes here (a file it skips) comes through the console as "warning: ..."."""
    folder = tmp_path / "good"
    shutil.copytree(textures[0] / "train" / "good", folder)
    (folder / "notes.txt").write_text("not an image\n")
    env = cli_env(ADQUEUE_DATA_DIR=str(tmp_path / "data"), ADQUEUE_BROKER_URL="")
    done = run_cli(["train", "--data", str(folder), "--name", "once", *FAST_MVG], env)
    stderr = flat(done.stderr)
    assert stderr.count("calibrated on only") == 1
    assert stderr.index("trained model once:1") < stderr.index("warning: the threshold is calibrated on only")
    assert f"warning: skipping unreadable training image {folder / 'notes.txt'}: not an image" in stderr
    assert not re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|WARNING", done.stderr, re.MULTILINE), done.stderr


def test_calibrating_on_the_training_images_warns(data_dir: Path, textures) -> None:
    result = train(data_dir, textures[0], "insample", *FAST_MVG, "--set", "calib_fraction=0")
    assert f"warning: {IN_SAMPLE}" in flat(result.stderr)
    (warning,) = stored_params(data_dir, "insample")["warnings"]
    assert warning.startswith(IN_SAMPLE) and "more false alarms than the target fpr" in warning
    calibration = stored_params(data_dir, "insample")["calibration"]
    assert (calibration["n_images"], calibration["in_sample"], len(calibration["scores"])) == (24, True, 24)


def test_enough_held_out_images_give_no_warning() -> None:
    assert calibration_warnings(Calibration(1.0, (0.0, 1.0), MIN_CALIB_IMAGES, False), 0.2) == []
    (warning,) = calibration_warnings(Calibration(1.0, (0.0, 1.0), MIN_CALIB_IMAGES - 1, False), 0.2)
    assert f"only {MIN_CALIB_IMAGES - 1} held-out images" in warning


def test_non_finite_calibration_scores_register_nothing(data_dir: Path, textures) -> None:
    # a flow learning rate this large diverges: the flow's weights, and so its scores, turn NaN
    failed = train(data_dir, textures[0], "diverged", *TINY_FLOW, "--set", "flow_lr=1e6", ok=False)
    assert failed.exit_code == 1
    error = job_error(data_dir, failed)
    assert error.startswith("the model's scores on the 5 calibration images are not finite (")
    assert error.endswith(" of 5): nothing was registered")
    assert not any(model.startswith("diverged:") for model in models(data_dir))
    with pytest.raises(AdqueueError, match=r"not finite \(2 of 4\)"):
        check_scores_finite(np.array([1.0, np.nan, 2.0, np.inf]))


def test_a_threshold_far_beyond_the_calibration_scores_registers_nothing(data_dir: Path, textures) -> None:
    # the Gaussian bound for a one-in-10^15 false alarm rate lies far past 5 held-out scores
    failed = train(data_dir, textures[0], "farout", *TINY_FLOW, "--set", "fpr=1e-15", ok=False)
    assert failed.exit_code == 1
    error = job_error(data_dir, failed)
    assert "the range that the 5 calibration scores support: nothing was registered; raise fpr" in error
    assert not any(model.startswith("farout:") for model in models(data_dir))


def test_threshold_bounds_per_rule() -> None:
    scores = np.random.default_rng(0).normal(10.0, 1.0, 40)
    check_threshold(calibrate_threshold(scores, 0.01), scores, extrapolates=False)
    check_threshold(gaussian_bound(scores, 0.01), scores, extrapolates=True)  # past the max, within reach
    beyond = float(scores.max()) + 0.5 * float(np.ptp(scores))
    with pytest.raises(AdqueueError, match="outside"):
        check_threshold(beyond, scores, extrapolates=False)  # a quantile never leaves the scores
    check_threshold(beyond, scores, extrapolates=True)
    with pytest.raises(AdqueueError, match="outside"):
        check_threshold(float(scores.max()) + 1.5 * float(np.ptp(scores)), scores, extrapolates=True)
    with pytest.raises(AdqueueError, match="threshold nan"):
        check_threshold(float("nan"), scores, extrapolates=True)
