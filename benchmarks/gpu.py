"""Every detector fitted and scoring on one device: the bare forward pass against the whole pipeline.

    python benchmarks/gpu.py [--device cuda|cpu] [--detectors mvg,patchcore,...] [--images 512]
                             [--train-images 64] [--set DETECTOR:KEY=VALUE ...] [--budget-s 480]

For each detector (default: all of them), on a generated real-texture dataset (adqueue demo's):
`train` with its default settings (or --set), in this process on the embedded default with
ADQUEUE_DEVICE set, then:

1. bare: the detector's frozen backbone forward (the levels it uses) on decoded batches already on
   the device, or, for detectors without one (ebm, encoder_flow), its whole score without maps:
   the floor the pipeline pays;
2. pipeline without maps: `adqueue score --heatmaps none` (decoding, transfers, scores, rows, the
   bulk write);
3. pipeline with maps: `adqueue score --heatmaps all` (maps, and a heat-map PNG for every image).

It prints images/s of each and the ratios pipeline / bare; the device's settings (ADQUEUE_AUTOCAST,
_CHANNELS_LAST, _PIN_MEMORY, _GPU_DECODE) apply as they would in a worker. The whole run stops
short of `--budget-s` (8 minutes): a detector not started in time is listed as skipped. Defaults
to CUDA when it is available.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from adqueue.cli.demo import build_dataset
from adqueue.core.config import Settings
from adqueue.core.progress import NullProgress
from adqueue.data.loader import device_batch, load_stream
from adqueue.data.sources import open_source
from adqueue.detectors.base import Detector
from adqueue.detectors.components.backbones import FeatureExtractor
from adqueue.detectors.registry import names as detector_names
from adqueue.jobs.context import Context
from adqueue.jobs.ports import NullScoreProgress
from adqueue.jobs.submit import submit_score, submit_train
from adqueue.runners.inline import InlineDispatcher
from adqueue.store.queries import resolve_model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_rate(count: int, run: Callable[[], object], repeats: int, device: torch.device) -> float:
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        best = max(best, count / (time.perf_counter() - started))
    return best


def backbone_levels(detector: Detector) -> tuple[FeatureExtractor, list[int]] | None:
    """The frozen backbone and the levels the detector takes from it, if it has one."""
    config = detector.config
    for module in detector.modules():
        if isinstance(module, FeatureExtractor):
            levels: set[int] = set()
            for name in ("levels", "map_levels", "global_levels"):
                levels |= set(getattr(config, name, ()) or ())
            if hasattr(detector, "features") and hasattr(detector.features, "levels"):  # differnet
                levels |= set(detector.features.levels)
            return module, sorted(levels) or [module.n_levels - 1]
    return None


def bench_detector(name: str, settings: dict[str, str], ctx: Context, dispatcher: InlineDispatcher,
                   root: Path, dump: Path, repeats: int) -> dict[str, float]:
    submit_train(ctx, dispatcher, detector=name, data=str(root), name=f"gpu-{name}", settings=settings)
    with ctx.store.session() as session:
        model_id = resolve_model(session, f"gpu-{name}").id
    detector = dispatcher.models(model_id).detector
    device = detector.device
    entries = [entry for entry in load_stream(open_source(dump).items(), detector.preprocess) if entry.ok]
    size = ctx.settings.batch_size
    batches = [device_batch(entries[i:i + size], detector.preprocess, device) for i in range(0, len(entries), size)]
    found = backbone_levels(detector)

    @torch.no_grad()
    def bare() -> None:
        for batch in batches:
            if found is not None:
                found[0](batch, found[1])
            else:
                detector.score(batch, with_maps=False)

    def pipeline(heatmaps: str) -> Callable[[], object]:
        return lambda: submit_score(ctx, dispatcher, model=f"gpu-{name}", data=str(dump), shard_size=len(entries) + 8,
                                    heatmaps=heatmaps)

    bare()  # warm-up: kernels, cuDNN's algorithm search, the caching allocators
    pipeline("none")()
    return {"bare": best_rate(len(entries), bare, repeats, device),
            "no_maps": best_rate(len(entries), pipeline("none"), repeats, device),
            "maps": best_rate(len(entries), pipeline("all"), repeats, device),
            "backbone": float(found is not None)}


def parse_sets(pairs: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for pair in pairs:
        detector, _, setting = pair.partition(":")
        key, equals, value = setting.partition("=")
        if not equals:
            raise SystemExit(f"--set takes DETECTOR:KEY=VALUE, not {pair!r}")
        out.setdefault(detector, {})[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--detectors", default=",".join(detector_names()))
    parser.add_argument("--images", type=int, default=512, help="images in the scored dump")
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="DETECTOR:KEY=VALUE")
    parser.add_argument("--budget-s", type=float, default=480.0)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here (use --device cpu)")
    started = time.monotonic()
    overrides = parse_sets(args.set)
    rows: list[tuple[str, dict[str, float] | None]] = []
    with tempfile.TemporaryDirectory(prefix="adqueue-gpu-") as tmp:
        root, dump = build_dataset(Path(tmp) / "data", n_normal=args.train_images, n_dump=args.images)
        os.environ["ADQUEUE_DEVICE"] = args.device
        ctx = Context(Settings.load(data_dir=Path(tmp) / "adq", broker_url=""))
        dispatcher = InlineDispatcher(ctx, train_progress=NullProgress, score_progress=NullScoreProgress)
        names = [name for name in args.detectors.split(",") if name]
        for index, name in enumerate(names):
            elapsed = time.monotonic() - started
            # Stop before a detector that the time left would not see through (the average so far).
            if index and elapsed + elapsed / index > args.budget_s:
                rows.append((name, None))
                continue
            print(f"{name}: fitting and scoring ...", file=sys.stderr, flush=True)
            rows.append((name, bench_detector(name, overrides.get(name, {}), ctx, dispatcher, root, dump,
                                              args.repeats)))
        ctx.close()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
    settings = Settings.load(data_dir=tmp)
    print(f"## {device}: {args.images} images (generated textures), batch {settings.batch_size}, "
          f"autocast {settings.autocast}, channels-last {settings.channels_last}, pinned {settings.pin_memory}, "
          f"GPU decode {settings.gpu_decode}; {time.monotonic() - started:.0f} s\n")
    print("| detector | bare forward img/s | pipeline, no maps | ratio | pipeline, heat maps for all | ratio |")
    print("|---|---|---|---|---|---|")
    for name, rates in rows:
        if rates is None:
            print(f"| `{name}` | skipped: over the {args.budget_s:.0f} s budget | | | | |")
            continue
        what = "" if rates["backbone"] else " (score, no backbone)"
        print(f"| `{name}` | {rates['bare']:.1f}{what} | {rates['no_maps']:.1f} | {rates['no_maps'] / rates['bare']:.2f}x | "
              f"{rates['maps']:.1f} | {rates['maps'] / rates['bare']:.2f}x |")


if __name__ == "__main__":
    main()
