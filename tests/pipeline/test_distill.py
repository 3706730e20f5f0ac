"""The student stage: many students per pass, every student origin, the live teacher, TensorBoard."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from cache_store import open_cache
from pipeline.config import ConfigError, LoraConfig, StudentArchitecture, StudentConfig
from pipeline.student.distill import run_distill
from pipeline.student.streaming import CacheSource
from pipeline.tasks import SEQUENCE_CLASSIFICATION
from pipeline.teacher import run_teacher_train
from pipeline.teacher.capture import run_capture
from pipeline.training import Collator


def with_students(config, *students, **distill):
    return dataclasses.replace(config, distill=dataclasses.replace(config.distill, students=students, **distill))


def weights(path) -> dict[str, torch.Tensor]:
    return AutoModelForSequenceClassification.from_pretrained(path).state_dict()


def scalars(run_dir, pass_name: str, learner: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / pass_name / learner))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_cached_equals_online(cfg, learner: str, terms: tuple[str, ...]) -> None:
    """Distill ``cfg`` from its cache and with the teacher live: the same loss terms at every step, the same metrics."""
    cached, online = run_distill(cfg), run_distill(cfg, online=True)
    a, b = scalars(cached.run_dir, "seed0-distilled", learner), scalars(online.run_dir, "seed0-distilled", learner)
    for term in ("loss/total", *(f"loss/{t}" for t in terms)):
        np.testing.assert_allclose(a[term], b[term], rtol=1e-4, atol=1e-6)
    assert cached.models[1].metrics == online.models[1].metrics


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
    captured = run_capture(trained)
    built = StudentConfig(name="built", architecture=StudentArchitecture(layers=2, hidden_size=16, heads=2),
                          freeze_layers=1)  # fmt: skip
    lora = StudentConfig(name="lora", teacher_layers=(2, 4), lora=LoraConfig(r=4, alpha=8))
    result = run_distill(with_students(trained, built, lora, baselines=False))
    paths = {m.name: m.path for m in result.models}
    small = AutoModelForSequenceClassification.from_pretrained(paths["built"])
    assert small.config.hidden_size == 16 and small.config.num_hidden_layers == 2
    merged = AutoModelForSequenceClassification.from_pretrained(paths["lora"])  # adapters merged: a plain model
    assert not any("lora" in name for name in merged.state_dict())
    cut = AutoModelForSequenceClassification.from_pretrained(str(open_cache(captured.location).attachment("teacher")))
    assert not torch.equal(merged.bert.encoder.layer[0].attention.self.query.weight,
                           cut.bert.encoder.layer[1].attention.self.query.weight)  # fmt: skip


def test_the_cache_in_float32_gives_the_live_teachers_losses_step_by_step(trained):
    """With a subset of the teacher's heads cached, the live teacher emits the same subset and both compare it
    with the student's same heads."""
    exact = dataclasses.replace(trained.capture, hidden_dtype="float32", attention_dtype="float32",
                                attention_heads=(0, 2))  # fmt: skip
    cfg = with_students(dataclasses.replace(trained, capture=exact), *trained.distill.students, baselines=False)
    run_capture(cfg)
    assert_cached_equals_online(cfg, "tiny-l2", ("kl", "ce", "hidden_mse", "attention_kl"))


def test_attention_terms_compare_the_students_heads_that_the_cache_holds(trained):
    from pipeline.student.objective import Objective

    teacher = AutoModelForSequenceClassification.from_pretrained(str(trained.teacher.base_model),
                                                                 attn_implementation="eager")  # fmt: skip
    batch = {"input_ids": torch.tensor([[2, 8, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        maps = teacher(**batch, output_attentions=True).attentions[1]  # (1, 4 heads, 4, 4)
    terms = (dataclasses.replace(trained.distill.loss[3], weight=1.0),)  # attention_kl
    for heads, stored in (((0, 2), maps[:, [0, 2]]), (None, maps)):
        objective = Objective(teacher, SEQUENCE_CLASSIFICATION, terms, ((2, 2),), teacher_width=32,
                              attention_heads=heads)  # fmt: skip
        loss, parts = objective({**batch, "attentions/2": stored}, progress=0.0)
        assert float(parts["attention_kl"]) == pytest.approx(0.0, abs=1e-6)  # its own maps, head for head
    narrow = StudentConfig(name="narrow", architecture=StudentArchitecture(layers=2, hidden_size=16, heads=2),
                           loss=terms, mapping="uniform")  # fmt: skip
    subset = dataclasses.replace(trained.capture, attention_heads=(0, 2))
    cfg = with_students(dataclasses.replace(trained, capture=subset), narrow, baselines=False)
    run_capture(cfg)
    with pytest.raises(ConfigError, match=r"student 'narrow' has 2 attention heads; the cache holds heads \[0, 2\] of "
                       "the teacher's 4"):  # fmt: skip
        run_distill(cfg)


def test_baselines_take_at_least_their_students_optimizer_steps_and_the_report_says_how_many(config):
    trained = dataclasses.replace(config, data=dataclasses.replace(config.data, labeled_train_size=20))
    trained = with_students(trained, *config.distill.students, batch_size=4)
    run_teacher_train(trained)
    run_capture(trained)
    result = run_distill(trained)
    models = {m.name: m for m in result.models}
    kd = scalars(result.run_dir, "seed0-distilled", "tiny-l2")
    no_kd = scalars(result.run_dir, "seed0-baselines", "tiny-l2-no-kd")
    assert models["tiny-l2"].steps == len(kd["loss/total"]) and models["tiny-l2-no-kd"].steps == len(
        no_kd["loss/total"]
    )
    epochs, steps = len(no_kd["validation/accuracy"]), models["tiny-l2-no-kd"].steps
    assert epochs > trained.distill.epochs  # it sees the labeled rows only: more, shorter epochs
    assert steps >= models["tiny-l2"].steps > steps - steps // epochs  # the fewest whole epochs that suffice
    assert 1 <= models["tiny-l2-no-kd"].best_epoch <= epochs
    table = (result.run_dir / "report.md").read_text()
    assert f"| {models['tiny-l2-no-kd'].steps:,} | {models['tiny-l2-no-kd'].best_epoch} |" in table
    fixed = run_distill(with_students(trained, *trained.distill.students, baseline_epochs=1))
    assert {m.name: m.steps for m in fixed.models}["tiny-l2-no-kd"] == steps // epochs


def test_a_pass_in_which_a_rank_gets_no_batch_is_refused(trained):
    from pipeline.runtime import Ranks
    from pipeline.student.distill import require_batches, student_stream
    from pipeline.student.inputs import TeacherCache

    cache = TeacherCache(run_capture(trained).location)
    source = CacheSource(cache.cache, "train")
    shards = len(source)
    require_batches(student_stream(trained, source, cache, seed=0, kd=False, ranks=Ranks(0, shards, 0)), "p")
    beyond = student_stream(trained, source, cache, seed=0, kd=False, ranks=Ranks(0, shards + 1, 0))
    assert len(beyond) == 0
    with pytest.raises(ConfigError, match=rf"pass p: rank {shards} of {shards + 1} gets no batch: its shards "
                       rf"\({shards} in all, every {shards + 1}-th per rank\) hold no labeled rows"):  # fmt: skip
        require_batches(beyond, "p")


def test_students_of_different_kinds_each_get_their_own_inputs(config_file, pairs_dataset, tmp_path):
    """A BERT student takes segment ids; one without segment embeddings must not (it would index past them)."""
    from pipeline.config import load_config
    from pipeline.models import load_tokenizer, save_model
    from pipeline.training import predict

    cfg = load_config(config_file, [f"data.dataset={pairs_dataset}"])
    run_teacher_train(cfg)
    run_capture(cfg)
    from pipeline.teacher.capture import plan_cache

    plan = plan_cache(cfg)
    teacher = SEQUENCE_CLASSIFICATION.load_model(plan.teacher_path)
    flat_config = teacher.config.to_dict() | {"type_vocab_size": 1, "num_hidden_layers": 2}
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    flat_dir = tmp_path / "no-segments"
    save_model(BertForSequenceClassification(BertConfig(**flat_config)), load_tokenizer(plan.teacher_path), flat_dir)
    students = (StudentConfig(name="cut", teacher_layers=(2, 4)),
                StudentConfig(name="flat", pretrained=str(flat_dir), layer_map=((1, 2), (2, 4))))  # fmt: skip
    result = run_distill(with_students(cfg, *students, baselines=False, epochs=1))
    models = {m.name: m for m in result.models}
    tokenizer = load_tokenizer(plan.teacher_path)
    for name in ("cut", "flat"):
        model = AutoModelForSequenceClassification.from_pretrained(models[name].path).eval()
        own = Collator.for_model(tokenizer, model.config)
        assert ("token_type_ids" in own.inputs) == (name == "cut")
        history = json.loads((result.run_dir / "passes" / "seed0-distilled.json").read_text())
        assert history  # validation ran with each model's own collator: its kept accuracy is reproducible
        validation = plan.rows["validation"]
        logits = predict(model, validation, task=SEQUENCE_CLASSIFICATION, collate=own)
        accuracy = float((logits.argmax(-1) == validation["label"]).mean())
        logged = scalars(result.run_dir, "seed0-distilled", name)["validation/accuracy"]
        assert accuracy == pytest.approx(max(logged), abs=1e-6)


def test_distill_under_torchrun_trains_on_disjoint_parts_and_reports_once(config_file, trained, tmp_path):
    """Three ranks (gloo): every rank owns labeled shards, so the baselines train too; one report."""
    import os
    import subprocess
    import sys

    run_capture(trained)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
               "-m", "cli", "distill", "--config", str(config_file)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.name != "latest"]  # one run, made by rank 0
    report = json.loads((run_dir / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["teacher", "tiny-l2", "tiny-l2-no-kd"]
    assert run.stdout.decode().count("report:") == 3 and run.stdout.decode().count("tiny-l2 (student") == 1
    steps = {m["name"]: m["steps"] for m in report["models"]}
    assert 0 < steps["tiny-l2"] <= steps["tiny-l2-no-kd"]
    assert steps["tiny-l2"] == len(scalars(run_dir, "seed0-distilled", "tiny-l2")["loss/total"])
    alone = run_distill(with_students(trained, *trained.distill.students, baselines=False))
    assert steps["tiny-l2"] <= alone.models[1].steps // 3  # each rank takes a third of the batches or fewer
