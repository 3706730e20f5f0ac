"""Sequence-level KD (``data.prompts``): the teacher answers each prompt once at capture, the cache
keeps its answers with their distributions, and students learn the answers only. Tiny Llama models
built from a config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from cache_store import open_cache
from cache_store.distribution import SparseSpec
from pipeline.config import ConfigError, load_config
from pipeline.student.objective import distribution_divergence
from pipeline.tasks import TASKS
from pipeline.tasks.causal_lm import TARGET_START
from pipeline.tasks.next_token import block_stats, select_distribution, teacher_probabilities
from pipeline.teacher.capture import load_teacher, plan_cache, run_capture, sparse_spec, teacher_forward
from tests.pipeline.test_distill import assert_cached_equals_online
from tests.test_cli import app, runner

LM = TASKS["causal-lm"]
TEMPLATE = "a plot {text} so"
NEW_TOKENS = 6


def prompted(tmp_path, tiny_lm, lm_dataset, **generate) -> dict:
    return {
        "name": "answers", "task": "causal-lm", "seed": 0,
        "data": {"dataset": str(lm_dataset), "max_examples": 90, "test_size": 15, "validation_size": 15,
                 "max_length": 20, "prompts": {"template": TEMPLATE, "chat_template": True}},
        "teacher": {"base_model": str(tiny_lm), "fine_tune": False},
        "capture": {"shard_rows": 32, "batch_size": 8, "cache_root": str(tmp_path / "caches"),
                    "logits": {"scheme": "sampled", "draws": 20}, "generate": {"max_new_tokens": NEW_TOKENS, **generate}},
        "distill": {
            "students": [{"name": "cut2", "teacher_layers": [2, 4]}],
            "loss": [{"kind": "kl", "weight": 1.0}, {"kind": "ce", "weight": 0.5}],
            "epochs": 2, "learning_rate": 1e-3, "batch_size": 8, "run_root": str(tmp_path / "runs"),
        },
    }  # fmt: skip


@pytest.fixture
def config_file(tmp_path, tiny_lm, lm_dataset):
    def make(**generate):
        path = tmp_path / "answers.yaml"
        path.write_text(yaml.safe_dump(prompted(tmp_path, tiny_lm, lm_dataset, **generate)))
        return path

    return make


def words(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_each_text_is_a_prompt_in_the_template_and_the_chat_template_cut_to_fit(config_file):
    cfg = load_config(config_file())
    plan = plan_cache(cfg)
    from pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(plan.teacher_path)
    prefix, suffix = words(tokenizer, "the story a plot"), words(tokenizer, "so so the film is")
    rows, texts = plan.rows["train"], plan.splits["train"].texts
    assert len(rows) == len(texts)
    cut = 0
    for ids, example, start in zip(rows.input_ids, rows.example_id, rows[TARGET_START], strict=True):
        text = words(tokenizer, texts[example][0])[: 20 - len(prefix) - len(suffix)]
        cut += len(text) < len(words(tokenizer, texts[example][0]))
        assert ids.tolist() == prefix + text + suffix and len(ids) <= 20
        assert start == len(ids) - 1  # the prompt's last token predicts the answer's first
    assert cut > 0  # some documents are longer than the room the template leaves


def test_the_teacher_answers_each_prompt_greedily_and_the_cache_keeps_the_answers_distributions_only(config_file):
    cfg = load_config(config_file(), ["capture.batch_size=1"])  # one prompt at a time: no padding
    plan = plan_cache(cfg)
    cache = open_cache(run_capture(cfg).location)
    spec = cache.manifest.distribution
    assert spec.start_column == TARGET_START
    model = load_teacher(cfg, plan, torch.device("cpu"))
    entry = cache.shards("train")[0]
    data = cache.read_shard(entry, distribution=True)
    for i in range(entry.rows):
        ids, start = data.rows.input_ids[i], int(data.rows[TARGET_START][i])
        prompt = plan.rows["train"].input_ids[entry.row_start + i]
        np.testing.assert_array_equal(ids[: start + 1], prompt)
        with torch.no_grad():
            greedy = model.generate(torch.from_numpy(prompt.astype(np.int64))[None], max_new_tokens=NEW_TOKENS,
                                    do_sample=False, pad_token_id=0, eos_token_id=2)[0, len(prompt) :].numpy()  # fmt: skip
        answer = ids[start + 1 :]
        ends = np.flatnonzero(greedy == 2)
        np.testing.assert_array_equal(answer, greedy[: ends[0] + 1] if len(ends) else greedy)
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(ids.astype(np.int64))[None]).logits[0, start:]
        live = select_distribution(teacher_probabilities(logits), spec, seed=0, split="train",
                                   example_ids=torch.full((len(logits),), int(data.rows.example_id[i])),
                                   positions=torch.arange(start, len(ids)))  # fmt: skip
        stored = data.example_distribution(i)
        kept = live["ids"] >= 0
        np.testing.assert_array_equal(stored["entries"], kept.sum(-1).numpy())  # one per answer position
        np.testing.assert_array_equal(stored["ids"], live["ids"][kept].numpy())
        np.testing.assert_array_equal(stored["counts"], live["counts"][kept].numpy())
        assert data.rows["lm_stats"][i][1] == len(answer)  # the teacher's metrics count the answer's tokens
    samples = cache.manifest.metadata["samples"]
    test = cache.read_shard(cache.shards("test")[0]).rows
    first = int(test[TARGET_START][0]) + 1
    assert samples[0]["prompt_ids"] == test.input_ids[0][:first].tolist()
    assert samples[0]["prompt"] == plan.splits["test"].texts[test.example_id[0]][0]
    assert samples[0]["new_tokens"] == NEW_TOKENS


def test_sampled_answers_depend_on_the_seed_alone(config_file):
    answers = []
    for seed in (0, 0, 1):
        cfg = load_config(config_file(sample=True, temperature=1.5, seed=seed))
        plan = plan_cache(cfg)
        model = load_teacher(cfg, plan, torch.device("cpu"))
        forward = teacher_forward(cfg, plan, model, precision=torch.float32, sparse=sparse_spec(cfg, model.config))
        answers.append([a.tolist() for a in forward.answer(plan.rows["validation"], "validation").input_ids])
    assert answers[0] == answers[1] and answers[0] != answers[2]


def test_the_losses_and_metrics_read_each_rows_answer_only():
    torch.manual_seed(0)
    vocab, ids = 7, torch.randint(0, 7, (2, 6))
    mask, start = torch.tensor([[1] * 6, [1] * 5 + [0]]), torch.tensor([3, 1])
    logits = torch.randn(2, 6, vocab)
    scored = [(b, t) for b in range(2) for t in range(start[b], int(mask[b].sum()) - 1)]  # next token in the row
    manual = torch.stack([F.cross_entropy(logits[b, t], ids[b, t + 1]) for b, t in scored]).mean()
    batch = {"input_ids": ids, "attention_mask": mask, TARGET_START: start}
    torch.testing.assert_close(LM.hard_loss(logits, batch), manual)
    assert block_stats(logits, ids, mask, start)[:, 1].tolist() == [2, 3]  # predictions counted per row
    spec = SparseSpec("dense", vocab_size=vocab, start_column=TARGET_START)
    teacher = torch.log_softmax(torch.randn(2, 6, vocab), -1)
    stored = [(b, t) for b in range(2) for t in range(start[b], int(mask[b].sum()))]
    expected = torch.stack([(teacher[b, t].exp() * (teacher[b, t] - torch.log_softmax(logits[b, t], -1))).sum()
                            for b, t in stored]).mean()  # fmt: skip
    value = distribution_divergence(logits, batch | {"teacher_distribution/logprobs": teacher}, spec)
    torch.testing.assert_close(value, expected)
    teacher[0, :3] = 0.0  # what lies before a row's start is never read
    torch.testing.assert_close(distribution_divergence(logits, batch | {"teacher_distribution/logprobs": teacher}, spec),
                               expected)  # fmt: skip


def test_a_student_learns_the_same_from_the_cache_as_from_the_live_teacher(config_file):
    cfg = load_config(config_file(), ["distill.baselines=false"])
    run_capture(cfg)
    assert_cached_equals_online(cfg, "cut2", ("kl", "ce"))


def test_the_cli_distills_answers_and_reports_each_models_beside_the_teachers(config_file, tmp_path):
    path = config_file()
    for command in ("teacher-cache", "distill"):
        result = runner.invoke(app, [command, "--config", str(path)])
        assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "runs" / "latest" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["teacher", "cut2", "cut2-no-kd"]
    manifest = json.loads(next((tmp_path / "caches").glob("*/manifest.json")).read_text())
    samples = manifest["metadata"]["samples"]
    assert [c["prompt"] for c in report["continuations"]] == [s["prompt"] for s in samples]
    for entry, sample in zip(report["continuations"], samples, strict=True):
        assert entry["teacher"] == sample["continuation"] and {"cut2", "cut2-no-kd"} <= set(entry)
    markdown = (tmp_path / "runs" / "latest" / "report.md").read_text()
    assert samples[0]["prompt"] in markdown


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"task": "sequence-classification"}, "applies to causal-lm"),
        ({"data": {"prompts": {"template": "no text here"}}}, "must contain {text}"),
        ({"data": {"prompts": None}}, "capture.generate needs data.prompts"),
        ({"capture": {"prompts": ["the film"]}}, "with data.prompts the report shows"),
    ],
)
def test_prompt_settings_that_cannot_work_are_refused_in_one_line(tmp_path, tiny_lm, lm_dataset, edit, message):
    raw = prompted(tmp_path, tiny_lm, lm_dataset)
    for section, values in edit.items():
        raw[section] = {**raw[section], **values} if isinstance(values, dict) else values
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_config(path)


def test_a_template_that_leaves_no_room_for_the_text_is_refused(config_file):
    cfg = load_config(config_file(), ["data.max_length=8"])
    with pytest.raises(ConfigError, match="leaving none of data.max_length 8"):
        plan_cache(cfg)


def test_a_resumed_capture_answers_the_missing_prompts_as_the_first_run_did(config_file):
    cfg = load_config(config_file(sample=True, temperature=1.5))
    location = Path(run_capture(cfg).location.path(""))
    shards = sorted(p for p in location.rglob("shard-*") if p.is_dir())
    before = {str(p.relative_to(location)): p.read_bytes() for s in shards for p in sorted(s.rglob("*")) if p.is_file()}
    (location / "manifest.json").unlink()  # as if the run had died before its last shards and the manifest
    for shard in shards[1::2]:
        shutil.rmtree(shard)
    assert not run_capture(cfg).reused
    after = {str(p.relative_to(location)): p.read_bytes() for s in shards for p in sorted(s.rglob("*")) if p.is_file()}
    assert after == before
