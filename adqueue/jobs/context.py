"""The handle the job code and the runners take: settings, the database, the data dir."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from adqueue.core.config import Settings
from adqueue.core.datadir import DataDir
from adqueue.store.migrate import ensure_schema
from adqueue.store.session import Store


@dataclass
class Context:
    settings: Settings
    _schema_checked: bool = field(default=False, repr=False)

    @cached_property
    def store(self) -> Store:
        store = Store(self.settings.database_url)
        store.check_reachable()
        ensure_schema(store)
        return store

    @cached_property
    def data_dir(self) -> DataDir:
        # Not created here: a verb that only reads must leave no folder behind; whatever writes a
        # file under it creates the folders it needs (atomic_write_bytes, save_detector).
        return DataDir(self.settings.data_dir)

    def close(self) -> None:
        if "store" in self.__dict__:
            self.store.engine.dispose()
