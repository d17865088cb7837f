"""Trained models: resolve `NAME[:VERSION]`, save a fitted detector, load one back."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from adqueue.artifacts import ModelFile, load_model, save_model
from adqueue.errors import AdqueueError, ModelNotFound, ModelUnavailable
from adqueue.service.context import Context
from adqueue.store.models import Model

if TYPE_CHECKING:
    from adqueue.detectors.base import Detector


@dataclass
class LoadedModel:
    """A detector ready to score, with what was calibrated alongside it."""

    model_id: int
    detector: Detector
    threshold: float | None
    map_range: tuple[float, float]


def parse_ref(ref: str) -> tuple[str, int | None]:
    name, sep, version = ref.partition(":")
    if not name:
        raise ModelNotFound(f"invalid model reference {ref!r}: use NAME or NAME:VERSION")
    if not sep:
        return name, None
    try:
        return name, int(version.lstrip("v"))
    except ValueError:
        raise ModelNotFound(f"invalid model version in {ref!r}: use NAME:VERSION, e.g. {name}:1") from None


def resolve_model(session: Session, ref: str) -> Model:
    """The model row for `NAME` (latest version) or `NAME:VERSION`."""
    name, version = parse_ref(ref)
    query = select(Model).where(Model.name == name)
    query = query.where(Model.version == version) if version is not None else query.order_by(Model.version.desc())
    model = session.scalars(query.limit(1)).first()
    if model is None:
        known = session.scalars(select(Model.name).distinct().order_by(Model.name)).all()
        hint = f"; known models: {', '.join(known)}" if known else "; no model has been trained yet"
        what = f"{name}:{version}" if version is not None else name
        raise ModelNotFound(f"no model {what}{hint}")
    return model


def next_version(session: Session, name: str) -> int:
    current = session.scalar(select(func.max(Model.version)).where(Model.name == name))
    return (current or 0) + 1


def save_detector(
    ctx: Context, detector: Detector, *, name: str, version: int, job_id: int, extra: dict[str, Any]
) -> str:
    """Write the model file; returns its path relative to the data dir."""
    path = ctx.data_dir.model_file(name, version, job_id)
    save_model(
        path,
        ModelFile(
            detector=detector.name,
            config=detector.config_dict(),
            extra={**extra, "backbone": detector.backbone_identity()},
            state=detector.trainable_state(),
        ),
    )
    return ctx.data_dir.relative(path)


def load_detector(ctx: Context, model: Model, device: Any = "cpu") -> LoadedModel:
    """The model's detector, from a file that must be exactly the one registered. The threshold
    is the one in SQL (`models.threshold`), the one place it is read from and may be changed."""
    from adqueue.detectors import registry

    path = ctx.data_dir.resolve(model.artifact_path)
    if model.artifact_sha256 and path.is_file() and file_sha256(path) != model.artifact_sha256:
        raise ModelUnavailable(f"model file {model.artifact_path} changed since {model.name}:{model.version} was "
                               "registered (its SHA-256 differs): train a new version instead of editing it")
    stored = load_model(path)
    try:
        detector = registry.create_saved(stored.detector, stored.config)
    except (ValueError, TypeError) as exc:
        raise ModelUnavailable(f"model file {model.artifact_path} does not describe a usable detector: {exc}") from None
    expected = stored.extra.get("backbone") or {}
    actual = detector.backbone_identity()
    if expected and expected != actual:
        raise ModelUnavailable(
            f"model {model.name}:{model.version} was trained on backbone weights {expected} but this "
            f"host has {actual}: install the same weights package or file"
        )
    missing, unexpected = detector.load_state_dict(stored.state, strict=False)
    missing = [key for key in missing if not key.startswith(detector.frozen_prefixes)]
    if missing or unexpected:
        raise ModelUnavailable(
            f"model file {model.artifact_path} does not match detector {stored.detector}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    detector.to(device).eval()
    low, high = stored.extra.get("map_range") or (0.0, 1.0)
    return LoadedModel(model.id, detector, model.threshold, (float(low), float(high)))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_device(setting: str) -> Any:
    """`auto` picks CUDA when this process sees a GPU. Only called after any fork (see workers)."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AdqueueError(f"device {setting} requested but CUDA is not available on this host")
    return device


def apply_torch_threads(threads: int | None) -> None:
    """Cap torch's intra-op threads for this process (None leaves torch's default)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


class ModelCache:
    """Detectors by model id, loaded once per process and kept (least recently used evicted)."""

    def __init__(self, ctx: Context, device: Any, capacity: int = 2) -> None:
        self.ctx = ctx
        self.device = device
        self.capacity = capacity
        self._models: dict[int, LoadedModel] = {}

    def __call__(self, model_id: int) -> LoadedModel:
        loaded = self._models.pop(model_id, None)
        if loaded is None:
            with self.ctx.store.session() as session:
                model = session.get_one(Model, model_id)
            loaded = load_detector(self.ctx, model, self.device)
            while len(self._models) >= self.capacity:
                self._models.pop(next(iter(self._models)))
        self._models[model_id] = loaded  # re-inserted last: most recently used
        return loaded

    def __len__(self) -> int:
        return len(self._models)
