"""One Settings object, built from command-line flags and ADQUEUE_* environment variables.

Precedence: an explicit flag, then the environment, then the default. An empty ADQUEUE_BROKER_URL
means "no broker" (the embedded default), so a shell can switch a queue off without unsetting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from adqueue.core.errors import ConfigError

ENV_PREFIX = "ADQUEUE_"
DEFAULT_DATA_DIR = "./adqueue-data"
DATABASE_FILE = "adqueue.db"  # the embedded database, in the data dir
DEFAULT_QUEUE = "gpu"
DEFAULT_SHARD_SIZE = 256
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_LEASE_S = 120
DEFAULT_RECONCILE_INTERVAL_S = 30
DEFAULT_MAX_FILE_MB = 512
DEFAULT_SQL_TIMEOUT_S = 60
DEFAULT_SQL_MAX_ROWS = 10_000
DEFAULT_NOTIFY_ATTEMPTS = 5
DEFAULT_NOTIFY_RETRY_DELAY_S = 2.0
DEFAULT_ALARM_ERROR_SHARE = 0.05
# Mixed precision for frozen backbones: auto = bfloat16 on CUDA where the GPU has it (else
# float16), none on the CPU; or one of them everywhere (the CPU too: how the numerics are checked).
AUTOCAST_CHOICES = ("auto", "bf16", "fp16", "off")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _env(name: str) -> str | None:
    value = os.environ.get(ENV_PREFIX + name)
    return value if value is not None and value.strip() != "" else None


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    broker_url: str | None
    queue: str = DEFAULT_QUEUE
    device: str = "auto"
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    batch_size: int = 32
    # A message not acknowledged within this long is handed to another worker (a crashed one's).
    visibility_timeout_s: int = 6 * 3600
    retry_delay_s: float = 5.0  # first retry of a failed shard; later ones back off x4
    # A run (shard, training, finishing, submission) holds its work this long past its last
    # renewal; renewals come with its progress (each batch), so a dead or hung worker's work is
    # taken back this long after it stopped. Stretched to 4x the slowest step a run has seen.
    lease_s: float = DEFAULT_LEASE_S
    # How often each worker's reconciler looks for expired leases, lost messages and jobs to end.
    reconcile_interval_s: float = DEFAULT_RECONCILE_INTERVAL_S
    # `--wait` gives up on a job with no progress and no live lease anywhere for this long.
    stall_timeout_s: float | None = None
    # A file bigger than this becomes an error row without being read (decompression bombs and
    # stray archives on a camera share).
    max_file_mb: float = DEFAULT_MAX_FILE_MB
    # Folders a manifest may point into besides its own (manifest paths elsewhere are refused).
    allowed_roots: tuple[Path, ...] = ()
    # `adqueue sql`: its own database URL (a read-only role), a time limit and a default row cap.
    sql_database_url: str | None = None
    sql_timeout_s: float = DEFAULT_SQL_TIMEOUT_S
    sql_max_rows: int = DEFAULT_SQL_MAX_ROWS
    # torch's intra-op threads in this process; None = torch's default (all cores). Set it where
    # several workers share a host, or on a busy machine where spinning threads only wait.
    torch_threads: int | None = None
    # Webhooks told of every job's end (a JSON POST; adqueue/jobs/notify.py), how many times each
    # is tried (the first retry after notify_retry_delay_s, then x4), and the web server's address
    # as people reach it, for the link to the job page.
    notify_urls: tuple[str, ...] = ()
    notify_attempts: int = DEFAULT_NOTIFY_ATTEMPTS
    notify_retry_delay_s: float = DEFAULT_NOTIFY_RETRY_DELAY_S
    public_url: str | None = None
    # The `errors` alarm: more than this share of a job's files could not be scored.
    alarm_error_share: float = DEFAULT_ALARM_ERROR_SHARE
    # The GPU path (each ADQUEUE_* variable of the same name; see README "Performance"): mixed
    # precision for frozen backbones (auto = bfloat16 on a CUDA device that has it, else float16;
    # nothing on the CPU, where it is slower without AMX and changes the scores), channels-last
    # tensors (CPU and CUDA: faster on both), pinned host batches with non-blocking copies (CUDA
    # only), JPEG decoding on the GPU (off unless set: measure it with benchmarks/gpu.py first),
    # and decode threads (None = one per core the process may use; 0 = decode in the scoring
    # thread, overlapping nothing).
    autocast: str = "auto"
    channels_last: bool = True
    pin_memory: bool = True
    gpu_decode: bool = False
    decode_threads: int | None = None

    @property
    def stall_after_s(self) -> float:
        return self.stall_timeout_s or 2 * self.lease_s + self.reconcile_interval_s

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)

    @property
    def embedded(self) -> bool:
        """No broker: the same runners a worker runs run in this process."""
        return self.broker_url is None

    @classmethod
    def load(
        cls,
        *,
        data_dir: str | Path | None = None,
        database_url: str | None = None,
        broker_url: str | None = None,
        queue: str | None = None,
        device: str | None = None,
    ) -> Settings:
        root = Path(data_dir or _env("DATA_DIR") or DEFAULT_DATA_DIR).expanduser().resolve()
        db = database_url or _env("DATABASE_URL") or sqlite_url(root / DATABASE_FILE)
        broker = broker_url if broker_url is not None else _env("BROKER_URL")
        if broker is not None and broker.strip() == "":
            broker = None
        attempts = _env("MAX_ATTEMPTS")
        batch = _env("BATCH_SIZE")
        visibility = _env("VISIBILITY_TIMEOUT")
        retry_delay = _env("RETRY_DELAY")
        threads = _env("TORCH_THREADS")
        lease = _env("LEASE")
        interval = _env("RECONCILE_INTERVAL")
        stall = _env("STALL_TIMEOUT")
        max_file = _env("MAX_FILE_MB")
        roots = _env("ALLOWED_ROOTS")
        sql_timeout = _env("SQL_TIMEOUT")
        sql_rows = _env("SQL_MAX_ROWS")
        notify_attempts = _env("NOTIFY_ATTEMPTS")
        notify_delay = _env("NOTIFY_RETRY_DELAY")
        error_share = _env("ALARM_ERROR_SHARE")
        decode_threads = _env("DECODE_THREADS")
        settings = cls(
            data_dir=root,
            database_url=db,
            broker_url=broker,
            queue=queue or _env("QUEUE") or DEFAULT_QUEUE,
            device=device or _env("DEVICE") or "auto",
            max_attempts=_positive("ADQUEUE_MAX_ATTEMPTS", attempts, DEFAULT_MAX_ATTEMPTS),
            batch_size=_positive("ADQUEUE_BATCH_SIZE", batch, 32),
            visibility_timeout_s=_positive("ADQUEUE_VISIBILITY_TIMEOUT", visibility, 6 * 3600),
            retry_delay_s=_positive("ADQUEUE_RETRY_DELAY", retry_delay, 5.0, float),
            torch_threads=None if threads is None else _positive("ADQUEUE_TORCH_THREADS", threads, 1),
            lease_s=_positive("ADQUEUE_LEASE", lease, DEFAULT_LEASE_S, float),
            reconcile_interval_s=_positive("ADQUEUE_RECONCILE_INTERVAL", interval, DEFAULT_RECONCILE_INTERVAL_S, float),
            stall_timeout_s=None if stall is None else _positive("ADQUEUE_STALL_TIMEOUT", stall, 1.0, float),
            max_file_mb=_positive("ADQUEUE_MAX_FILE_MB", max_file, DEFAULT_MAX_FILE_MB, float),
            allowed_roots=tuple(Path(p).expanduser().resolve() for p in (roots or "").split(os.pathsep) if p),
            sql_database_url=_env("SQL_DATABASE_URL"),
            sql_timeout_s=_positive("ADQUEUE_SQL_TIMEOUT", sql_timeout, DEFAULT_SQL_TIMEOUT_S, float),
            sql_max_rows=_positive("ADQUEUE_SQL_MAX_ROWS", sql_rows, DEFAULT_SQL_MAX_ROWS),
            notify_urls=tuple(u.strip() for u in (_env("NOTIFY_URL") or "").split(",") if u.strip()),
            notify_attempts=_positive("ADQUEUE_NOTIFY_ATTEMPTS", notify_attempts, DEFAULT_NOTIFY_ATTEMPTS),
            notify_retry_delay_s=_positive("ADQUEUE_NOTIFY_RETRY_DELAY", notify_delay, DEFAULT_NOTIFY_RETRY_DELAY_S,
                                           float),
            public_url=(_env("PUBLIC_URL") or "").rstrip("/") or None,
            alarm_error_share=_positive("ADQUEUE_ALARM_ERROR_SHARE", error_share, DEFAULT_ALARM_ERROR_SHARE, float),
            autocast=(_env("AUTOCAST") or "auto").lower(),
            channels_last=_flag("ADQUEUE_CHANNELS_LAST", _env("CHANNELS_LAST"), True),
            pin_memory=_flag("ADQUEUE_PIN_MEMORY", _env("PIN_MEMORY"), True),
            gpu_decode=_flag("ADQUEUE_GPU_DECODE", _env("GPU_DECODE"), False),
            decode_threads=None if decode_threads is None else _count("ADQUEUE_DECODE_THREADS", decode_threads),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        if not (self.database_url.startswith("sqlite") or self.database_url.startswith("postgresql")):
            raise ConfigError(
                f"unsupported database URL {self.database_url!r}: use sqlite:///PATH or "
                "postgresql+psycopg://USER@HOST/DB"
            )
        if self.broker_url is not None and not self.broker_url.startswith(("redis://", "rediss://")):
            raise ConfigError(f"unsupported broker URL {self.broker_url!r}: use redis://HOST:PORT/DB")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"unknown device {self.device!r}: use auto, cpu, cuda or cuda:N")
        for url in self.notify_urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"ADQUEUE_NOTIFY_URL: {url!r} is not an http:// or https:// URL")
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise ConfigError(f"ADQUEUE_PUBLIC_URL: {self.public_url!r} is not an http:// or https:// URL")
        if self.autocast not in AUTOCAST_CHOICES:
            raise ConfigError(f"ADQUEUE_AUTOCAST must be one of {', '.join(AUTOCAST_CHOICES)}, not {self.autocast!r}")

    def require_data_dir(self) -> None:
        """For verbs that read or steer what is there: a data dir that does not exist, holding the
        database (no --db elsewhere), is refused rather than created empty and answered from (`cd
        /tmp && adqueue jobs` listed nothing, exit 0, and left a new ./adqueue-data behind)."""
        if self.data_dir.exists() or self.database_url != sqlite_url(self.data_dir / DATABASE_FILE):
            return
        raise ConfigError(f"no adqueue data dir at {self.data_dir}: run from the folder that holds it, or pass "
                          "--data-dir DIR (ADQUEUE_DATA_DIR) or --db URL (ADQUEUE_DATABASE_URL); only the verbs "
                          "that write (train, score, evaluate, demo, db upgrade, worker) create one")

    def with_overrides(self, **changes: Any) -> Settings:
        updated = replace(self, **changes)
        updated.validate()
        return updated

    def export_env(self) -> dict[str, str]:
        """The environment that makes a child process (a worker) load these same settings."""
        env = {
            "ADQUEUE_DATA_DIR": str(self.data_dir),
            "ADQUEUE_DATABASE_URL": self.database_url,
            "ADQUEUE_BROKER_URL": self.broker_url or "",
            "ADQUEUE_QUEUE": self.queue,
            "ADQUEUE_DEVICE": self.device,
            "ADQUEUE_MAX_ATTEMPTS": str(self.max_attempts),
            "ADQUEUE_BATCH_SIZE": str(self.batch_size),
            "ADQUEUE_VISIBILITY_TIMEOUT": str(self.visibility_timeout_s),
            "ADQUEUE_RETRY_DELAY": str(self.retry_delay_s),
            "ADQUEUE_LEASE": str(self.lease_s),
            "ADQUEUE_RECONCILE_INTERVAL": str(self.reconcile_interval_s),
            "ADQUEUE_MAX_FILE_MB": str(self.max_file_mb),
            "ADQUEUE_ALLOWED_ROOTS": os.pathsep.join(str(p) for p in self.allowed_roots),
        }
        env.update({
            "ADQUEUE_NOTIFY_URL": ",".join(self.notify_urls),
            "ADQUEUE_NOTIFY_ATTEMPTS": str(self.notify_attempts),
            "ADQUEUE_NOTIFY_RETRY_DELAY": str(self.notify_retry_delay_s),
            "ADQUEUE_PUBLIC_URL": self.public_url or "",
            "ADQUEUE_ALARM_ERROR_SHARE": str(self.alarm_error_share),
        })
        if self.stall_timeout_s is not None:
            env["ADQUEUE_STALL_TIMEOUT"] = str(self.stall_timeout_s)
        if self.torch_threads is not None:
            env["ADQUEUE_TORCH_THREADS"] = str(self.torch_threads)
        env.update(ADQUEUE_AUTOCAST=self.autocast, ADQUEUE_CHANNELS_LAST=str(int(self.channels_last)),
                   ADQUEUE_PIN_MEMORY=str(int(self.pin_memory)), ADQUEUE_GPU_DECODE=str(int(self.gpu_decode)))
        if self.decode_threads is not None:
            env["ADQUEUE_DECODE_THREADS"] = str(self.decode_threads)
        return env


def sqlite_url(path: Path) -> str:
    """The URL of a SQLite file at any path: a `?`, `%` or `#` in a folder name would otherwise be
    read as URL syntax and put the database somewhere else (two data dirs could share one)."""
    if not any(char in str(path) for char in "?%#"):
        return f"sqlite:///{path}"
    from sqlalchemy.engine import URL

    return URL.create("sqlite", database="file:" + quote(str(path)), query={"uri": "true"}).render_as_string()


def _flag(name: str, raw: str | None, default: bool) -> bool:
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise ConfigError(f"{name} must be 1 or 0 (on/off, true/false), not {raw!r}")


def _count(name: str, raw: str) -> int:
    """A whole number >= 0."""
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{name} must be a whole number (0 or more), not {raw!r}")
    return value


def _positive(name: str, raw: str | None, default: float, cast: type = int) -> Any:
    """`raw` parsed with `cast` (int or float) and checked > 0; `default` when unset."""
    if raw is None:
        return default
    what = "integer" if cast is int else "number"
    try:
        value = cast(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{name} must be a positive {what}, not {raw!r}")
    return value
