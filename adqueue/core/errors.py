"""Errors a user can act on. The CLI prints them as one line on stderr, never as a traceback."""


class AdqueueError(Exception):
    """Base class: the message is meant for the person at the terminal."""


class ConfigError(AdqueueError):
    pass


class SourceError(AdqueueError):
    """A data source (folder, MVTec root, manifest) that cannot be read."""


class ImageError(AdqueueError):
    """One file that is not a decodable image. Becomes a result row with an error, not a crash."""


class ModelNotFound(AdqueueError):
    pass


class JobNotFound(AdqueueError):
    pass


class BackboneUnavailable(AdqueueError):
    """Pretrained weights are missing: we never fall back to a random initialization."""


class BrokerUnavailable(AdqueueError):
    pass


class ReadOnlyViolation(AdqueueError):
    """`adqueue sql` was asked to change data."""


class SchemaOutOfDate(AdqueueError):
    pass


class ModelUnavailable(AdqueueError):
    """A model file that is missing, unreadable or not what SQL says: no retry can help, so a job
    that needs it fails at once with this message."""


class JobStalled(AdqueueError):
    """`--wait` saw no progress and no live lease for too long."""

    exit_code = 3


class DatabaseUnreachable(AdqueueError):
    """`--wait` lost the database and it stayed away past the stall timeout."""

    exit_code = 4


class Interrupted(BaseException):
    """SIGTERM or SIGHUP in a process running a job itself (the embedded default).

    A BaseException, like KeyboardInterrupt, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int, name: str) -> None:
        super().__init__(name)
        self.signum = signum
        self.name = name
