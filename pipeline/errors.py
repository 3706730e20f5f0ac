"""The pipeline's error family: each is one line that names the file or key at fault and the fix.

Each also subclasses the builtin a caller would catch. The CLI prints any of them (and the
cache store's own ``CacheError``, which is never rewrapped) as one ``error:`` line.
"""


class KdcacheError(Exception):
    """Base class of the pipeline's errors."""


class ConfigError(KdcacheError, ValueError):
    """A config file or value that cannot be used; the message names the key."""


class DataError(KdcacheError, ValueError):
    """A data file that cannot be read, or holds no usable rows; the message names the file."""


class CheckpointError(KdcacheError, OSError):
    """A training checkpoint that cannot be read back; the message names the file."""
