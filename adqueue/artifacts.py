"""Where model files and heat maps live, and how they are written and read.

Every file adqueue writes lands under the data dir, through a temporary name and a rename, so a
reader never sees half a file and a crash never leaves one. Paths stored in SQL are relative to
the data dir, so the dir can be mounted elsewhere on another host.

Model files are safetensors (tensors only, no pickle) with the detector's name, config, threshold
and backbone hash in the header metadata.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adqueue.errors import AdqueueError, ModelUnavailable

FORMAT_VERSION = "1"


class DataDir:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def resolve(self, relative: str) -> Path:
        """An absolute path for a stored relative one, refusing anything outside the data dir."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise AdqueueError(f"refusing a path outside the data dir: {relative}")
        return path

    def relative(self, path: Path) -> str:
        return str(path.resolve().relative_to(self.root))

    def model_file(self, name: str, version: int, job_id: int) -> Path:
        # The job id keeps two trainings racing for one version number from sharing a file.
        return self.root / "models" / _safe_name(name) / f"v{version}-job{job_id}.safetensors"

    def heatmap_file(self, job_id: int, key: str) -> Path:
        return self.root / "heatmaps" / f"job{job_id}" / f"{key}.png"

    def eval_maps_file(self, job_id: int, shard_seq: int, run_id: int) -> Path:
        return self.root / "evaluations" / f"job{job_id}" / f"shard{shard_seq:06d}-run{run_id}.npz"

    def eval_maps_dir(self, job_id: int) -> Path:
        return self.root / "evaluations" / f"job{job_id}"


def _safe_name(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("._")
    return cleaned or "model"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@dataclass
class ModelFile:
    detector: str
    config: dict[str, Any]
    extra: dict[str, Any]  # threshold, map range, backbone identity, fit info
    state: dict[str, Any]  # tensors


def save_model(path: Path, model: ModelFile) -> None:
    metadata = {
        "format": FORMAT_VERSION,
        "detector": model.detector,
        "config": json.dumps(model.config),
        "extra": json.dumps(model.extra),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        tensors = {key: value.detach().cpu().contiguous() for key, value in model.state.items()}
        from safetensors.torch import save_file  # torch: only where a model is written

        save_file(tensors, temp, metadata=metadata)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
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
