"""kdcache's cache format: sharded, padding-free teacher outputs with a manifest.

Usable on its own: ``open_cache(path)`` reads a cache, ``CacheWriter`` makes one.
The format is described in docs/cache-format.md.
"""

from .errors import CacheError, CacheFormatError, CacheNotFoundError
from .fingerprint import Fingerprint, file_digest
from .manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, ShardEntry, TensorSpec, read_manifest
from .reader import Cache, open_cache
from .shard import ShardData, ShardRows
from .writer import CacheWriter

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Cache",
    "CacheError",
    "CacheFormatError",
    "CacheNotFoundError",
    "CacheWriter",
    "Fingerprint",
    "Manifest",
    "ShardData",
    "ShardEntry",
    "ShardRows",
    "TensorSpec",
    "file_digest",
    "open_cache",
    "read_manifest",
]
