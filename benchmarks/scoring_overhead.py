"""What the whole scoring pipeline costs next to the bare backbone forward, measured in one run.

    python benchmarks/scoring_overhead.py [--images 256] [--backbone efficientnet_lite2] [--size 260]
        [--threads 2] [--random-weights] [--levels 1,2,3] [--heatmaps flagged] [--profile OUT.prof]

The cheap-backbone figure of the README: `--backbone resnet18 --size 256 --levels 1,2,3
--random-weights --threads 2` (random weights, saved under torchvision's file name in a
temporary ADQUEUE_WEIGHTS_DIR: a cheap forward pass makes the work around it show, as on a GPU).
The process re-runs itself once with the malloc tuning `adqueue` applies (core/malloc_tuning.py).

1. bare: the backbone's forward pass alone (the levels mvg uses) on images decoded and resized
   beforehand, batches of ADQUEUE_BATCH_SIZE (32): the floor any detector on it pays.
2. pipeline: `adqueue score` on the embedded default with the same images on disk: submission,
   claims and lease renewals, decoding in background threads, mvg's scores and maps, heat maps
   for flagged images, one bulk upsert per shard.

It prints images/s of each and their ratio (pipeline / bare; 1.0 would mean everything but the
backbone is free). Each is the best of `--repeats` runs, alternated, on one machine in one run.
On a machine whose speed drifts by the second (a shared VM), it also prints each pipeline run's
ratio to the mean of the bare runs on either side of it, and their median.
`--breakdown` prints, for every pipeline run, where the time and the CPU went: the backbone's
forward passes (wall), the process's CPU, and the CPU of the decode threads and of the heat-map
painter (the rest is the scoring thread and torch's own threads).
`--profile OUT` writes a cProfile of one more pipeline run (pstats format; `python -m pstats OUT`).
Run it from another checkout (a git worktree of an older commit) with the same virtualenv to
compare commits: the script imports the adqueue beside it.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adqueue.cli.demo import build_dataset
from adqueue.core.config import Settings
from adqueue.core.malloc_tuning import _TUNING
from adqueue.core.progress import NullProgress
from adqueue.data import loader
from adqueue.data.loader import load_stream, stack_pixels, to_float
from adqueue.data.sources import open_source
from adqueue.jobs.context import Context
from adqueue.jobs.ports import NullScoreProgress
from adqueue.jobs.submit import submit_score, submit_train
from adqueue.pipeline import score
from adqueue.runners.inline import InlineDispatcher
from adqueue.runners.models import ModelCache
from adqueue.store.queries import resolve_model

REPO = Path(__file__).resolve().parents[1]


def tune_malloc() -> None:
    """Re-run this script once with adqueue's malloc tuning, as `adqueue score` runs."""
    if sys.platform.startswith("linux") and not all(key in os.environ for key in _TUNING):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_TUNING})


def random_weights(backbone: str, folder: Path) -> None:
    """Random-init torchvision weights under the file name the backbone registry looks for."""
    import torchvision.models as tvm

    builders = {"resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
                "wide_resnet50_2": (tvm.wide_resnet50_2, tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1)}
    if backbone not in builders:
        raise SystemExit(f"--random-weights takes {', '.join(builders)}, not {backbone}")
    build, weights = builders[backbone]
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(build(weights=None).state_dict(), folder / weights.url.rsplit("/", 1)[-1])
    os.environ["ADQUEUE_WEIGHTS_DIR"] = str(folder)


class Meter:
    """Wall time of the backbone's forward passes, and CPU of the decode threads and the painter,
    by wrapping the functions each runs (looked up by name at call time, so the wrappers apply)."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        self.lock = threading.Lock()
        self.seconds = {"forward": 0.0, "decode": 0.0, "paint": 0.0}
        loader.load_one = self._timed(loader.load_one, "decode", time.thread_time)  # type: ignore[assignment]
        score._write_heatmap = self._timed(score._write_heatmap, "paint", time.thread_time)  # type: ignore[assignment]
        # The class's: the pipeline's model is another instance (the dispatcher's model cache).
        extractor = type(backbone)
        extractor.forward = self._timed(extractor.forward, "forward", time.perf_counter)  # type: ignore[method-assign]
        self.cpu = time.process_time()

    def _timed(self, work: Callable[..., Any], part: str, clock: Callable[[], float]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return work(*args, **kwargs)
            finally:
                with self.lock:
                    self.seconds[part] += clock() - started
        return timed

    def start(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.cpu = time.process_time()

    def report(self, wall: float) -> str:
        cpu, parts = time.process_time() - self.cpu, self.seconds
        return (f"  pipeline {wall:.2f} s: forward passes {parts['forward']:.2f} s, the rest {wall - parts['forward']:.2f}"
                f" s; CPU {cpu:.2f} s, of which decode threads {parts['decode']:.2f}, painter {parts['paint']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--backbone", default="efficientnet_lite2")
    parser.add_argument("--size", type=int, default=260)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--levels", default="", help="mvg's levels and map levels (default: the backbone's)")
    parser.add_argument("--random-weights", action="store_true", help="random-init torchvision weights")
    parser.add_argument("--heatmaps", default="flagged", choices=["flagged", "all", "none"])
    parser.add_argument("--profile", type=Path, default=None, help="cProfile one more pipeline run into this file")
    parser.add_argument("--breakdown", action="store_true", help="time and CPU of each pipeline run by part")
    args = parser.parse_args()
    tune_malloc()
    if args.threads:
        os.environ["ADQUEUE_TORCH_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="adqueue-overhead-") as tmp:
        if args.random_weights:
            random_weights(args.backbone, Path(tmp) / "weights")
        settings = {"backbone": args.backbone, "image_size": str(args.size)}
        if args.levels:
            settings.update(levels=args.levels, map_levels=args.levels)
        root, dump = build_dataset(Path(tmp) / "data", n_normal=40, n_dump=args.images)
        ctx = Context(Settings.load(data_dir=Path(tmp) / "adq", broker_url=""))
        dispatcher = InlineDispatcher(ctx, train_progress=NullProgress, score_progress=NullScoreProgress)
        submit_train(ctx, dispatcher, detector="mvg", data=str(root), name="bench", settings=settings)
        with ctx.store.session() as session:
            model_id = resolve_model(session, "bench").id
        detector = ModelCache(ctx, "cpu")(model_id).detector
        images = [entry for entry in load_stream(open_source(dump).items(), detector.preprocess) if entry.ok]
        batches = [to_float(stack_pixels(images[i:i + ctx.settings.batch_size]))
                   for i in range(0, len(images), ctx.settings.batch_size)]
        levels = sorted(set(detector.config.levels) | set(detector.config.map_levels))

        meter = Meter(detector.backbone) if args.breakdown else None

        @torch.no_grad()
        def bare() -> float:
            started = time.perf_counter()
            for batch in batches:
                detector.backbone(batch, levels)
            return time.perf_counter() - started

        def pipeline() -> float:
            if meter is not None:
                meter.start()
            started = time.perf_counter()
            submit_score(ctx, dispatcher, model="bench", data=str(dump), shard_size=256, heatmaps=args.heatmaps)
            seconds = time.perf_counter() - started
            if meter is not None:
                print(meter.report(seconds))
            return seconds

        bare()  # warm-up: kernels, allocator
        bare_runs, pipeline_runs, paired = [bare()], [], []
        for _ in range(args.repeats):
            pipeline_runs.append(pipeline())
            bare_runs.append(bare())
            paired.append((bare_runs[-2] + bare_runs[-1]) / 2 / pipeline_runs[-1])
        best_bare, best_pipeline = len(images) / min(bare_runs), len(images) / min(pipeline_runs)
        if args.profile is not None:
            cProfile.runctx("pipeline()", globals(), {"pipeline": pipeline}, str(args.profile))
        ctx.close()
    weights = "random" if args.random_weights else "ImageNet"
    print(f"{args.backbone} ({weights} weights) @ {args.size} px, levels {levels}, {len(images)} images, "
          f"{torch.get_num_threads()} torch threads, heat maps {args.heatmaps}")
    print(f"bare backbone forward : {best_bare:7.1f} images/s")
    print(f"mvg scoring pipeline  : {best_pipeline:7.1f} images/s")
    print(f"pipeline / bare       : {best_pipeline / best_bare:7.2f}x")
    print(f"paired ratios         : {' '.join(f'{r:.2f}' for r in paired)} (median {statistics.median(paired):.2f}x)")


if __name__ == "__main__":
    main()
