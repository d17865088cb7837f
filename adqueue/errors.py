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
