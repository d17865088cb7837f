"""Detection benchmark: every detector trained and evaluated through the real CLI, beside the paper.

    python benchmarks/detectors.py [--detectors mvg,differnet,ebm,encoder_flow,patchcore]
                                   [--datasets mtd,battery_weld] [--set DETECTOR:KEY=VALUE ...]
                                   [--json out.json] [--keep-data DIR] [--tables-from a.json,b.json]

For each dataset and detector: `adqueue train` on the defect-free training images, then
`adqueue evaluate` on the test split, in-process (no broker) on a throwaway data dir, with the
detector's default settings unless --set says otherwise. Prints one Markdown table per dataset:
image AUROC, the training self-check's AUROC on synthetic defects (no labels needed: how far it
predicts the real one is what this table shows), pixel AUROC, PRO, false-alarm rate and recall at
the calibrated threshold, train time and scoring time per test image; MTD's table adds the
DifferNet paper's Table 2 figures.
--tables-from prints the tables of earlier runs' --json files instead (several runs, one table:
e.g. detectors benchmarked in parallel, one torch thread each).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ADQUEUE_SHARED_DIR", REPO.parent / "shared"))
DATASETS = {
    "mtd": SHARED / "datasets" / "mtd" / "manifest.csv",
    "battery_weld": SHARED / "datasets" / "battery_weld",
}
DETECTORS = ("mvg", "differnet", "ebm", "encoder_flow", "patchcore")
# Rudolph et al., WACV 2021, Table 2: image AUROC (%) on MTD.
PAPER_MTD = {
    "GeoTrans": 75.5, "GANomaly": 76.6, "DSEBM": 57.2, "ADGAN": 46.4, "OCSVM": 58.7, "1-NN": 80.0,
    "DifferNet": 97.7,
}


@dataclass
class Row:
    dataset: str
    detector: str
    image_auroc: float | None
    pixel_auroc: float | None
    pro: float | None
    false_alarm_rate: float | None
    recall: float | None
    train_s: float
    score_ms_per_image: float
    n_test: int
    extra: dict[str, float]
    # From `adqueue train`'s own metrics; absent from --json files of runs before the self-check.
    synthetic_auroc: float | None = None
    synthetic: dict[str, float | None] = field(default_factory=dict)  # per defect kind


def adqueue(args: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "adqueue", *args, "--format", "json"], env=env, cwd=REPO,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"adqueue {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def run_one(dataset: str, source: Path, detector: str, settings: list[str], data_dir: Path) -> Row:
    # A clean slate but for the thread cap (parallel runs share a machine fairly), the precision
    # and the layout (ADQUEUE_AUTOCAST=bf16, ADQUEUE_CHANNELS_LAST=0: what each does to the numbers).
    kept = ("ADQUEUE_TORCH_THREADS", "ADQUEUE_AUTOCAST", "ADQUEUE_CHANNELS_LAST")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADQUEUE_") or k in kept}
    env.update(ADQUEUE_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    name = f"{detector}-{dataset}"
    pairs = [arg for setting in settings for arg in ("--set", setting)]
    started = time.perf_counter()
    trained = adqueue(["train", "--detector", detector, "--data", str(source), "--name", name, *pairs], env)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    metrics = adqueue(["evaluate", "--model", name, "--data", str(source)], env)
    score_s = time.perf_counter() - started
    n_test = int(metrics.get("n_images", 0))
    return Row(
        dataset, detector, metrics.get("image_auroc"), metrics.get("pixel_auroc"), metrics.get("pro"),
        metrics.get("false_alarm_rate"), metrics.get("recall"), round(train_s, 1),
        round(1000 * score_s / max(n_test, 1), 1), n_test,
        {k: v for k, v in metrics.items() if k.startswith("image_auroc.")}, trained.get("synthetic_auroc"),
        {k.split(".", 1)[1]: v for k, v in trained.items() if k.startswith("synthetic_auroc.")},
    )


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def table(rows: list[Row], dataset: str) -> str:
    lines = [
        f"### {dataset}",
        "",
        "| detector | image AUROC % | synthetic AUROC % | pixel AUROC % | PRO % | false alarms % | recall % | train "
        "| score / image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| `{row.detector}` | {percent(row.image_auroc)} | {percent(row.synthetic_auroc)} "
            f"| {percent(row.pixel_auroc)} | {percent(row.pro)} "
            f"| {percent(row.false_alarm_rate)} | {percent(row.recall)} | {row.train_s:.0f} s "
            f"| {row.score_ms_per_image:.0f} ms |"
        )
        for name, value in sorted(row.extra.items()):
            lines.append(f"| ↳ score `{name.split('.', 1)[1]}` | {percent(value)} | | | | | | | |")
    if dataset == "mtd":
        lines.append("| *paper (Rudolph et al. 2021, Table 2)* | | | | | | | | |")
        lines += [f"| {method} | {value:.1f} | | | | | | | |" for method, value in PAPER_MTD.items()]
    return "\n".join(lines)


def print_tables(rows: list[Row]) -> None:
    order = {name: index for index, name in enumerate(DETECTORS)}
    for dataset in dict.fromkeys(row.dataset for row in rows):
        mine = sorted((row for row in rows if row.dataset == dataset), key=lambda r: order.get(r.detector, len(order)))
        print(table(mine, dataset), end="\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--source", action="append", default=[], metavar="NAME=PATH",
                        help="an extra labeled dataset (MVTec root or manifest CSV)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="DETECTOR:KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--keep-data", type=Path, metavar="DIR",
                        help="keep each run's data dir (models, results) under DIR instead of a temp dir")
    parser.add_argument("--tables-from", help="comma-separated --json files of earlier runs: print their tables")
    args = parser.parse_args()
    if args.tables_from:
        saved = [Row(**row) for path in args.tables_from.split(",") for row in json.loads(Path(path).read_text())]
        print_tables(saved)
        return
    sources = {name: DATASETS[name] for name in args.datasets.split(",") if name}
    sources.update(dict(entry.split("=", 1) for entry in args.source))
    missing = [str(path) for path in sources.values() if not Path(path).exists()]
    if missing:
        raise SystemExit(f"missing dataset(s): {', '.join(missing)} (../shared/datasets sits beside the repo)")
    per_detector: dict[str, list[str]] = defaultdict(list)
    for entry in args.settings:
        detector, _, setting = entry.partition(":")
        per_detector[detector].append(setting)
    rows: list[Row] = []
    kept = contextlib.nullcontext(str(args.keep_data)) if args.keep_data else None
    with kept or tempfile.TemporaryDirectory(prefix="adqueue-bench-") as tmp:
        for dataset, source in sources.items():
            for detector in args.detectors.split(","):
                print(f"{dataset} / {detector} ...", file=sys.stderr, flush=True)
                rows.append(run_one(dataset, Path(source), detector, per_detector[detector],
                                    Path(tmp) / f"{dataset}-{detector}"))
                print(f"  {asdict(rows[-1])}", file=sys.stderr, flush=True)
                if args.json:  # after every row: a failure later keeps what was measured
                    args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2))
    print_tables(rows)


if __name__ == "__main__":
    main()
