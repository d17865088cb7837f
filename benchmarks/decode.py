"""Camera-resolution JPEGs: what decoding one costs, and what it does to scoring through the CLI.

    python benchmarks/decode.py [--images 48] [--repeats 3] [--megapixels 12] [--skip-cli]

Camera frames are made by upscaling dataset images (MTD by default, `--source DIR` for any
folder of images) into a temporary folder, never the repository, with `--noise` added to each
pixel (an upscaled image alone is smoother than any camera frame).

1. one frame: CPU time (this thread's) to turn one 12 MP JPEG into the model's input (mvg's
   260 px), best of `--repeats`: `read_image` before the reduced-scale decode (read, hash, decode
   whole, resize), `read_image` now (Pillow's `draft`: libjpeg's DCT scaling), and, where they
   are installed, simplejpeg's scaled decode and torchvision's `decode_jpeg` (whole, on the CPU),
   each then resized.
2. through the CLI (`--skip-cli` leaves it out): `adqueue train` mvg with its defaults on the
   300 px copies, then `adqueue score --heatmaps none` of the camera frames and of the same
   frames saved at 300 px, alternated `--repeats` times, embedded, ADQUEUE_TORCH_THREADS=2. A
   job's images/s are its images over its own duration (first claim to completion, from `adqueue
   jobs JOB`), so interpreter start-up is left out. It prints the best run of each, and each camera
   run's ratio to the mean of the small runs either side of it, with their median: on a shared
   machine whose speed drifts by the second, best-of ratios of short runs scatter by 0.1.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from adqueue.data.io import decode_bytes, read_file, read_image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ADQUEUE_SHARED_DIR", REPO.parent / "shared"))
MTD = SHARED / "datasets" / "mtd"
MODEL_SIZE = 260  # mvg's default input


def source_images(source: Path | None, count: int) -> list[Path]:
    if source is not None:
        found = sorted(p for p in source.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp"})
    else:
        with (MTD / "manifest.csv").open(newline="", encoding="utf-8-sig") as handle:
            found = [MTD / row["path"] for row in csv.DictReader(handle) if row["split"] == "train"]
    if len(found) < count:
        raise SystemExit(f"need {count} images, found {len(found)} (MTD at {MTD}, or --source DIR)")
    step = len(found) // count
    return found[::step][:count]


def make_frames(sources: list[Path], folder: Path, megapixels: float, noise: int) -> tuple[Path, Path]:
    """Each source upscaled to a 4:3 frame of `megapixels` (JPEG, quality 90), and that frame
    saved again at 300 px (the small images a camera dump would be compared with)."""
    width = round((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = round(width * 3 / 4)
    big, small = folder / "camera", folder / "small"
    big.mkdir(parents=True)
    small.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index, path in enumerate(sources):
        with Image.open(path) as image:
            frame = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        # A sensor's noise: an upscaled image alone is smooth, and compresses (and decodes) as no
        # camera frame does. The decode's entropy stage, which no scaling skips, grows with it.
        noisy = np.asarray(frame, dtype=np.int16) + rng.integers(-noise, noise + 1, (height, width, 1), dtype=np.int16)
        frame = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        frame.save(big / f"frame_{index:04d}.jpg", quality=90)
        frame.resize((300, 225), Image.Resampling.BILINEAR).save(small / f"frame_{index:04d}.jpg", quality=90)
    return big, small


def cpu_ms(work: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.thread_time()
        work()
        best = min(best, time.thread_time() - started)
    return best * 1000


def one_frame(frame: Path, repeats: int) -> list[tuple[str, float]]:
    data = frame.read_bytes()
    size = (MODEL_SIZE, MODEL_SIZE)

    def whole() -> object:  # read_image before the reduced-scale decode: read, hash, decode whole, resize
        raw, _ = read_file(frame)
        hashlib.sha256(raw).hexdigest()
        return np.array(decode_bytes(raw, channels=3).resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0))

    rows = [("Pillow, decoded whole, then resized (before)", cpu_ms(whole, repeats)),
            ("adqueue read_image: Pillow draft, then resized (now)",
             cpu_ms(lambda: read_image(frame, channels=3, size=size), repeats))]
    try:
        import simplejpeg

        def simple() -> object:  # libjpeg-turbo's scaled decode, to the smallest scale >= size
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=MODEL_SIZE, min_width=MODEL_SIZE)
            return np.array(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0))

        rows.append(("simplejpeg scaled decode, then resized", cpu_ms(simple, repeats)))
    except ImportError:
        rows.append(("simplejpeg (not installed)", float("nan")))
    try:
        import torch
        import torch.nn.functional as F
        from torchvision.io import decode_jpeg

        torch.set_num_threads(1)
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)

        def tv() -> object:
            pixels = decode_jpeg(encoded)[None].float()
            return F.interpolate(pixels, size=size, mode="bilinear", antialias=True)

        rows.append(("torchvision decode_jpeg (CPU, whole), then resized", cpu_ms(tv, repeats)))
    except ImportError:
        rows.append(("torchvision (not installed)", float("nan")))
    return rows


def adqueue(args: list[str], env: dict[str, str]) -> object:
    done = subprocess.run([sys.executable, "-m", "adqueue", *args, "--format", "json"], env=env, cwd=REPO,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"adqueue {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def score_rate(folder: Path, env: dict[str, str]) -> float:
    job = adqueue(["score", "--model", "cam", str(folder), "--heatmaps", "none"], env)
    assert isinstance(job, dict)
    shown = adqueue(["jobs", str(job["job_id"])], env)
    record = shown[0] if isinstance(shown, list) else shown
    assert isinstance(record, dict)
    started, finished = (datetime.fromisoformat(str(record[key])) for key in ("started_at", "finished_at"))
    if record["n_failed"]:
        raise SystemExit(f"{record['n_failed']} images of {folder} failed")
    return int(record["n_done"]) / (finished - started).total_seconds()


def through_cli(big: Path, small: Path, tmp: Path, repeats: int) -> tuple[list[float], list[float]]:
    """images/s of each run: small, camera, small, ..., small (`repeats` camera runs, each between
    two small ones, so that each can be paired with the small runs either side of it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADQUEUE_")}
    env.update(ADQUEUE_DATA_DIR=str(tmp / "adq"), ADQUEUE_TORCH_THREADS="2", PYTHONUNBUFFERED="1")
    adqueue(["train", "--detector", "mvg", "--data", str(small), "--name", "cam"], env)
    small_runs, camera_runs = [score_rate(small, env)], []
    for _ in range(repeats):
        camera_runs.append(score_rate(big, env))
        small_runs.append(score_rate(small, env))
    return camera_runs, small_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--noise", type=int, default=3,
                        help="amplitude of the uniform noise added to each frame's pixels (0-255 scale)")
    parser.add_argument("--source", type=Path, default=None, help="a folder of images (default: MTD's training images)")
    parser.add_argument("--skip-cli", action="store_true", help="only the one-frame decode times")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adqueue-decode-") as name:
        tmp = Path(name)
        count = 1 if args.skip_cli else args.images
        big, small = make_frames(source_images(args.source, count), tmp / "frames", args.megapixels,
                                 args.noise)
        frame = next(big.iterdir())
        with Image.open(frame) as probe:
            shape = f"{probe.width}x{probe.height}"
        print(f"## one {shape} JPEG ({frame.stat().st_size / 2**20:.1f} MiB) to {MODEL_SIZE} px, "
              f"CPU ms of one thread, best of {args.repeats}\n")
        rows = one_frame(frame, args.repeats)
        print("| decoder | CPU ms |\n|---|---|")
        for label, ms in rows:
            print(f"| {label} | {ms:.1f} |")
        print(f"\nnow / before: {rows[1][1] / rows[0][1]:.3f}\n")
        if args.skip_cli:
            return
        camera_runs, small_runs = through_cli(big, small, tmp, args.repeats)
        rate_big, rate_small = max(camera_runs), max(small_runs)
        paired = [camera / ((before + after) / 2)
                  for camera, before, after in zip(camera_runs, small_runs[:-1], small_runs[1:], strict=True)]
        print(f"## adqueue score through the CLI: {args.images} images, mvg defaults, embedded, --heatmaps none, "
              f"2 torch threads, best of {args.repeats} alternated runs\n")
        print("| images | images/s (best) | every run, in order |\n|---|---|---|")
        print(f"| {shape} JPEGs | {rate_big:.1f} | {' '.join(f'{r:.1f}' for r in camera_runs)} |")
        print(f"| the same at 300x225 | {rate_small:.1f} | {' '.join(f'{r:.1f}' for r in small_runs)} |")
        print(f"\ncamera / small: {rate_big / rate_small:.2f}x (best of each)")
        print(f"paired: {' '.join(f'{r:.2f}' for r in paired)} (each camera run against the small runs either side;"
              f" median {statistics.median(paired):.2f}x)")


if __name__ == "__main__":
    main()
