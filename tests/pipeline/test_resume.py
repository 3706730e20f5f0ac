"""Training survives kill -9: teacher fine-tuning and distillation, resumed, end with the
uninterrupted run's weights, byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.teacher import run_teacher_train
from pipeline.teacher.capture import run_capture

# The real CLI in a child process, slowed after each checkpoint so that a kill lands mid-run.
CHILD = """
import sys, time
import pipeline.training as training
save = training.Checkpoint.save
def slow(self, state):
    save(self, state)
    time.sleep(float(sys.argv[1]))
training.Checkpoint.save = slow
from cli import app
app(sys.argv[2:], standalone_mode=True)
"""


def cli(*args: str, delay: float = 0.0) -> subprocess.Popen:
    command = [sys.executable, "-c", CHILD, str(delay), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip


def kill_after_saves(child: subprocess.Popen, checkpoints: Path, saves: int) -> None:
    """SIGKILL ``child`` once ``saves`` new checkpoint writes have appeared under ``checkpoints``."""
    seen, deadline = set(), time.time() + 120
    while len(seen) < saves and child.poll() is None and time.time() < deadline:
        seen |= {(p.name, p.stat().st_mtime_ns) for p in checkpoints.glob("*.pt") if p.exists()}
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()


def finished(child: subprocess.Popen) -> bytes:
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err.decode()[-2000:]
    return out


def test_teacher_killed_mid_training_resumes_to_identical_weights(config_file, tmp_path):
    def train(root: Path, delay: float = 0.0) -> subprocess.Popen:
        return cli("teacher-train", "--config", str(config_file), "--set", "teacher.epochs=3",
                   "--set", "teacher.checkpoint_steps=2", "--set", f"teacher.output_root={root}", delay=delay)  # fmt: skip

    finished(train(tmp_path / "reference"))  # 4 steps an epoch: 2 saves each
    (expected,) = (tmp_path / "reference").iterdir()
    root = tmp_path / "teachers"
    for saves in (1, 3):  # mid-epoch 1; then, resumed, into epoch 2
        kill_after_saves(train(root, delay=1.0), root, saves)
        assert not (root / expected.name).exists(), "the kill came too late to test anything"
    assert b"resuming from" in finished(train(root))
    assert (root / expected.name / "model.safetensors").read_bytes() == (expected / "model.safetensors").read_bytes()
    history = [json.loads((d / "teacher.json").read_text())["history"] for d in (root / expected.name, expected)]
    assert history[0] == history[1]
    assert not list(root.glob("*.pt"))


def test_distill_killed_twice_and_resumed_ends_with_the_uninterrupted_weights(config_file, config, tmp_path):
    def distill(*extra: str, delay: float = 0.0) -> subprocess.Popen:
        return cli("distill", "--config", str(config_file), "--set", "distill.epochs=2",
                   "--set", "distill.checkpoint_steps=2", *extra, delay=delay)  # fmt: skip

    run_teacher_train(config)
    run_capture(config)
    finished(distill())
    latest = tmp_path / "runs" / "latest"
    expected = sorted(latest.resolve().glob("models/*/model.safetensors"))
    for saves, extra in ((2, ()), (3, ("--resume", "latest"))):  # the students' pass, then into the baselines'
        kill_after_saves(distill(*extra, delay=1.0), latest / "checkpoints", saves)
        assert not (latest / "report.md").exists(), "the kill came too late to test anything"
    out = finished(distill("--resume", "latest"))
    assert b"resuming run" in out and b"resuming from" in out
    got = sorted(latest.resolve().glob("models/*/model.safetensors"))
    assert [p.parent.name for p in got] == [p.parent.name for p in expected] == ["tiny-l2-no-kd-seed0", "tiny-l2-seed0"]
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.read_bytes() == theirs.read_bytes(), mine.parent.name
    assert not list((latest / "checkpoints").glob("*.pt"))
