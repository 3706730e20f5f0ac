"""The error family raised by the cache store.

Each error also subclasses the builtin a caller would naturally catch, so code that
knows nothing about kdcache (``except FileNotFoundError``) still works.
"""


class CacheError(Exception):
    """Base class: the CLI turns any CacheError into one line and exit code 1."""


class CacheNotFoundError(CacheError, FileNotFoundError):
    """No committed cache (no manifest) at the given location."""


class CacheFormatError(CacheError, ValueError):
    """A manifest or shard that this reader cannot accept (version, paths, schema)."""


class CacheCorruptError(CacheError, IOError):
    """A shard file that is missing or whose bytes do not match its recorded checksum."""


class CacheBusyError(CacheError, PermissionError):
    """A partial cache whose writer may still be running."""
