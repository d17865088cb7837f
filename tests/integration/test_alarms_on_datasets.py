"""The anomaly-rate alarm on real images: a model of magnetic tiles scoring battery welds raises it,
the same model scoring its own kind of defect-free tiles does not (and a webhook hears both)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.helpers.cli import invoke_cli
from tests.helpers.datasets import datasets_or_skip
from tests.helpers.receiver import webhook_receiver


@pytest.mark.timeout(3600)
def test_a_tile_model_on_welds_raises_the_anomaly_rate_alarm_and_on_tiles_none(tmp_path: Path) -> None:
    mtd, welds = datasets_or_skip("mtd"), datasets_or_skip("battery_weld")
    good_tiles = tmp_path / "mtd_good_test.csv"
    with (mtd / "manifest.csv").open(newline="") as source, good_tiles.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "split", "label", "defect", "mask"])
        for row in csv.DictReader(source):
            if row["split"] == "test" and row["label"] == "0":
                writer.writerow([str(mtd / row["path"]), "test", 0, "good", ""])
    data = tmp_path / "data"
    with webhook_receiver() as receiver:
        env = {"ADQUEUE_NOTIFY_URL": receiver.url, "ADQUEUE_ALLOWED_ROOTS": str(mtd)}
        invoke_cli(data, "train", "--detector", "mvg", "--data", str(mtd / "manifest.csv"), "--name", "tiles", **env)

        on_welds = json.loads(invoke_cli(data, "score", "--model", "tiles", str(welds / "test"), "--heatmaps", "none",
                                         "--format", "json", **env).stdout)
        assert on_welds["n_total"] == 128
        assert [a["kind"] for a in on_welds["alarms"]] == ["anomaly_rate"], on_welds
        (post,) = receiver.of_job(on_welds["job_id"])
        assert post["alarms"] == on_welds["alarms"] and post["n_flagged"] == on_welds["n_flagged"] > 64

        on_tiles = json.loads(invoke_cli(data, "score", "--model", "tiles", str(good_tiles), "--heatmaps", "none",
                                         "--format", "json", **env).stdout)
        assert on_tiles["n_total"] == 190 and on_tiles["alarms"] == [], on_tiles
        (post,) = receiver.of_job(on_tiles["job_id"])
        assert post["alarms"] == [] and post["status"] == "done"
        print(f"welds: {on_welds['n_flagged']} of {on_welds['n_scored']} flagged; "
              f"good tiles: {on_tiles['n_flagged']} of {on_tiles['n_scored']} flagged; "
              f"drift {on_tiles.get('drift_ks')}")
