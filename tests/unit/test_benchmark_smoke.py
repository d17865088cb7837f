"""Smoke run of the detection benchmark: the real script, the real CLI, a small dataset."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.harness.cli import cli_env
from benchmarks.harness.servers import REPO


def test_detection_benchmark_prints_a_table(textures, tmp_path: Path) -> None:
    root, _ = textures
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/detectors.py", "--datasets", "", "--source", f"bricks={root}",
         "--detectors", "mvg", "--set", "mvg:backbone=efficientnet_lite0", "--set", "mvg:image_size=128",
         "--json", str(out)],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "### bricks" in done.stdout and "| `mvg` |" in done.stdout
    (row,) = json.loads(out.read_text())
    assert row["dataset"] == "bricks" and row["detector"] == "mvg"
    assert row["n_test"] > 0 and row["train_s"] > 0 and row["score_ms_per_image"] > 0
    assert row["image_auroc"] > 0.8 and row["pixel_auroc"] is not None and row["pro"] is not None


def test_gpu_benchmark_runs_every_detector_on_the_cpu() -> None:
    tiny = ["mvg:backbone=efficientnet_lite0", "mvg:image_size=64", "patchcore:backbone=efficientnet_lite0",
            "patchcore:image_size=64", "differnet:image_size=64", "differnet:n_scales=1", "differnet:epochs=1",
            "ebm:iterations=2",
            "ebm:sgld_steps=2", "encoder_flow:ae_epochs=1", "encoder_flow:flow_epochs=1"]
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--images", "8", "--train-images", "20",
         "--repeats", "1", *[arg for pair in tiny for arg in ("--set", pair)]],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("mvg", "differnet", "ebm", "encoder_flow", "patchcore"):
        row = next(line for line in done.stdout.splitlines() if line.startswith(f"| `{name}` |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[1].split()[0]) > 0 and cells[3].endswith("x") and cells[5].endswith("x"), row


def test_scoring_overhead_benchmark_prints_its_ratios_and_breakdown() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/scoring_overhead.py", "--backbone", "resnet18", "--random-weights", "--size", "64",
         "--levels", "1,2", "--images", "16", "--repeats", "2", "--threads", "1", "--breakdown"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    ratio = next(line for line in lines if line.startswith("pipeline / bare"))
    assert 0.0 < float(ratio.split(":")[1].strip().rstrip("x")) < 2.0, ratio
    assert next(line for line in lines if line.startswith("paired ratios")).count("x") == 1
    (breakdown, _) = [line for line in lines if line.startswith("  pipeline ")]  # one per pipeline run
    numbers = [float(word.rstrip(",s;")) for word in breakdown.split() if word.rstrip(",s;").replace(".", "").isdigit()]
    wall, forward, _rest, cpu, decode, paint = numbers
    assert 0 < forward < wall and 0 < decode < cpu and paint > 0, breakdown


def test_decode_benchmark_prints_each_run_and_the_paired_ratios() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/decode.py", "--images", "24", "--megapixels", "1", "--repeats", "1"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    now_before = next(line for line in lines if line.startswith("now / before"))
    assert 0.0 < float(now_before.split(":")[1]) < 1.0, now_before  # the reduced-scale decode is cheaper
    camera = next(line for line in lines if line.startswith("| 1155x866 JPEGs"))
    small = next(line for line in lines if line.startswith("| the same at 300x225"))
    assert len(camera.split("|")[3].split()) == 1 and len(small.split("|")[3].split()) == 2, (camera, small)
    paired = next(line for line in lines if line.startswith("paired:"))
    assert 0.0 < float(paired.split()[1]) < 3.0, paired
