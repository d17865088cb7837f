"""The data dir: where model files, heat maps and evaluation maps live, and how files get there.

Every file adqueue writes lands under the data dir, through a temporary name and a rename, so a
reader never sees half a file and a crash never leaves one. Paths stored in SQL are relative to
the data dir, so the dir can be mounted elsewhere on another host.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from adqueue.core.errors import AdqueueError


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
        """The stored form of `path`, a file under the data dir. A path this class built (below
        `root`, no "..") needs no resolving: that took five lstat calls a heat map."""
        if path.is_relative_to(self.root) and ".." not in path.parts:
            return str(path.relative_to(self.root))
        return str(path.resolve().relative_to(self.root))

    def model_file(self, name: str, version: int, job_id: int) -> Path:
        # The job id keeps two trainings racing for one version number from sharing a file.
        return self.root / "models" / _safe_name(name) / f"v{version}-job{job_id}.safetensors"

    def heatmap_file(self, job_id: int, key: str, run_id: int) -> Path:
        # Named by run: a run that lost its lease cannot replace the file another run's row points to.
        return self.root / "heatmaps" / f"job{job_id}" / f"{key}-run{run_id}.jpg"

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
