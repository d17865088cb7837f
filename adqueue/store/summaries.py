"""Job summaries: a night's result rows summed up as its shards close, so no page reads the rows.

A summary holds counts (rows, scored, flagged, errors, normal), a score histogram on fixed bins
(a row per bin: a close adds its few hundred bins instead of rewriting thousands) and counts per
directory. It is kept in the same transaction as the shard's bulk upsert, under the
job row's lock that transaction already holds (complete_shard and give_up_shard update the job's
counts), so closers of one job apply their changes one after the other.

Correct under retries, takeovers and resume: a shard's rows are exactly its items (paths are
unique in a job), and every close rewrites all of them. Each close adds (new - previous) of that
shard to the job's summary (job_summaries, job_score_bins, job_folders), and keeps what it wrote (shard_summaries)
while the shard may close again: a shard that failed and is resumed replaces its earlier part
instead of adding to it. A done shard never runs again, so its part is not kept apart. `rebuild`
recomputes everything from the rows; a summary equals it at all times (tests/unit/test_summaries.py,
the chaos scenarios).

The histogram bins are the scores' IEEE-754 bits cut to HIST_BITS bits of mantissa: every bin is
at most 2**-HIST_BITS (0.1%) of its value wide, at any scale and sign, the same bins for every
job and detector, and mergeable by adding. Quantiles read from it are within half a bin of the
exact ones.

A job without a summary (written before this existed, or rows loaded in bulk) gets one from
`build` (jobs/reconcile.py's build_missing_summaries: `adqueue db upgrade` and every reconciler
pass). Pages never read rows
instead: they show the job with its counts pending.
"""

from __future__ import annotations

import math
import struct
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate
from typing import Any, cast

from sqlalchemy import delete, exists, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from adqueue.core.clock import utcnow
from adqueue.store.models import (
    Job,
    JobFolder,
    JobKind,
    JobScoreBin,
    JobSummary,
    Result,
    Shard,
    ShardStatus,
    ShardSummary,
)

HIST_BITS = 10
_SHIFT = 52 - HIST_BITS
_MAGNITUDE = (1 << 63) - 1
_DOUBLE = struct.Struct("<d")
_BITS = struct.Struct("<q")


def score_bin(score: float) -> int:
    """The histogram bin of a score: monotonic in the score, 0 holds zero."""
    if score == 0:
        return 0
    bits = _BITS.unpack(_DOUBLE.pack(score))[0]
    k = (bits & _MAGNITUDE) >> _SHIFT
    return k if bits >= 0 else -k - 1


def _from_bits(k: int) -> float:
    bits = min(k << _SHIFT, _MAGNITUDE)
    return float(_DOUBLE.unpack(_BITS.pack(bits))[0])


@lru_cache(maxsize=1 << 16)  # pages read the same bins night after night
def bin_bounds(key: int) -> tuple[float, float]:
    """The scores a bin holds, [low, high) for positive bins, (low, high] for negative ones."""
    if key >= 0:
        return _from_bits(key), _from_bits(key + 1)
    k = -key - 1
    return -_from_bits(k + 1), -_from_bits(k)


def bin_value(key: int) -> float:
    """A bin's representative score: its middle."""
    low, high = bin_bounds(key)
    return low + (high - low) / 2 if math.isfinite(high - low) else low


class Ranked:
    """A histogram's bins in score order with running totals: scores by rank without a walk."""

    def __init__(self, histogram: Mapping[int, int]) -> None:
        self.keys = sorted(key for key, count in histogram.items() if count > 0)
        self.totals = list(accumulate(histogram[key] for key in self.keys))
        self.n = self.totals[-1] if self.totals else 0

    def at(self, ranks: Iterable[int]) -> list[float]:
        """The scores of the given ranks (1 = lowest, ascending), each placed evenly inside its
        bin: the j-th of a bin's c scores at low + (j - 1/2) / c of its width. Ranks past the end
        are left out."""
        values = []
        index, low, width, before, count = -1, 0.0, 0.0, 0, 0
        for rank in ranks:
            if rank < 1 or rank > self.n:
                continue
            if not before < rank <= before + count:  # another bin than the last rank's
                index = bisect_left(self.totals, rank, lo=max(index, 0) if rank > before else 0)
                before = self.totals[index - 1] if index else 0
                count = self.totals[index] - before
                low, high = bin_bounds(self.keys[index])
                width = high - low if math.isfinite(high - low) else 0.0
            values.append(low + (rank - before - 0.5) / count * width)
        return values

    def quantile(self, fraction: float) -> float | None:
        """The nearest-rank quantile: the score of the smallest rank r with r/n >= fraction."""
        if not self.n:
            return None
        return self.at([min(self.n, max(1, math.ceil(fraction * self.n - 1e-9)))])[0]

    def evenly_spaced(self, n_lowest: int, size: int) -> list[float]:
        """About `size` evenly spaced scores of the `n_lowest` lowest (all of them if fewer), ascending."""
        n_lowest = min(n_lowest, self.n)
        if n_lowest <= size:
            return self.at(range(1, n_lowest + 1))
        return self.at(-(-i * n_lowest // size) for i in range(1, size + 1))


def quantile(histogram: Mapping[int, int], fraction: float) -> float | None:
    return Ranked(histogram).quantile(fraction)


def folder_of(path: str) -> str:
    """A path's directory with its trailing "/" ("" for a bare name), as text."""
    return path[: path.rfind("/") + 1]


@dataclass
class Summary:
    """Counts, histogram and per-directory counts [rows, scored, flagged, errors] of some rows."""

    n_rows: int = 0
    n_scored: int = 0
    n_flagged: int = 0
    n_errors: int = 0
    n_normal: int = 0
    histogram: Counter[int] = field(default_factory=Counter)
    folders: dict[str, list[int]] = field(default_factory=dict)

    def add(self, path: str, score: float | None, is_anomaly: bool | None, error: str | None) -> None:
        scored, flagged, failed = score is not None, is_anomaly is True, error is not None
        self.n_rows += 1
        self.n_errors += failed
        if score is not None:
            self.n_scored += 1
            self.n_flagged += flagged
            self.n_normal += is_anomaly is False
            self.histogram[score_bin(score)] += 1
        counts = self.folders.get(folder := folder_of(path))
        if counts is None:
            counts = self.folders[folder] = [0, 0, 0, 0]
        counts[0] += 1
        counts[1] += scored
        counts[2] += flagged
        counts[3] += failed

    def counts(self) -> dict[str, int]:
        return {"n_rows": self.n_rows, "n_scored": self.n_scored, "n_flagged": self.n_flagged,
                "n_errors": self.n_errors, "n_normal": self.n_normal}

    def merge(self, other: Summary, sign: int = 1) -> Summary:
        """Add `other` (sign=-1: subtract it) in place; entries that cancel out are dropped."""
        for name, value in other.counts().items():
            setattr(self, name, getattr(self, name) + sign * value)
        for key, value in other.histogram.items():
            if total := self.histogram[key] + sign * value:
                self.histogram[key] = total
            else:
                del self.histogram[key]
        for name, counts in other.folders.items():
            mine = self.folders.setdefault(name, [0, 0, 0, 0])
            for index, value in enumerate(counts):
                mine[index] += sign * value
            if not any(mine):
                del self.folders[name]
        return self

    def minus(self, other: Summary) -> Summary:
        return Summary().merge(self).merge(other, -1)

    @property
    def empty(self) -> bool:
        return not (any(self.counts().values()) or self.histogram or self.folders)


def summarize(rows: Iterable[Mapping[str, Any]]) -> Summary:
    summary = Summary()
    for row in rows:
        summary.add(row["path"], row.get("score"), row.get("is_anomaly"), row.get("error"))
    return summary


def _histogram_json(histogram: Mapping[int, int]) -> dict[str, int]:
    return {str(key): value for key, value in sorted(histogram.items())}


def histogram_of(stored: Mapping[str, Any] | None) -> Counter[int]:
    return Counter({int(key): int(value) for key, value in (stored or {}).items()})


_SHARD_COLUMNS = (ShardSummary.n_rows, ShardSummary.n_scored, ShardSummary.n_flagged, ShardSummary.n_errors,
                  ShardSummary.n_normal, ShardSummary.histogram, ShardSummary.folders)


def _shard_summary(row: ShardSummary | None) -> Summary:
    if row is None:
        return Summary()
    return Summary(row.n_rows, row.n_scored, row.n_flagged, row.n_errors, row.n_normal, histogram_of(row.histogram),
                   {name: [int(v) for v in counts] for name, counts in (row.folders or {}).items()})


def _upsert(session: Session, table: Any, rows: Sequence[dict[str, Any]], keys: Sequence[str],
            set_: Callable[[Any], dict[str, Any]] | None = None) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE: with `set_`, those values (they may name
    `excluded`); without, every other column from the new row."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    # One statement with many VALUES: an executemany would cost a round trip per row.
    insert = (postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)).values(list(rows))
    values = set_(insert.excluded) if set_ is not None else {
        column: insert.excluded[column] for column in rows[0] if column not in keys}
    session.execute(insert.on_conflict_do_update(index_elements=list(keys), set_=values))


def _store_shard(session: Session, job_id: int, shard_id: int, summary: Summary) -> None:
    _upsert(session, ShardSummary, [{
        "job_id": job_id, "shard_id": shard_id, **summary.counts(), "histogram": _histogram_json(summary.histogram),
        "folders": summary.folders}], ("job_id", "shard_id"))


_BINS_PG = text(
    "INSERT INTO job_score_bins (job_id, bin, n) SELECT :job_id, b, c "
    "FROM unnest(CAST(:bins AS bigint[]), CAST(:counts AS bigint[])) AS t(b, c) "
    "ON CONFLICT (job_id, bin) DO UPDATE SET n = job_score_bins.n + excluded.n")


def _add_bins(session: Session, job_id: int, histogram: Mapping[int, int]) -> None:
    """Add a histogram to the job's bins: one statement whatever the number of bins, in bin order
    (one lock order for all writers); bins that reach zero are deleted."""
    if not histogram:
        return
    keys = sorted(histogram)
    if session.get_bind().dialect.name == "postgresql":
        # Arrays keep the statement's text constant: no VALUES list of hundreds of rows compiled per close.
        session.execute(_BINS_PG, {"job_id": job_id, "bins": keys, "counts": [histogram[key] for key in keys]})
    else:
        # executemany of one cached statement, not _upsert's VALUES list: compiling a list of ~250
        # rows cost 8.8 ms a close against 1.2 ms (_upsert is for the handful of folders).
        insert = sqlite.insert(JobScoreBin)
        session.execute(insert.on_conflict_do_update(index_elements=["job_id", "bin"],
                                                     set_={"n": JobScoreBin.n + insert.excluded.n}),
                        [{"job_id": job_id, "bin": key, "n": histogram[key]} for key in keys])
    if any(value < 0 for value in histogram.values()):
        session.execute(delete(JobScoreBin).where(JobScoreBin.job_id == job_id, JobScoreBin.n <= 0))


def _apply(session: Session, job_id: int, delta: Summary) -> bool:
    """Add `delta` to a job's summary, its bins and its folders; False if the job has no summary."""
    counts = delta.counts()
    values: dict[str, Any] = {name: getattr(JobSummary, name) + value for name, value in counts.items()}
    values["updated_at"] = utcnow()
    updated = cast(CursorResult[Any], session.execute(update(JobSummary).where(JobSummary.job_id == job_id)
                                                     .values(**values)))
    if not updated.rowcount:
        return False
    _add_bins(session, job_id, delta.histogram)
    columns = ("n_rows", "n_scored", "n_flagged", "n_errors")
    rows = [{"job_id": job_id, "folder": name, **dict(zip(columns, counts, strict=True))}
            for name, counts in sorted(delta.folders.items())]  # sorted: one lock order for all writers
    _upsert(session, JobFolder, rows, ("job_id", "folder"),
            lambda excluded: {column: getattr(JobFolder, column) + excluded[column] for column in columns})
    if any(value < 0 for counts in delta.folders.values() for value in counts):
        session.execute(delete(JobFolder).where(JobFolder.job_id == job_id, JobFolder.n_rows <= 0))
    return True


def record_shard(session: Session, job_id: int, shard_id: int, new: Summary, *, final: bool) -> None:
    """What a shard's close just wrote (`summarize` of its rows, computed before the lock) replaces
    its earlier part of the job's summary. `final`: the shard closed done, and a done shard never
    runs again, so its part need not be kept apart. Call it after the job row's UPDATE in the same
    transaction, as the transaction's last statements: that lock orders the closers, and every
    statement after it lengthens the queue behind it."""
    previous = session.execute(
        delete(ShardSummary).where(ShardSummary.job_id == job_id, ShardSummary.shard_id == shard_id)
        .returning(*_SHARD_COLUMNS)).first()
    old = Summary() if previous is None else _shard_summary(ShardSummary(**previous._asdict()))
    if not final:
        _store_shard(session, job_id, shard_id, new)
    delta = new.minus(old)
    if delta.empty or _apply(session, job_id, delta):
        return
    # No summary: a job's first close starts it; a job with other rows (an older version wrote
    # them) waits for `build`, which reads them all.
    others = exists().where(Result.job_id == job_id, or_(Result.shard_id.is_(None), Result.shard_id != shard_id))
    if session.scalar(select(others)):
        return
    session.add(JobSummary(job_id=job_id, updated_at=utcnow()))
    session.flush()
    _apply(session, job_id, delta)


# --- rebuilding from the rows ---------------------------------------------------------------------


@dataclass
class Rebuilt:
    """A job's summary, and the parts kept apart of its shards that may close again (not done)."""

    job: Summary
    shards: dict[int, Summary]


def _open_shards(session: Session, job_id: int) -> set[int]:
    return set(session.scalars(select(Shard.id).where(Shard.job_id == job_id, Shard.status != ShardStatus.DONE)))


def rebuild(session: Session, job_id: int) -> Rebuilt:
    """The job's summary from its rows, in one pass and in memory that does not grow with them."""
    reopenable = _open_shards(session, job_id)
    total, shards = Summary(), {shard_id: Summary() for shard_id in reopenable}
    query = (select(Result.shard_id, Result.path, Result.score, Result.is_anomaly, Result.error)
             .where(Result.job_id == job_id).execution_options(yield_per=20_000))
    for shard_id, path, score, is_anomaly, error in session.execute(query):
        total.add(path, score, is_anomaly, error)
        if shard_id in reopenable:
            shards[shard_id].add(path, score, is_anomaly, error)
    return Rebuilt(total, {key: value for key, value in shards.items() if not value.empty})


def histograms(session: Session, job_ids: Sequence[int]) -> dict[int, Counter[int]]:
    """The score histograms (bin -> rows) of these jobs, from their bins; a job with none is left out."""
    found: dict[int, Counter[int]] = {}
    if job_ids:
        for job_id, key, count in session.execute(select(JobScoreBin.job_id, JobScoreBin.bin, JobScoreBin.n)
                                                  .where(JobScoreBin.job_id.in_(list(job_ids)))):
            found.setdefault(job_id, Counter())[int(key)] = int(count)
    return found


def histogram(session: Session, job_id: int) -> Counter[int]:
    """A job's score histogram (bin -> rows): a few thousand rows however many images it scored."""
    return histograms(session, [job_id]).get(job_id, Counter())


def stored(session: Session, job_id: int) -> Rebuilt | None:
    """The job's summary as stored, in the form `rebuild` returns; None if it has none."""
    job = session.get(JobSummary, job_id, populate_existing=True)
    if job is None:
        return None
    folders = {name: [int(a), int(b), int(c), int(d)] for name, a, b, c, d in session.execute(
        select(JobFolder.folder, JobFolder.n_rows, JobFolder.n_scored, JobFolder.n_flagged, JobFolder.n_errors)
        .where(JobFolder.job_id == job_id))}
    total = Summary(job.n_rows, job.n_scored, job.n_flagged, job.n_errors, job.n_normal, histogram(session, job_id),
                    folders)
    shards = {row.shard_id: _shard_summary(row) for row in session.scalars(
        select(ShardSummary).where(ShardSummary.job_id == job_id).execution_options(populate_existing=True))}
    return Rebuilt(total, {key: value for key, value in shards.items() if not value.empty})


def build(session: Session, job_id: int) -> bool:
    """(Re)build a job's summary from its rows, holding the job row's lock so that no shard closes
    meanwhile. False if the job is gone or is not a sharded one."""
    kind = session.scalar(select(Job.kind).where(Job.id == job_id).with_for_update())
    if kind not in (JobKind.SCORE, JobKind.EVALUATE):
        return False
    rebuilt = rebuild(session, job_id)
    for table in (ShardSummary, JobFolder, JobScoreBin, JobSummary):
        session.execute(delete(table).where(table.job_id == job_id))
    for shard_id, summary in sorted(rebuilt.shards.items()):
        _store_shard(session, job_id, shard_id, summary)
    session.add(JobSummary(job_id=job_id, **rebuilt.job.counts(), updated_at=utcnow()))
    _add_bins(session, job_id, rebuilt.job.histogram)
    session.add_all([JobFolder(job_id=job_id, folder=name, n_rows=c[0], n_scored=c[1], n_flagged=c[2], n_errors=c[3])
                     for name, c in sorted(rebuilt.job.folders.items())])
    session.flush()
    return True


def missing(session: Session, limit: int = 1000) -> list[int]:
    """Score and evaluate jobs with no summary, oldest first."""
    return list(session.scalars(select(Job.id).where(
        Job.kind.in_((JobKind.SCORE, JobKind.EVALUATE)), ~exists().where(JobSummary.job_id == Job.id))
        .order_by(Job.id).limit(limit)))
