"""kdcache's cache format: sharded, padding-free, verified teacher outputs with a manifest.

Usable on its own: ``open_cache(path_or_url)`` reads a cache (with dask views for
inspection), ``CacheWriter`` makes one, ``verify_cache`` checks one, and ``catalog``
lists, removes and copies caches. The format is described in docs/cache-format.md.
"""

from .catalog import CacheListing, describe, list_caches, name_cache, named_cache, push_cache, remove_cache
from .errors import CacheBusyError, CacheCorruptError, CacheError, CacheFormatError, CacheNotFoundError
from .fingerprint import Fingerprint, file_digest
from .manifest import FORMAT_VERSION, MANIFEST_NAME, STRING, ColumnSpec, Manifest, ShardEntry, TensorSpec
from .reader import Cache, open_cache, verify_cache
from .shard import ShardData, ShardRows
from .storage import Location
from .writer import BackgroundWriter, CacheWriter, ShardTask

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "BackgroundWriter",
    "Cache",
    "CacheBusyError",
    "CacheCorruptError",
    "CacheError",
    "CacheFormatError",
    "CacheListing",
    "CacheNotFoundError",
    "CacheWriter",
    "STRING",
    "ColumnSpec",
    "Fingerprint",
    "Location",
    "Manifest",
    "ShardData",
    "ShardEntry",
    "ShardRows",
    "ShardTask",
    "TensorSpec",
    "describe",
    "file_digest",
    "list_caches",
    "name_cache",
    "named_cache",
    "open_cache",
    "push_cache",
    "remove_cache",
    "verify_cache",
]
