"""`score --skip-scored`: leave out the files this model version has already scored, unchanged.

Nightly dumps overlap: most of tonight's files were there last night. A file is skipped when a
result of the same model version (no error) has its path and either the same size and mtime (so
it is not even read) or, when only the mtime moved, the same SHA-256 of its content. Anything
else (new, changed, unreadable) is scored. Lookups go by batches of paths, one query each, so the
cost per file is a stat and a share of one indexed query, and memory stays flat.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from itertools import islice

from sqlalchemy import select

from adqueue.core.hashing import file_sha256
from adqueue.data.paths import to_os
from adqueue.data.sources import Item
from adqueue.jobs.context import Context
from adqueue.store.models import Result

BATCH = 512
_Seen = tuple[int | None, int | None, str | None]  # (size, mtime_ns, sha256) of an earlier result


class SkipScored:
    """A filter over a submission's items that counts what it leaves out (`take_skipped`)."""

    def __init__(self, ctx: Context, model_id: int) -> None:
        self.ctx = ctx
        self.model_id = model_id
        self._skipped = 0

    def __call__(self, items: Iterator[Item]) -> Iterator[Item]:
        while chunk := list(islice(items, BATCH)):
            seen = self._seen([item.path for item in chunk])
            for item in chunk:
                if item.path in seen and _unchanged(item.path, seen[item.path], self.ctx.settings.max_file_bytes):
                    self._skipped += 1
                else:
                    yield item

    def take_skipped(self) -> int:
        """Files left out since the last call (each written to SQL with the shards that follow them)."""
        skipped, self._skipped = self._skipped, 0
        return skipped

    def _seen(self, paths: list[str]) -> dict[str, list[_Seen]]:
        with self.ctx.store.session() as session:
            rows = session.execute(
                select(Result.path, Result.file_size, Result.file_mtime_ns, Result.sha256).where(
                    Result.model_id == self.model_id, Result.path.in_(paths), Result.error.is_(None),
                    Result.score.is_not(None))
            ).all()
        seen: dict[str, list[_Seen]] = {}
        for path, size, mtime_ns, sha256 in rows:
            seen.setdefault(path, []).append((size, mtime_ns, sha256))
        return seen


def _unchanged(path: str, seen: list[_Seen], max_bytes: int) -> bool:
    try:
        info = os.stat(to_os(path))
    except OSError:
        return False  # gone or unreadable: scoring it gives its error row
    if not stat.S_ISREG(info.st_mode):
        return False
    if any(size == info.st_size and mtime == info.st_mtime_ns for size, mtime, _ in seen):
        return True
    same_size = {sha for size, _, sha in seen if size == info.st_size and sha}
    if not same_size or info.st_size > max_bytes:
        return False
    return _sha256(to_os(path)) in same_size  # touched, perhaps copied again: compare the content


def _sha256(path: str) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None
