"""Capture survives kill -9, cooperating ranks and a rival run: every path ends in the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache_store import MANIFEST_NAME, Location, verify_cache

# Runs the real CLI in a child process, slowed down per shard so that a kill lands mid-capture.
CHILD = """
import sys, time
import pipeline.teacher.capture as capture
forward = capture.TeacherForward.__call__
def slow(*args, **kwargs):
    time.sleep(float(sys.argv[1]))
    return forward(*args, **kwargs)
capture.TeacherForward.__call__ = slow
from cli import app
app(sys.argv[2:], standalone_mode=True)
"""


def start(config: Path, *extra: str, delay: float = 0.0) -> subprocess.Popen:
    args = [sys.executable, "-c", CHILD, str(delay), "teacher-cache", "--config", str(config), *extra]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def committed(cache_root: Path) -> int:
    return len(list(cache_root.glob("*/*/shard-*/shard.json")))


@pytest.fixture
def reference(config_file, config, tmp_path):
    """An uninterrupted capture, and the one cache directory it made."""
    from pipeline.teacher import run_teacher_train

    run_teacher_train(config)
    assert start(config_file).wait(timeout=120) == 0
    (cache,) = [p for p in (tmp_path / "caches").iterdir() if not p.name.startswith(".")]
    moved = tmp_path / "reference"
    cache.rename(moved)
    return cache.name, files(moved)


def test_kill_9_at_several_points_then_resume_gives_identical_files(config_file, tmp_path, reference):
    key, expected = reference
    total = len([n for n in expected if n.endswith("shard.json")])
    cache_root = tmp_path / "caches"
    for kill_at in (1, total // 2, total - 1):
        child = start(config_file, delay=0.15)
        deadline = time.time() + 60
        while committed(cache_root) < kill_at and child.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert not (cache_root / key / MANIFEST_NAME).exists(), "the kill came too late to test anything"
    resumed = start(config_file)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err.decode()
    assert b"resuming cache" in out
    assert files(cache_root / key) == expected
    assert verify_cache(cache_root / key) == {}


def test_two_ranks_fill_disjoint_shards_and_the_last_commits(config_file, tmp_path, reference):
    key, expected = reference
    first = start(config_file, "--num-shards", "2", "--shard-index", "0")
    assert first.wait(timeout=120) == 0
    cache = tmp_path / "caches" / key
    assert not (cache / MANIFEST_NAME).exists()
    assert 0 < committed(tmp_path / "caches") < len([n for n in expected if n.endswith("shard.json")])
    second = start(config_file, "--num-shards", "2", "--shard-index", "1")
    assert second.wait(timeout=120) == 0
    assert files(cache) == expected


def test_two_uncoordinated_runs_of_one_key_leave_one_intact_cache(config_file, tmp_path, reference):
    key, expected = reference
    runs = [start(config_file, delay=0.05) for _ in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err.decode()
    assert files(tmp_path / "caches" / key) == expected
    assert verify_cache(Location(str(tmp_path / "caches" / key))) == {}


def test_torchrun_ranks_write_the_same_cache_as_one_process(config_file, tmp_path, reference):
    key, expected = reference
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "cli", "teacher-cache", "--config", str(config_file), "--json"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    summaries = [json.loads(line) for line in run.stdout.decode().splitlines() if line.startswith("{")]
    assert len(summaries) == 2 and all(s["complete"] and s["key"] == key for s in summaries)  # both ranks see it
    assert files(tmp_path / "caches" / key) == expected
