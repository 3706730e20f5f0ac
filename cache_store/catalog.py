"""Managing caches under a root: list, describe, remove, copy between roots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from .errors import CacheBusyError, CacheCorruptError, CacheFormatError, CacheNotFoundError
from .manifest import MANIFEST_NAME, PLAIN_NAME, SHARD_ENTRY_NAME, ShardEntry
from .reader import Cache, open_cache, verify_cache
from .shard import file_problem, verify_shard
from .storage import Location
from .writer import WRITERS_DIR, live_writers


@dataclass(frozen=True)
class CacheListing:
    key: str
    complete: bool
    rows: int  # committed rows (all of them for a complete cache)
    bytes: int
    created: datetime | None  # when the manifest (or, for a partial cache, the directory) was written
    teacher: str
    dataset: str
    url: str


def describe(location: Location) -> CacheListing:
    """What is known about the cache directory at ``location``, complete or partial."""
    if location.exists(MANIFEST_NAME):
        manifest = Cache(location).manifest
        teacher = manifest.metadata.get("teacher", "")
        return CacheListing(
            key=manifest.key, complete=True, rows=manifest.rows, bytes=manifest.bytes,
            created=location.modified(MANIFEST_NAME),
            teacher=str(teacher.get("source", "") if isinstance(teacher, dict) else teacher),
            dataset=str(manifest.metadata.get("dataset", "")), url=str(location),
        )  # fmt: skip
    entries = _committed_entries(location)
    return CacheListing(
        key=location.name, complete=False, rows=sum(e.rows for e in entries), bytes=sum(e.bytes for e in entries),
        created=location.modified(""), teacher="", dataset="", url=str(location),
    )  # fmt: skip


def _committed_entries(location: Location) -> list[ShardEntry]:
    names = [f"{split}/{shard}/{SHARD_ENTRY_NAME}" for split in location.list_dirs() if not split.startswith(".")
             for shard in location.list_dirs(split)]  # fmt: skip
    present = [n for n in names if location.exists(n)]
    return [ShardEntry.from_raw(json.loads(data), n) for n, data in location.read_many(present).items()]


def is_cache_dir(location: Location) -> bool:
    """Whether ``location`` holds a cache, complete or partial (and not, say, a whole cache root)."""
    return location.exists(MANIFEST_NAME) or location.exists(WRITERS_DIR) or bool(_committed_entries(location))


def list_caches(root, **storage_options) -> list[CacheListing]:
    """Every cache directory under ``root``, complete or partial, by key."""
    base = Location(root, **storage_options)
    return [describe(base / name) for name in base.list_dirs() if not name.startswith(".")]


def remove_cache(location, *, force: bool = False, **storage_options) -> None:
    """Delete a cache directory.

    Raises:
        CacheNotFoundError: nothing there.
        CacheBusyError: a partial cache whose writer may still be running (unless ``force``).
    """
    location = location if isinstance(location, Location) else Location(location, **storage_options)
    if not is_cache_dir(location):
        raise CacheNotFoundError(f"no cache at {location} (no manifest, shard or writer there); nothing removed")
    writers = live_writers(location)
    if writers and not location.exists(MANIFEST_NAME) and not force:
        raise CacheBusyError(f"{location} is being written by {', '.join(writers)}; use --force to remove it anyway")
    location.remove()


def push_cache(source, dest_root, **storage_options) -> tuple[Cache, bool]:
    """Copy a complete cache to ``<dest_root>/<key>`` and verify it there; returns (copy, copied).

    Files are checked against their checksums as they are read, shard entries and the
    manifest are written after the data they describe, and the copy is verified on arrival.
    An existing complete copy is reused.

    Raises:
        CacheCorruptError: the source is damaged, or the copy does not verify.
    """
    src = open_cache(source)
    dest = Location(dest_root, **storage_options) / src.key
    if dest.exists(MANIFEST_NAME):
        if verify_cache(dest):
            raise CacheCorruptError(f"{dest} already holds a damaged copy; remove it with `kdcache cache rm` first")
        return open_cache(dest), False
    for split in src.manifest.splits.values():
        for entry in split.shards:
            if dest.exists(f"{entry.path}/{SHARD_ENTRY_NAME}"):
                continue
            staging = dest.staging_dir(entry.path.replace("/", "-"))
            blobs = src.location.read_many([f"{entry.path}/{name}" for name in entry.files])
            for name, recorded in entry.files.items():
                data = blobs[f"{entry.path}/{name}"]
                problem = file_problem(name, data, recorded)
                if problem:
                    raise CacheCorruptError(f"shard {entry.path} of {src.location}: {problem}")
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                (staging / name).write_bytes(data)
            (staging / SHARD_ENTRY_NAME).write_bytes(src.location.read_bytes(f"{entry.path}/{SHARD_ENTRY_NAME}"))
            dest.commit_dir(staging, entry.path, last=SHARD_ENTRY_NAME)
    for name, files in src.manifest.attachments.items():
        for relative, recorded in files.items():
            data = src.location.read_bytes(f"{name}/{relative}")
            problem = file_problem(relative, data, recorded)
            if problem:
                raise CacheCorruptError(f"attachment {name} of {src.location}: {problem}")
            dest.write_bytes(f"{name}/{relative}", data)
    shards = [entry for split in src.manifest.splits.values() for entry in split.shards]
    bad = [entry.path for entry in shards if verify_shard(dest, entry)]
    if bad:
        raise CacheCorruptError(f"the copy at {dest} does not verify: shards {bad}")
    dest.write_bytes(MANIFEST_NAME, src.location.read_bytes(MANIFEST_NAME))
    return open_cache(dest), True


NAMES_DIR = ".names"


def name_cache(root, name: str, key: str, *, record: dict | None = None, **storage_options) -> None:
    """Record ``<root>/<key>`` as the cache called ``name`` (an experiment's name), replacing any earlier one.

    Args:
        record: JSON kept beside the key (what the caller needs to trust the name later).
    """
    if not PLAIN_NAME.fullmatch(name):
        raise ValueError(f"cache name {name!r} is not a plain name")
    payload = json.dumps({"key": key, "record": record or {}}, indent=1, sort_keys=True).encode()
    Location(root, **storage_options).write_bytes(f"{NAMES_DIR}/{name}.json", payload)


def named_cache(root, name: str, **storage_options) -> tuple[Location, dict] | None:
    """The cache last recorded as ``name`` under ``root`` and the record kept with it, or None.

    Raises:
        CacheFormatError: the name's file is not one ``name_cache`` wrote.
    """
    base = Location(root, **storage_options)
    where = f"{base}/{NAMES_DIR}/{name}.json"
    try:
        raw = json.loads(base.read_bytes(f"{NAMES_DIR}/{name}.json"))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise CacheFormatError(f"{where} is not valid JSON ({e})") from None
    key = raw.get("key") if isinstance(raw, dict) else None
    if not isinstance(key, str) or not PLAIN_NAME.fullmatch(key):
        raise CacheFormatError(f"{where} names no plain cache key (got {key!r})")
    return base / key, raw.get("record", {})
