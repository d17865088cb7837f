"""Model files: a fitted detector saved as safetensors, and loaded back exactly as registered.

A file holds tensors only (no pickle) and, in its header metadata, the detector's name, config,
threshold, heat-map color range and backbone hash. Loading checks the file against the SHA-256
SQL recorded at registration, and the backbone weights against the hash the model was built on.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adqueue.core.datadir import DataDir
from adqueue.core.errors import AdqueueError, ModelUnavailable
from adqueue.core.hashing import file_sha256

if TYPE_CHECKING:
    from adqueue.detectors.base import Detector

FORMAT_VERSION = "1"


@dataclass
class ModelFile:
    detector: str
    config: dict[str, Any]
    extra: dict[str, Any]  # threshold, map range, backbone identity, fit info
    state: dict[str, Any]  # tensors


@dataclass(frozen=True)
class RegisteredModel:
    """What SQL says of a model version: which file, which hash, which threshold."""

    model_id: int
    name: str
    version: int
    artifact_path: str
    artifact_sha256: str | None
    threshold: float | None


@dataclass
class LoadedModel:
    """A detector ready to score, with what was calibrated alongside it."""

    model_id: int
    detector: Detector
    threshold: float | None
    map_range: tuple[float, float]


def save_model(path: Path, model: ModelFile) -> None:
    metadata = {
        "format": FORMAT_VERSION,
        "detector": model.detector,
        "config": json.dumps(model.config),
        "extra": json.dumps(model.extra),
    }
    temp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        tensors = {key: value.detach().cpu().contiguous() for key, value in model.state.items()}
        from safetensors.torch import save_file  # torch: only where a model is written

        save_file(tensors, temp, metadata=metadata)
        os.replace(temp, path)
    except BaseException as exc:
        if temp is not None:
            Path(temp).unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full or read-only disk: one line for the job, no half file left
            raise AdqueueError(f"cannot write the model file {path}: {exc.strerror or exc}") from None
        if type(exc).__name__ == "SafetensorError":  # safetensors' own wrapping of the same I/O errors
            raise AdqueueError(f"cannot write the model file {path}: {exc}") from None
        raise


def load_model(path: Path) -> ModelFile:
    """Read a model file; anything wrong with it is a ModelUnavailable (no retry can fix it)."""
    if not path.is_file():
        raise ModelUnavailable(f"model file missing: {path} (is the data dir shared with this host?)")
    tensors = {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = handle.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ModelUnavailable(f"model file {path} is unreadable (truncated or corrupt?): {exc}") from None
    if metadata.get("format") != FORMAT_VERSION:
        raise ModelUnavailable(f"{path} is not an adqueue model file (format {metadata.get('format')!r})")
    try:
        return ModelFile(
            detector=metadata["detector"],
            config=json.loads(metadata["config"]),
            extra=json.loads(metadata["extra"]),
            state=tensors,
        )
    except (KeyError, ValueError) as exc:
        raise ModelUnavailable(f"model file {path} has malformed metadata: {exc!r}") from None


def save_detector(
    data_dir: DataDir, detector: Detector, *, name: str, version: int, job_id: int, extra: dict[str, Any]
) -> str:
    """Write the model file; returns its path relative to the data dir."""
    path = data_dir.model_file(name, version, job_id)
    save_model(
        path,
        ModelFile(
            detector=detector.name,
            config=detector.config_dict(),
            extra={**extra, "backbone": detector.backbone_identity()},
            state=detector.trainable_state(),
        ),
    )
    return data_dir.relative(path)


def load_detector(data_dir: DataDir, model: RegisteredModel, device: Any = "cpu") -> LoadedModel:
    """The model's detector, from a file that must be exactly the one registered. The threshold
    is the one in SQL (`models.threshold`), the one place it is read from and may be changed."""
    from adqueue.detectors import registry

    path = data_dir.resolve(model.artifact_path)
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
    missing, unexpected = detector.load_fitted(stored.state)
    if missing or unexpected:
        raise ModelUnavailable(
            f"model file {model.artifact_path} does not match detector {stored.detector}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    detector.to(device).eval()
    low, high = stored.extra.get("map_range") or (0.0, 1.0)
    return LoadedModel(model.model_id, detector, model.threshold, (float(low), float(high)))
