"""The SQL schema people query: models, jobs, shards, results, metrics.

Table and column names are a public contract (users write SQL against them): add columns freely,
never rename. Every change goes through an Alembic revision in migrations/versions.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum, nonmember
from typing import Any, ClassVar, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from adqueue.core.clock import utcnow

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        list[Any]: JSON,
        datetime: DateTime(timezone=True),
    }


class JobKind(StrEnum):
    TRAIN = "train"
    SCORE = "score"
    EVALUATE = "evaluate"


class JobStatus(StrEnum):
    """The job states; store/transitions.py holds every transition between them."""

    SUBMITTING = "submitting"  # shards are still being written under the submitter's lease
    QUEUED = "queued"
    RUNNING = "running"
    FINISHING = "finishing"  # the final step (metrics) runs, or waits for a run, under a lease
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ACTIVE = nonmember((SUBMITTING, QUEUED, RUNNING, FINISHING))
    ENDED = nonmember((DONE, FAILED, CANCELLED))


class ShardStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"  # held by the run in shards.run_id until shards.lease_expires_at
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    OPEN = nonmember((QUEUED, RUNNING))
    REOPENABLE = nonmember((FAILED, CANCELLED))


class RunKind(StrEnum):
    """What a run holds a lease on: a shard, or a job's training, finishing or submission."""

    SHARD = "shard"
    TRAIN = "train"
    FINISH = "finish"
    SUBMIT = "submit"


class RunOutcome(StrEnum):
    """How a run ended, as `runs.outcome` records it."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    RELEASED = "released"  # failed in a way worth another attempt
    INTERRUPTED = "interrupted"  # the process was told to stop (signal); not counted as an attempt
    EXPIRED = "expired"  # its lease ran out (the worker died or hung); the reconciler took it back
    LOST = "lost"  # it found its lease gone (expired and taken over, or cancelled) and wrote nothing
    CANCELLED = "cancelled"


class ReviewVerdict(StrEnum):
    """What a person said about a flagged image in the morning review (`adqueue serve`)."""

    DEFECT = "defect"
    FALSE_ALARM = "false_alarm"


E = TypeVar("E", bound=StrEnum)


class EnumText(TypeDecorator[E]):
    """A state column: plain text in SQL (people query it as such), the enum in Python. Writing a
    value that is not one of the enum's is refused before it reaches the database."""

    impl = String
    cache_ok = True

    def __init__(self, enum: type[E], length: int = 20) -> None:
        super().__init__(length)
        self.enum = enum

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else str(self.enum(value))

    def process_result_value(self, value: Any, dialect: Dialect) -> E | None:
        return None if value is None else self.enum(value)


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_models_name_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int]
    detector: Mapped[str] = mapped_column(String(50))
    backbone: Mapped[str | None] = mapped_column(String(100))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    artifact_path: Mapped[str] = mapped_column(Text)
    threshold: Mapped[float | None] = mapped_column(Float)  # the one used to flag images
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    train_job_id: Mapped[int | None] = mapped_column(Integer)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64))  # checked each time the file is loaded


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status", "status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[JobKind] = mapped_column(EnumText(JobKind))
    status: Mapped[JobStatus] = mapped_column(EnumText(JobStatus), default=JobStatus.SUBMITTING)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    source: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    n_total: Mapped[int] = mapped_column(Integer, default=0)
    n_done: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    phase: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    # The Celery queue its messages go to; NULL for a job run by the submitting process (embedded).
    queue: Mapped[str | None] = mapped_column(String(200))
    # Set once every shard is written: a job without it has an unfinished submission to resume.
    submitted_at: Mapped[datetime | None]
    # The run (train, finish or submit) holding the job's lease: the fencing token of its writes.
    run_id: Mapped[int | None] = mapped_column(Integer)
    lease_expires_at: Mapped[datetime | None]
    # When its last message (train or finish) was sent; NULL while one is owed.
    enqueued_at: Mapped[datetime | None]
    # Files left out by `score --skip-scored`: scored before by this model version, unchanged since.
    n_skipped: Mapped[int] = mapped_column(Integer, default=0)
    # Files its shards could not write (a full disk): their rows keep their scores without them.
    n_heatmaps_unwritten: Mapped[int] = mapped_column(Integer, default=0)
    n_eval_maps_unwritten: Mapped[int] = mapped_column(Integer, default=0)
    unwritten_reason: Mapped[str | None] = mapped_column(Text)  # the last one's, e.g. "No space left on device"
    # What was wrong with the job when it last ended ([{"kind", "message"}], adqueue/jobs/alarms.py) and
    # the drift statistic of its normal scores; written once per end, by whoever notifies it.
    alarms: Mapped[list[Any] | None] = mapped_column(JSON)
    drift_ks: Mapped[float | None] = mapped_column(Float)
    # The notification of its end (ADQUEUE_NOTIFY_URL): settled at notified_at (sent, or given up);
    # owed while that is older than finished_at. notify_after: no attempt before then (a sender's
    # hold, or the backoff); notification: the payload and the URLs that took it.
    notified_at: Mapped[datetime | None]
    notify_attempts: Mapped[int] = mapped_column(Integer, default=0)
    notify_after: Mapped[datetime | None]
    notification: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Shard(Base):
    __tablename__ = "shards"
    __table_args__ = (
        UniqueConstraint("job_id", "seq", name="uq_shards_job_seq"),
        Index("ix_shards_job_status", "job_id", "status"),
        Index("ix_shards_status_lease", "status", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int]
    status: Mapped[ShardStatus] = mapped_column(EnumText(ShardStatus), default=ShardStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    n_items: Mapped[int] = mapped_column(Integer, default=0)
    # [[path, label, defect, mask], ...]: small enough per shard, and it keeps the
    # submitting side free of a second table with one row per image.
    items: Mapped[list[Any]] = mapped_column(default=list)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    run_id: Mapped[int | None] = mapped_column(Integer)  # the run holding it, then the one that closed it
    lease_expires_at: Mapped[datetime | None]
    enqueued_at: Mapped[datetime | None]  # when its last message was sent (or falls due); NULL: one is owed
    n_ok: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)


class Run(Base):
    """One attempt at a unit of work under a lease: who ran what, when, and how it ended."""

    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_job", "job_id"), Index("ix_runs_shard", "shard_id"))

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[RunKind] = mapped_column(EnumText(RunKind))
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    shard_id: Mapped[int | None] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(200))
    outcome: Mapped[RunOutcome] = mapped_column(EnumText(RunOutcome), default=RunOutcome.RUNNING)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)


class Result(Base):
    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint("job_id", "path", name="uq_results_job_path"),
        Index("ix_results_job_score", "job_id", "score"),
        Index("ix_results_model", "model_id"),
        Index("ix_results_model_path", "model_id", "path"),
        # The review's pages: flagged images worst first (keyset on score, id), and error rows by
        # path. Partial, so they hold ~1% of a night, and the predicates are written exactly as
        # the queries write them (SQLite uses a partial index only for a literal match).
        Index("ix_results_flagged", "job_id", "score", "id",
              sqlite_where=text("is_anomaly IS 1"), postgresql_where=text("is_anomaly IS true")),
        Index("ix_results_errors", "job_id", "path",
              sqlite_where=text("error IS NOT NULL"), postgresql_where=text("error IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    shard_id: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    score: Mapped[float | None] = mapped_column(Float)
    is_anomaly: Mapped[bool | None] = mapped_column(Boolean)
    heatmap_path: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    label: Mapped[int | None] = mapped_column(Integer)  # ground truth, evaluate jobs only
    defect: Mapped[str | None] = mapped_column(String(100))
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # every score a detector offers
    scored_at: Mapped[datetime] = mapped_column(default=utcnow)
    run_id: Mapped[int | None] = mapped_column(Integer)  # the shard run that wrote it
    # The file as it was read: with sha256, what `score --skip-scored` recognizes unchanged files by.
    file_size: Mapped[int | None] = mapped_column(BigInteger)
    file_mtime_ns: Mapped[int | None] = mapped_column(BigInteger)


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_model", "model_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float | None] = mapped_column(Float)
    dataset: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Review(Base):
    """One verdict on one result; a result may be reviewed again, and its latest verdict counts."""

    __tablename__ = "reviews"
    __table_args__ = (Index("ix_reviews_result", "result_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    result_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("results.id", ondelete="CASCADE"))
    verdict: Mapped[ReviewVerdict] = mapped_column(EnumText(ReviewVerdict))
    reviewer: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobSummary(Base):
    """A score or evaluate job's result rows summed up (store/summaries.py keeps it current as shards
    close, in the same transaction): what the pages and verbs read instead of the rows. Its score
    histogram is job_score_bins."""

    __tablename__ = "job_summaries"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    n_rows: Mapped[int] = mapped_column(BigInteger, default=0)
    n_scored: Mapped[int] = mapped_column(BigInteger, default=0)
    n_flagged: Mapped[int] = mapped_column(BigInteger, default=0)
    n_errors: Mapped[int] = mapped_column(BigInteger, default=0)
    n_normal: Mapped[int] = mapped_column(BigInteger, default=0)  # scored and not flagged
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ShardSummary(Base):
    """What a shard's last close wrote, kept while the shard may close again (it is not done): the
    part of its job's summary that its next close replaces. `folders`: directory -> [rows, scored,
    flagged, errors]."""

    __tablename__ = "shard_summaries"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    shard_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    n_rows: Mapped[int] = mapped_column(Integer, default=0)
    n_scored: Mapped[int] = mapped_column(Integer, default=0)
    n_flagged: Mapped[int] = mapped_column(Integer, default=0)
    n_errors: Mapped[int] = mapped_column(Integer, default=0)
    n_normal: Mapped[int] = mapped_column(Integer, default=0)
    histogram: Mapped[dict[str, Any]] = mapped_column(default=dict)
    folders: Mapped[dict[str, Any]] = mapped_column(default=dict)


class JobFolder(Base):
    """A job's result rows per directory (the path up to its last "/"), kept with its summary."""

    __tablename__ = "job_folders"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    folder: Mapped[str] = mapped_column(Text, primary_key=True)
    n_rows: Mapped[int] = mapped_column(BigInteger, default=0)
    n_scored: Mapped[int] = mapped_column(BigInteger, default=0)
    n_flagged: Mapped[int] = mapped_column(BigInteger, default=0)
    n_errors: Mapped[int] = mapped_column(BigInteger, default=0)


class JobScoreBin(Base):
    """One bin of a job's score histogram (summaries.score_bin): how many of its rows scored in it.
    A row per bin, so that a shard's close adds its own few hundred bins and rewrites nothing else."""

    __tablename__ = "job_score_bins"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    bin: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    n: Mapped[int] = mapped_column(BigInteger)
