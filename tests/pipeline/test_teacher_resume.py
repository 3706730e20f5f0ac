"""Teacher fine-tuning survives kill -9: the resumed run ends with the uninterrupted run's weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

# The real CLI in a child process, slowed after each checkpoint so that a kill lands mid-training.
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

SETTINGS = ["--set", "teacher.epochs=3", "--set", "teacher.checkpoint_steps=2"]  # 4 steps an epoch: 2 saves each


def train(config: Path, output_root: Path, delay: float = 0.0) -> subprocess.Popen:
    args = [sys.executable, "-c", CHILD, str(delay), "teacher-train", "--config", str(config), *SETTINGS,
            "--set", f"teacher.output_root={output_root}"]  # fmt: skip
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )


def test_teacher_killed_mid_training_resumes_to_identical_weights(config_file, tmp_path):
    reference = train(config_file, tmp_path / "reference")
    assert reference.wait(timeout=180) == 0, reference.stderr.read().decode()
    (expected,) = (tmp_path / "reference").iterdir()

    root = tmp_path / "teachers"
    for saves_before_kill in (1, 3):  # mid-epoch 1; then, resumed, mid-epoch 2
        child = train(config_file, root, delay=1.0)
        checkpoint = root / f".{expected.name}.checkpoint.pt"
        seen, last, deadline = 0, None, time.time() + 120
        while seen < saves_before_kill and child.poll() is None and time.time() < deadline:
            if checkpoint.exists() and checkpoint.stat().st_mtime_ns != last:
                seen, last = seen + 1, checkpoint.stat().st_mtime_ns
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert not (root / expected.name).exists(), "the kill came too late to test anything"
    resumed = train(config_file, root)
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err.decode()
    assert b"resuming from" in out
    assert (root / expected.name / "model.safetensors").read_bytes() == (expected / "model.safetensors").read_bytes()
    assert (
        yaml.safe_load((root / expected.name / "teacher.json").read_text())["history"]
        == yaml.safe_load((expected / "teacher.json").read_text())["history"]
    )
    assert not checkpoint.exists()
