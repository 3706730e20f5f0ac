"""Content fingerprints: a chained hash over everything that determines a cache's content.

Like HF datasets' fingerprints, the identity of a cache is computed from what it was made
of (file contents, token ids, settings), never from paths, names or modification times.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

_FILE_BLOCK = 1 << 20


class Fingerprint:
    """An incremental SHA-256 over tagged parts; each part is framed so parts cannot run together."""

    def __init__(self, tag: str):
        self._hash = hashlib.sha256()
        self.update_json("tag", tag)

    def _frame(self, name: str, payload_kind: str) -> None:
        self._hash.update(f"\x00{name}\x00{payload_kind}\x00".encode())

    def update_json(self, name: str, value) -> Fingerprint:
        """Add a JSON-serialisable value (dict keys are sorted, so order never matters)."""
        self._frame(name, "json")
        self._hash.update(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())
        return self

    def update_array(self, name: str, array: np.ndarray) -> Fingerprint:
        """Add an array's dtype, shape and bytes."""
        array = np.ascontiguousarray(array)
        self._frame(name, f"array:{array.dtype.str}:{array.shape}")
        self._hash.update(array.data)
        return self

    def update_files(self, name: str, root: Path, relative_paths: list[str]) -> Fingerprint:
        """Add the contents of files under ``root`` (by relative name, in sorted order)."""
        for rel in sorted(relative_paths):
            self._frame(f"{name}/{rel}", "file")
            self._hash.update(file_digest(Path(root) / rel).encode())
        return self

    def hexdigest(self, length: int = 16) -> str:
        return self._hash.hexdigest()[:length]


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_FILE_BLOCK):
            digest.update(block)
    return digest.hexdigest()
