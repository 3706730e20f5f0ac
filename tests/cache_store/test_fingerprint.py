"""Fingerprints depend on content only: values, array bytes, file bytes; never on order or paths."""

import numpy as np

from cache_store import Fingerprint


def digest(**parts) -> str:
    fp = Fingerprint("t")
    for name, value in parts.items():
        if isinstance(value, np.ndarray):
            fp.update_array(name, value)
        else:
            fp.update_json(name, value)
    return fp.hexdigest()


def test_same_inputs_same_digest_and_key_order_is_irrelevant():
    assert digest(a={"x": 1, "y": 2}) == digest(a={"y": 2, "x": 1})


def test_any_change_changes_the_digest():
    base = digest(a={"x": 1}, ids=np.arange(5))
    assert digest(a={"x": 2}, ids=np.arange(5)) != base
    assert digest(a={"x": 1}, ids=np.arange(6)) != base
    assert digest(a={"x": 1}, ids=np.arange(5, dtype=np.int32)) != base  # dtype is content too


def test_parts_cannot_run_together():
    assert digest(a="xy", b="z") != digest(a="x", b="yz")


def test_files_count_by_content_not_location(tmp_path):
    for root in ("one", "two"):
        (tmp_path / root).mkdir()
        (tmp_path / root / "w.bin").write_bytes(b"weights")
    one = Fingerprint("t").update_files("m", tmp_path / "one", ["w.bin"]).hexdigest()
    two = Fingerprint("t").update_files("m", tmp_path / "two", ["w.bin"]).hexdigest()
    assert one == two
    (tmp_path / "two" / "w.bin").write_bytes(b"weightz")
    assert Fingerprint("t").update_files("m", tmp_path / "two", ["w.bin"]).hexdigest() != one
