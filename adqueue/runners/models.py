"""Detectors by model id, loaded once per process and kept (least recently used evicted)."""

from __future__ import annotations

from typing import Any

from adqueue.jobs.context import Context
from adqueue.pipeline.device import accelerate
from adqueue.pipeline.model_files import LoadedModel, RegisteredModel, load_detector
from adqueue.store.models import Model


class ModelCache:
    def __init__(self, ctx: Context, device: Any, capacity: int = 2) -> None:
        self.ctx = ctx
        self.device = device
        self.capacity = capacity
        self._models: dict[int, LoadedModel] = {}

    def __call__(self, model_id: int) -> LoadedModel:
        loaded = self._models.pop(model_id, None)
        if loaded is None:
            with self.ctx.store.session() as session:
                row = session.get_one(Model, model_id)
                model = RegisteredModel(row.id, row.name, row.version, row.artifact_path, row.artifact_sha256,
                                        row.threshold)
            loaded = load_detector(self.ctx.data_dir, model, self.device)
            accelerate(loaded.detector, self.ctx.settings, self.device)
            while len(self._models) >= self.capacity:
                self._models.pop(next(iter(self._models)))
        self._models[model_id] = loaded  # re-inserted last: most recently used
        return loaded

    def __len__(self) -> int:
        return len(self._models)
