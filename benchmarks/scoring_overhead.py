"""What the whole scoring pipeline costs next to the bare backbone forward, measured in one run.

    python benchmarks/scoring_overhead.py [--images 256] [--backbone efficientnet_lite2] [--size 260]

1. bare: the backbone's forward pass alone (the levels mvg uses) on images decoded and resized
   beforehand, batches of ADQUEUE_BATCH_SIZE (32): the floor any detector on it pays.
2. pipeline: `adqueue score` on the embedded default with the same images on disk: submission,
   claims and lease renewals, decoding in background threads, mvg's scores and maps, heat maps
   for flagged images, one bulk upsert per shard.

It prints images/s of each and their ratio (pipeline / bare; 1.0 would mean everything but the
backbone is free). Each is the best of `--repeats` runs, alternated, on one machine in one run.
Run it from another checkout (a git worktree of an older commit) with the same virtualenv to
compare commits: the script imports the adqueue beside it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from adqueue.cli.demo import build_dataset
from adqueue.core.config import Settings
from adqueue.core.progress import NullProgress
from adqueue.data.loader import load_stream, stack_pixels, to_float
from adqueue.data.sources import open_source
from adqueue.jobs.context import Context
from adqueue.jobs.ports import NullScoreProgress
from adqueue.jobs.submit import submit_score, submit_train
from adqueue.runners.inline import InlineDispatcher
from adqueue.runners.models import ModelCache
from adqueue.store.queries import resolve_model

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--backbone", default="efficientnet_lite2")
    parser.add_argument("--size", type=int, default=260)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adqueue-overhead-") as tmp:
        root, dump = build_dataset(Path(tmp) / "data", n_normal=40, n_dump=args.images)
        ctx = Context(Settings.load(data_dir=Path(tmp) / "adq", broker_url=""))
        dispatcher = InlineDispatcher(ctx, train_progress=NullProgress, score_progress=NullScoreProgress)
        submit_train(ctx, dispatcher, detector="mvg", data=str(root), name="bench",
                     settings={"backbone": args.backbone, "image_size": str(args.size)})
        with ctx.store.session() as session:
            model_id = resolve_model(session, "bench").id
        detector = ModelCache(ctx, "cpu")(model_id).detector
        images = [entry for entry in load_stream(open_source(dump).items(), detector.preprocess) if entry.ok]
        batches = [to_float(stack_pixels(images[i:i + ctx.settings.batch_size]))
                   for i in range(0, len(images), ctx.settings.batch_size)]
        levels = sorted(set(detector.config.levels) | set(detector.config.map_levels))

        @torch.no_grad()
        def bare() -> float:
            started = time.perf_counter()
            for batch in batches:
                detector.backbone(batch, levels)
            return len(images) / (time.perf_counter() - started)

        def pipeline() -> float:
            started = time.perf_counter()
            submit_score(ctx, dispatcher, model="bench", data=str(dump), shard_size=256)
            return len(images) / (time.perf_counter() - started)

        bare()  # warm-up: kernels, allocator
        best_bare = best_pipeline = 0.0
        for _ in range(args.repeats):
            best_bare = max(best_bare, bare())
            best_pipeline = max(best_pipeline, pipeline())
        ctx.close()
    print(f"{args.backbone} @ {args.size} px, {len(images)} images, {torch.get_num_threads()} torch threads")
    print(f"bare backbone forward : {best_bare:7.1f} images/s")
    print(f"mvg scoring pipeline  : {best_pipeline:7.1f} images/s")
    print(f"pipeline / bare       : {best_pipeline / best_bare:7.2f}x")


if __name__ == "__main__":
    main()
