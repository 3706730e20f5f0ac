"""The student stage: many students per pass, every student origin, the live teacher, TensorBoard."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from pipeline.capture import run_capture
from pipeline.config import LoraConfig, StudentArchitecture, StudentConfig
from pipeline.distill import run_distill
from pipeline.teacher import run_teacher_train


def with_students(config, *students, **distill):
    return dataclasses.replace(config, distill=dataclasses.replace(config.distill, students=students, **distill))


def weights(path) -> dict[str, torch.Tensor]:
    return AutoModelForSequenceClassification.from_pretrained(path).state_dict()


def scalars(run_dir, pass_name: str, learner: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / pass_name / learner))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture
def trained(config):
    """The tiny config with its teacher trained (each test captures what it needs)."""
    run_teacher_train(config)
    return config


def test_students_trained_together_end_as_if_trained_alone(trained):
    l2 = trained.distill.students[0]
    l1 = StudentConfig(name="tiny-l1", teacher_layers=(4,))
    together = (
        run_distill(with_students(trained, l2, l1, baselines=False, epochs=2), cache_location=None)
        if run_capture(trained)
        else None
    )
    alone = run_distill(with_students(trained, l2, baselines=False, epochs=2))
    paths = {m.name: m.path for m in together.models}
    for name, value in weights(alone.models[1].path).items():
        torch.testing.assert_close(weights(paths["tiny-l2"])[name], value, rtol=0, atol=0)
    assert {m.name for m in together.models} == {"teacher", "tiny-l2", "tiny-l1"}


def test_tensorboard_holds_every_loss_term_the_learning_rate_and_throughput(trained):
    run_capture(trained)
    result = run_distill(with_students(trained, *trained.distill.students, baselines=True))
    logged = scalars(result.run_dir, "seed0-distilled", "tiny-l2")
    steps = len(logged["loss/total"])
    assert steps > 0 and {"loss/kl", "loss/ce", "loss/hidden_mse", "loss/attention_kl"} <= logged.keys()
    assert len(logged["learning_rate"]) == len(logged["examples_per_s"]) == steps
    assert logged["validation/accuracy"]
    assert set(scalars(result.run_dir, "seed0-baselines", "tiny-l2-no-kd")) >= {"loss/ce", "loss/total"}


def test_students_from_a_config_with_frozen_layers_and_with_lora(trained):
    run_capture(trained)
    built = StudentConfig(name="built", architecture=StudentArchitecture(layers=2, hidden_size=16, heads=2),
                          freeze_layers=1)  # fmt: skip
    lora = StudentConfig(name="lora", teacher_layers=(2, 4), lora=LoraConfig(r=4, alpha=8))
    result = run_distill(with_students(trained, built, lora, baselines=False))
    paths = {m.name: m.path for m in result.models}
    small = AutoModelForSequenceClassification.from_pretrained(paths["built"])
    assert small.config.hidden_size == 16 and small.config.num_hidden_layers == 2
    merged = AutoModelForSequenceClassification.from_pretrained(paths["lora"])  # adapters merged: a plain model
    assert not any("lora" in name for name in merged.state_dict())
    cut = AutoModelForSequenceClassification.from_pretrained(str(result.models[0].path))
    assert not torch.equal(merged.bert.encoder.layer[0].attention.self.query.weight,
                           cut.bert.encoder.layer[1].attention.self.query.weight)  # fmt: skip


def test_the_cache_in_float32_gives_the_live_teachers_losses_step_by_step(trained):
    exact = dataclasses.replace(trained.capture, hidden_dtype="float32", attention_dtype="float32")
    cfg = with_students(dataclasses.replace(trained, capture=exact), *trained.distill.students, baselines=False)
    run_capture(cfg)
    cached, online = run_distill(cfg), run_distill(cfg, online=True)
    a, b = scalars(cached.run_dir, "seed0-distilled", "tiny-l2"), scalars(online.run_dir, "seed0-distilled", "tiny-l2")
    for term in ("loss/total", "loss/kl", "loss/ce", "loss/hidden_mse", "loss/attention_kl"):
        np.testing.assert_allclose(a[term], b[term], rtol=1e-4, atol=1e-6)
    assert cached.models[1].accuracy == online.models[1].accuracy


def test_distill_under_torchrun_trains_on_disjoint_parts_and_reports_once(config_file, trained, tmp_path):
    import json
    import os
    import subprocess
    import sys

    run_capture(trained)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "cli", "distill", "--config", str(config_file), "--no-baselines"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.name != "latest"]  # one run, made by rank 0
    report = json.loads((run_dir / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["teacher", "tiny-l2"]
    assert run.stdout.decode().count("report:") == 2 and run.stdout.decode().count("tiny-l2 (student") == 1
    steps = len(scalars(run_dir, "seed0-distilled", "tiny-l2")["loss/total"])
    alone = run_distill(with_students(trained, *trained.distill.students, baselines=False))
    alone_steps = len(scalars(alone.run_dir, "seed0-distilled", "tiny-l2")["loss/total"])
    assert steps == alone_steps // 2  # each rank takes half the batches
