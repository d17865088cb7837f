"""Training's self-check on synthetic defects: stored as metrics of the model, shown by `train` and
`models`, and a training warning when the model cannot tell painted defects from clean images."""

import json
from pathlib import Path

import pytest

from adqueue.data.synthetic_defects import KINDS
from adqueue.pipeline.self_check import LOW_AUROC, MIN_DEFECTED, SelfCheck
from benchmarks.harness.cli import FAST_MVG
from tests.helpers.cli import invoke_cli
from tests.helpers.datasets import datasets_or_skip

NAMES = {"synthetic_auroc", *(f"synthetic_auroc.{kind}" for kind in KINDS)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("self_check")


@pytest.fixture(scope="module")
def trained(data_dir: Path, textures) -> dict:
    out = invoke_cli(data_dir, "train", "--data", str(textures[0]), "--name", "bricks", *FAST_MVG, "--format", "json")
    return json.loads(out.stdout)


def sql(data_dir: Path, statement: str) -> list[dict]:
    return json.loads(invoke_cli(data_dir, "sql", statement, "--format", "json").stdout)


def test_train_stores_the_self_check_as_metrics_of_the_model(data_dir: Path, trained: dict) -> None:
    assert trained["status"] == "done" and set(trained) >= NAMES
    assert all(0.0 <= trained[name] <= 1.0 for name in NAMES)
    (model,) = sql(data_dir, "SELECT id, params FROM models")
    rows = sql(data_dir, "SELECT model_id, job_id, name, value, dataset FROM metrics")
    assert {row["name"]: row["value"] for row in rows} == {name: pytest.approx(trained[name]) for name in NAMES}
    assert {(row["model_id"], row["job_id"], row["dataset"]) for row in rows} == {
        (model["id"], trained["job_id"], "synthetic")}
    params = model["params"] if isinstance(model["params"], dict) else json.loads(model["params"])
    check = params["self_check"]
    # 24 images, 5 held out: their 5 calibration scores are the clean side, 16 painted copies the other
    assert (check["n_clean"], check["n_defected"]) == (5, MIN_DEFECTED) == (len(params["calibration"]["scores"]), 16)
    assert check["auroc"] == pytest.approx(trained["synthetic_auroc"])
    # these textures' defects are found (evaluate's AUROC is above 0.9): painted ones must be too
    assert trained["synthetic_auroc"] >= LOW_AUROC and not any("self-check" in w for w in params["warnings"])


def test_models_and_jobs_show_it(data_dir: Path, trained: dict) -> None:
    (row,) = json.loads(invoke_cli(data_dir, "models", "--format", "json").stdout)
    assert row["synthetic_auroc"] == pytest.approx(trained["synthetic_auroc"]) and row["image_auroc"] is None
    table = invoke_cli(data_dir, "models").stdout
    assert "synthetic_auroc" in table and f" {row['synthetic_auroc']} " in table  # the table rounds as JSON does
    job = json.loads(invoke_cli(data_dir, "jobs", str(trained["job_id"]), "--format", "json").stdout)
    assert {name: job[name] for name in NAMES} == {name: trained[name] for name in NAMES}


def test_train_prints_it(data_dir: Path, textures) -> None:
    out = invoke_cli(data_dir, "train", "--data", str(textures[0]), "--name", "printed", *FAST_MVG, "--set",
                     "calib_fraction=0.3")
    assert "metrics" in out.stdout and all(name in out.stdout for name in NAMES)


def check(auroc: float | None) -> SelfCheck:
    return SelfCheck(auroc, {kind: auroc for kind in KINDS}, n_clean=30, n_defected=30, seconds=1.0, seed=0)


def test_a_low_auroc_warns_and_names_the_kinds() -> None:
    (warning,) = check(LOW_AUROC - 0.01).warnings()
    assert warning.startswith(f"self-check: AUROC {LOW_AUROC - 0.01:.2f} (below {LOW_AUROC})")
    assert "the 30 calibration images" in warning and all(f"{kind} {LOW_AUROC - 0.01:.2f}" in warning for kind in KINDS)
    assert check(LOW_AUROC).warnings() == [] and check(None).warnings() == []


def test_a_model_fitted_on_8_images_gets_the_warning(data_dir: Path) -> None:
    # mvg on 8 battery-weld images ranks real defects below normal images (evaluate: AUROC 0.23)
    welds = datasets_or_skip("battery_weld")
    out = invoke_cli(data_dir, "train", "--data", str(welds), "--name", "welds8", "--set", "max_images=10",
                     "--set", "min_images=8")
    (model,) = [m for m in json.loads(invoke_cli(data_dir, "models", "--format", "json").stdout)
                if m["model"] == "welds8:1"]
    assert model["synthetic_auroc"] < LOW_AUROC
    (warning,) = [w for w in model["warnings"] if w.startswith("self-check: ")]
    assert f"AUROC {model['synthetic_auroc']:.2f} (below {LOW_AUROC})" in warning
    assert f"warning: {warning}" in " ".join(out.stderr.split())  # printed when training ends
