"""CacheWriter: fills a cache shard by shard; resumable, and safe beside other writers.

The shard layout depends only on the row counts and ``shard_rows``: shard k of a split
holds rows [k * shard_rows, (k + 1) * shard_rows). So a killed run, a second run of the
same key, or N cooperating processes (``num_shards``/``shard_index``) all agree on what
each shard holds; each skips the shards already committed, and whoever finds every shard
committed writes the manifest.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .distribution import PerToken, SparseSpec
from .errors import CacheCorruptError, CacheError, CacheFormatError
from .manifest import (
    MANIFEST_NAME,
    SHARD_ENTRY_NAME,
    ColumnSpec,
    FileEntry,
    Manifest,
    ShardEntry,
    SplitEntry,
    TensorSpec,
)
from .shard import ShardRows, build_shard, check_rows, checksum, read_shard
from .storage import Location

WRITERS_DIR = ".writers"
STAGING_DIR = ".staging"


@dataclass(frozen=True)
class ShardTask:
    """One shard to fill: rows [row_start, row_end) of ``split``."""

    split: str
    index: int
    row_start: int
    row_end: int

    @property
    def path(self) -> str:
        return f"{self.split}/shard-{self.index:05d}"


class CacheWriter:
    """Writes one cache: ``pending()`` yields the shards still to fill, ``write_shard`` commits
    each, ``finish`` writes the manifest once every shard is committed.

    Args:
        location: the cache's directory (local path, URL or Location), by convention ``<root>/<key>``.
        key: the content key the caller computed for this cache.
        columns: the per-example columns of rows.arrow beside example_id, input_ids and length
            (labels, logits: what the caller stores per example).
        tensors: the ragged tensors each example carries (hidden states, attention maps).
        distribution: how the teacher's per-token distributions are stored, when each example carries one
            (a causal LM's next-token distributions); stored where the tensors are.
        split_rows: rows per split, in the order they are written.
        tensor_splits: the splits whose shards hold the tensors (None: all); the others hold rows only.
        shard_rows: rows per shard.
        metadata: JSON recorded in the manifest (teacher, dataset, capture spec).
        producer: JSON recorded in every shard entry: how this writer computes values (the
            teacher's precision, say). All shards of a cache must have the same producer, so a
            resumed or rival writer whose producer differs from a committed shard's is refused.

    Raises:
        CacheError: the location already holds a complete cache.
    """

    def __init__(self, location, *, key: str, columns: list[ColumnSpec], tensors: list[TensorSpec],
                 split_rows: dict[str, int], tensor_splits: tuple[str, ...] | None = None, shard_rows: int = 1024,
                 metadata: dict | None = None, producer: dict | None = None,
                 distribution: SparseSpec | None = None):  # fmt: skip
        self.location = location if isinstance(location, Location) else Location(location)
        if self.location.exists(MANIFEST_NAME):
            raise CacheError(f"{self.location} already holds a complete cache; refusing to overwrite it")
        if shard_rows <= 0:
            raise ValueError(f"shard_rows must be > 0; got {shard_rows!r}")
        self.key, self.columns, self.shard_rows = key, tuple(columns), shard_rows
        self.specs = {spec.name: spec for spec in tensors}
        self.distribution = distribution
        start = distribution.start_column if distribution is not None else None
        if start is not None and start not in {c.name for c in self.columns}:
            raise ValueError(f"the distribution's start_column {start!r} is not among the row columns")
        self.tensor_splits = tuple(split_rows) if tensor_splits is None else tuple(tensor_splits)
        self.metadata, self.producer = metadata or {}, dict(producer or {})
        self.damaged: list[str] = []  # committed shards found damaged by pending(), removed to be recomputed
        self.tasks = [
            ShardTask(split, k, start, min(start + shard_rows, rows))
            for split, rows in split_rows.items()
            for k, start in enumerate(range(0, rows, shard_rows))
        ]
        self._heartbeat = f"{WRITERS_DIR}/{os.getpid()}@{socket.gethostname()}"
        self._beat()

    def _beat(self) -> None:
        """Mark this writer alive (``cache rm`` refuses to delete a cache with a live writer)."""
        record = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        self.location.write_bytes(self._heartbeat, json.dumps(record).encode())

    def is_committed(self, task: ShardTask) -> bool:
        return self.location.exists(f"{task.path}/{SHARD_ENTRY_NAME}")

    def pending(self, *, num_shards: int = 1, shard_index: int = 0) -> list[ShardTask]:
        """The shards this writer should fill: every ``num_shards``-th from ``shard_index``, not yet
        committed, or committed but damaged.

        A committed shard is trusted only when its entry parses and describes that shard,
        and each of its files has the recorded size (a cheap check: one listing; the
        checksums are verified whenever the shard is read). A damaged one (a power loss
        before its data reached the disk, say) is removed, to be computed again, and noted
        in ``damaged``. Writers running side by side should check ``is_committed`` again
        just before computing a shard, to skip what another finished meanwhile.

        Raises:
            CacheFormatError: a committed shard was computed by another producer (precision).
        """
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index must be in [0, {num_shards}); got {shard_index!r}")
        todo = []
        for task in self.tasks[shard_index::num_shards]:
            if not self.is_committed(task):
                todo.append(task)
                continue
            _, problem = self.committed_entry(task)
            if problem is not None:
                self.damaged.append(f"{task.path}: {problem}")
                self.location.remove(task.path)
                todo.append(task)
        return todo

    def committed_entry(self, task: ShardTask) -> tuple[ShardEntry | None, str | None]:
        """The committed shard's entry, and why the shard cannot be trusted (None when it can).

        Raises:
            CacheFormatError: the shard was computed by another producer than this writer.
        """
        try:
            entry = self._read_entry(task)
        except (ValueError, CacheFormatError, FileNotFoundError) as e:
            return None, f"{SHARD_ENTRY_NAME} is unreadable ({e})"
        if (entry.path, entry.row_start, entry.row_end) != (task.path, task.row_start, task.row_end):
            return entry, f"{SHARD_ENTRY_NAME} describes {entry.path} rows {entry.row_start}..{entry.row_end}"
        if entry.producer != self.producer:
            raise CacheFormatError(
                f"cache {self.key}: shard {task.path} was computed with {_settings(entry.producer)}, this run "
                f"computes {_settings(self.producer)}; one cache never mixes them (resume it with the settings "
                "it was started with)"
            )
        sizes = self.location.file_sizes(task.path)
        for name, recorded in entry.files.items():
            if sizes.get(name) != recorded.bytes:
                return entry, f"{name} has {sizes.get(name, 'no')} bytes, its entry says {recorded.bytes}"
        return entry, None

    def _read_entry(self, task: ShardTask) -> ShardEntry:
        raw = json.loads(self.location.read_bytes(f"{task.path}/{SHARD_ENTRY_NAME}"))
        return ShardEntry.from_raw(raw, f"{self.location}/{task.path}/{SHARD_ENTRY_NAME}")

    def write_shard(self, task: ShardTask, rows: ShardRows, tensors: dict[tuple[str, int], list[np.ndarray]],
                    distribution: list[PerToken] | None = None) -> ShardEntry | None:  # fmt: skip
        """Build the shard locally and publish it; its entry, or None when another writer committed it first.

        Args:
            distribution: each row's teacher distribution, for a cache that stores them (in its tensor splits).
        """
        specs = self.split_specs(task.split)
        expected = {(spec.name, layer) for spec in specs.values() for layer in spec.layers}
        if set(tensors) != expected:
            raise ValueError(f"shard tensors {sorted(tensors)} differ from the cache's spec {sorted(expected)}")
        if len(rows) != task.row_end - task.row_start:
            raise ValueError(f"shard {task.path} needs {task.row_end - task.row_start} rows; got {len(rows)}")
        check_rows(rows, self.columns)
        sparse = self.distribution if task.split in self.tensor_splits else None
        if (distribution is not None) != (sparse is not None):
            raise ValueError(f"shard {task.path}: the cache {'stores' if sparse else 'stores no'} teacher distribution "
                             f"there; got {'one' if distribution is not None else 'none'}")  # fmt: skip
        if sparse is not None:
            tokens = sparse.stored_tokens(rows.lengths, rows.columns)
            for i, row in enumerate(distribution):
                sparse.check_row(row, tokens[i], f"shard {task.path} row {i}")
        staging = self.location.staging_dir(task.path.replace("/", "-"))
        entry = build_shard(staging, rows, tensors, specs, columns=self.columns, relative_path=task.path,
                            row_start=task.row_start, producer=self.producer, distribution=distribution,
                            sparse=sparse)  # fmt: skip
        committed = self.location.commit_dir(staging, task.path, last=SHARD_ENTRY_NAME)
        self._beat()
        return entry if committed else None

    def split_specs(self, split: str) -> dict[str, TensorSpec]:
        """The tensors the shards of ``split`` hold."""
        return self.specs if split in self.tensor_splits else {}

    def committed_rows(self, split: str) -> list[ShardRows]:
        """The rows of every shard of ``split``, read back and verified (all must be committed)."""
        tasks = [t for t in self.tasks if t.split == split]
        return [read_shard(self.location, self._read_entry(task), {}, [], self.columns).rows for task in tasks]

    def committed_count(self) -> int:
        return sum(self.is_committed(task) for task in self.tasks)

    def close(self) -> None:
        """Stop marking this writer alive, leaving the manifest to another writer."""
        self.location.remove(self._heartbeat)

    def finish(self, *, metadata: dict | None = None, attachments: dict[str, Path] | None = None) -> Manifest | None:
        """Write the manifest if every shard is committed and sound, and return it; None while some are missing.

        Args:
            metadata: added to the writer's metadata (what is known only once every shard is in).
            attachments: name -> a local folder whose files are stored under ``<name>/`` and
                listed, with sizes and checksums, in the manifest (written before it).

        Raises:
            CacheCorruptError: a committed shard is damaged (a rerun recomputes it).
            CacheFormatError: shards of different producers.
        """
        if self.committed_count() < len(self.tasks):
            self.close()
            return None
        checked = [(task, *self.committed_entry(task)) for task in self.tasks]
        damaged = [f"{task.path}: {problem}" for task, _, problem in checked if problem]
        if damaged:
            self.close()
            raise CacheCorruptError(
                f"cache {self.key} at {self.location}: damaged shards {damaged}; run the capture again to recompute them"
            )
        splits: dict[str, list[ShardEntry]] = {}
        for task, entry, _ in checked:
            splits.setdefault(task.split, []).append(entry)
        manifest = Manifest(
            key=self.key,
            columns=self.columns,
            shard_rows=self.shard_rows,
            tensors=tuple(self.specs.values()),
            distribution=self.distribution,
            splits={
                split: SplitEntry(
                    rows=shards[-1].row_end,
                    tokens=sum(s.tokens for s in shards),
                    shards=tuple(shards),
                    tensors=tuple(self.split_specs(split)),
                )  # fmt: skip
                for split, shards in splits.items()
            },
            metadata={**self.metadata, **(metadata or {})},
            attachments={name: self._attach(name, Path(folder)) for name, folder in (attachments or {}).items()},
        )
        self.location.write_bytes(MANIFEST_NAME, manifest.to_json().encode())
        self.close()
        _remove_stale(self.location)
        return manifest

    def _attach(self, name: str, folder: Path) -> dict[str, FileEntry]:
        """Store the files under ``folder`` as ``<name>/...``; their entries, by relative path."""
        entries = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            relative = path.relative_to(folder).as_posix()
            if any(part.startswith(".") for part in relative.split("/")):
                continue  # hidden files and folders (.git, caches of tools) are not part of what is attached
            data = path.read_bytes()
            self.location.write_bytes(f"{name}/{relative}", data)
            entries[relative] = FileEntry(bytes=len(data), xxh3=checksum(data))
        return entries


class BackgroundWriter:
    """Commits shards on a thread, so the caller's next forward pass overlaps compression and I/O.

    At most ``depth`` shards wait in the queue (bounded memory): ``submit`` blocks while it
    is full. An error on the thread is raised by the next ``submit`` or by ``close``.
    Use as a context manager; leaving it waits for every submitted shard, so work that was
    finished is committed even when the caller fails. Of two errors, the one that came
    first is raised, and the other is attached to it as a note.

    Args:
        on_commit: called on the thread with each shard's entry (None: another writer had it).
    """

    def __init__(self, writer: CacheWriter, *, depth: int = 2, on_commit=None):
        self.writer, self.on_commit = writer, on_commit or (lambda entry: None)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kdcache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if hasattr(
            os, "setpriority"
        ):  # yield the CPU to the caller's compute (nice 19: never starved, unlike SCHED_IDLE)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while (item := self._queue.get()) is not None:
            if self._error is None:  # after a failure, drain the queue without writing
                try:
                    self.on_commit(self.writer.write_shard(*item))
                except BaseException as e:
                    self._error = e

    def submit(self, task: ShardTask, rows: ShardRows, tensors: dict[tuple[str, int], list[np.ndarray]],
               distribution: list[PerToken] | None = None) -> None:  # fmt: skip
        self._raise()
        self._queue.put((task, rows, tensors, distribution))

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        earlier = self._error  # the thread failed before the caller did: that is the first error
        try:
            self.close()
        except BaseException as writer_error:
            if error is None or error is writer_error:  # the writer's error only (submit raised it)
                raise
            if writer_error is earlier:
                writer_error.add_note(f"then the caller failed too: {error!r}")
                raise writer_error from None
            error.add_note(f"the cache writer failed too: {writer_error!r}")


def _settings(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(values.items())) or "no recorded settings"


def _remove_stale(location: Location) -> None:
    """Drop heartbeats and staging directories left by writers that are gone."""
    for folder in (WRITERS_DIR, STAGING_DIR):
        if not location.exists(folder):
            continue
        for path in location.fs.ls(location.path(folder), detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if folder == WRITERS_DIR:
                pid, host = _heartbeat_owner(name)
            else:  # <shard>.tmp-<pid>@<host>-<random>
                pid, host = _heartbeat_owner(name.rpartition(".tmp-")[2].rpartition("-")[0])
            if not writer_alive(pid, host, location.modified(f"{folder}/{name}")):
                location.fs.rm(path, recursive=True)
        try:
            if not location.fs.ls(location.path(folder)):
                location.remove(folder)
        except FileNotFoundError:  # object stores have no empty folders: it went with its last file
            pass


def live_writers(location: Location) -> list[str]:
    """Heartbeats (``pid@host``) of writers that may still be filling this cache."""
    if not location.exists(WRITERS_DIR):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in location.fs.ls(location.path(WRITERS_DIR), detail=False)]
    return [n for n in names if writer_alive(*_heartbeat_owner(n), location.modified(f"{WRITERS_DIR}/{n}"))]


def _heartbeat_owner(name: str) -> tuple[str, str]:
    """(pid, host) from a heartbeat name ``pid@host``, or from its interrupted temporary ``pid@host.tmp-N``."""
    pid, _, host = name.split(".tmp-")[0].partition("@")
    return pid, host


def writer_alive(pid: str, host: str, modified, *, grace_s: float = 900) -> bool:
    """Whether a writer may still be running: on this host its process exists; elsewhere its
    heartbeat was touched within ``grace_s`` seconds."""
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return modified is None or (time.time() - modified.timestamp()) < grace_s
