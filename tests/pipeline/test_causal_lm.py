"""Causal-LM distillation from a cache of sparse teacher distributions, with tiny Llama models built
from a config: blocks, metrics, the selection on the device, the losses against their definitions,
the cache against a live teacher, and runs through the stages and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from cache_store import open_cache
from cache_store.distribution import SparseSpec
from pipeline.config import ConfigError, DataConfig, load_config
from pipeline.data import load_splits
from pipeline.models import load_tokenizer
from pipeline.student.distill import run_distill
from pipeline.student.losses import divergence, sampled_kl, topk_divergence
from pipeline.student.streaming import pad_distributions
from pipeline.tasks import TASKS
from pipeline.tasks.causal_lm import lm_metrics
from pipeline.tasks.next_token import (
    block_stats,
    hashed_uniforms,
    probabilities_and_stats,
    select_distribution,
    teacher_probabilities,
)
from pipeline.teacher.capture import run_capture
from tests.conftest import write_definition
from tests.pipeline.test_distill import assert_cached_equals_online
from tests.test_cli import app, runner

LM = TASKS["causal-lm"]


def lm_config(tmp_path, tiny_lm, lm_dataset, scheme: str, **capture) -> dict:
    return {
        "name": "lm", "task": "causal-lm", "seed": 0,
        "data": {"dataset": str(lm_dataset), "test_size": 20, "validation_size": 20, "block_length": 16},
        "teacher": {"base_model": str(tiny_lm), "fine_tune": False},
        "capture": {"hidden_layers": [2, 4], "shard_rows": 48, "cache_root": str(tmp_path / "caches"),
                    "logits": {"scheme": scheme, "k": 6, "draws": 20}, **capture},
        "distill": {
            "students": [{"name": "cut2", "teacher_layers": [2, 4]}],
            "loss": [{"kind": "kl", "weight": 1.0}, {"kind": "ce", "weight": 0.5}, {"kind": "hidden_mse", "weight": 1.0}],
            "epochs": 2, "learning_rate": 1e-3, "batch_size": 8, "run_root": str(tmp_path / "runs"),
        },
    }  # fmt: skip


@pytest.fixture
def lm_config_file(tmp_path, tiny_lm, lm_dataset):
    def make(scheme: str = "topk", **capture):
        path = tmp_path / f"lm-{scheme}.yaml"
        path.write_text(yaml.safe_dump(lm_config(tmp_path, tiny_lm, lm_dataset, scheme, **capture)))
        return path

    return make


def test_documents_are_packed_into_blocks_with_the_end_of_sequence_token_between_them(tiny_lm, lm_dataset):
    tokenizer = load_tokenizer(tiny_lm)
    splits = load_splits(DataConfig(dataset=str(lm_dataset), test_size=20, validation_size=20), seed=0, task=LM)
    assert splits["train"].labeled.all() and len(splits["train"]) == 160
    rows = LM.encode(tokenizer, splits["test"], DataConfig(dataset="-", block_length=16))
    joined = np.concatenate(rows.input_ids)
    expected = [i for text in splits["test"].texts for i in [*tokenizer(text[0]).input_ids, tokenizer.eos_token_id]]
    np.testing.assert_array_equal(joined, expected[: len(joined)])
    assert all(len(ids) == 16 for ids in rows.input_ids[:-1]) and 2 <= len(rows.input_ids[-1]) <= 16
    assert len(expected) - len(joined) <= 1  # a last block of one token predicts nothing and is left out


def test_a_definitions_label_names_keep_the_rows_of_those_classes_as_text_without_labels(tmp_path):
    rows = [(f"{text} {i}", kind) for i in range(20)
            for text, kind in (("the film is great", "review"), ("a plot so long", "plot"), ("the cast is dull", "review"))]  # fmt: skip
    (tmp_path / "mixed.csv").write_text("text,kind\n" + "".join(f"{t},{k}\n" for t, k in rows))
    definition = write_definition(tmp_path / "mixed.yaml", path=str(tmp_path / "mixed.csv"), text_columns=["text"],
                                  label_column="kind", label_names=["review"])  # fmt: skip
    splits = load_splits(DataConfig(dataset=str(definition), test_size=5, validation_size=5), seed=0, task=LM)
    texts = [t[0] for name in ("train", "validation", "test") for t in splits[name].texts]
    assert len(texts) == 40 and not any(t.startswith("a plot") for t in texts)
    assert splits.dropped["data set"] == {"label not in label_names": 20}
    assert splits["train"].label_names == () and splits["train"].labeled.all()


def test_block_statistics_give_the_lm_loss_perplexity_accuracy_and_ece_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4], [0, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    got = lm_metrics(block_stats(logits, ids, mask).sum(0).numpy())
    positions = [(0, 0, 2), (0, 1, 3), (0, 2, 4), (1, 0, 4)]  # (row, position, next token)
    p = torch.softmax(logits, -1)
    nll = [-math.log(p[b, t, y]) for b, t, y in positions]
    confidence = [p[b, t].max().item() for b, t, _ in positions]
    correct = [float(p[b, t].argmax() == y) for b, t, y in positions]
    bins = {}
    for c, ok in zip(confidence, correct, strict=True):
        bins.setdefault(min(int(c * 10), 9), []).append((c, ok))
    ece = sum(abs(sum(ok for _, ok in v) - sum(c for c, _ in v)) for v in bins.values()) / 4
    assert got["lm_loss"] == pytest.approx(np.mean(nll), rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-6)
    assert got["accuracy"] == pytest.approx(np.mean(correct)) and got["ece"] == pytest.approx(ece, rel=1e-6)


def test_the_in_place_probabilities_give_the_same_sums_and_the_same_values_as_a_live_teacher():
    torch.manual_seed(5)
    logits = torch.randn(3, 6, 40) * 4
    ids, mask = torch.randint(0, 40, (3, 6)), torch.tensor([[1] * 6, [1] * 6, [1, 1, 1, 0, 0, 0]])
    expected = block_stats(logits, ids, mask)
    probs, stats = probabilities_and_stats(logits.clone(), ids, mask)
    torch.testing.assert_close(stats, expected, rtol=1e-5, atol=1e-6)  # float32 sums in two orders
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    assert torch.equal(probs.flatten(0, 1)[:15], teacher_probabilities(logits.flatten(0, 1)[:15]))  # bit for bit


def test_topk_selection_keeps_the_k_most_probable_ids_their_probabilities_and_the_tail():
    torch.manual_seed(1)
    logits = torch.randn(7, 40)
    spec = SparseSpec("topk", vocab_size=40, k=5, temperature=2.0)
    probs = teacher_probabilities(logits, 2.0)
    got = select_distribution(probs, spec, seed=0, split="train", example_ids=torch.zeros(7), positions=torch.arange(7))
    p = torch.softmax(logits / 2.0, -1)
    torch.testing.assert_close(probs, p)
    top = p.topk(5, -1)
    torch.testing.assert_close(got["ids"], top.indices)
    torch.testing.assert_close(got["probs"], top.values)
    torch.testing.assert_close(got["tail"], 1 - top.values.sum(-1))


def test_draws_depend_on_the_row_and_position_alone_and_estimate_the_distribution_without_bias():
    torch.manual_seed(2)
    logits = torch.randn(6, 30)
    spec = SparseSpec("sampled", vocab_size=30, draws=4000)
    example, position = torch.tensor([0, 0, 0, 5, 5, 9]), torch.tensor([0, 1, 2, 0, 1, 0])
    probs = teacher_probabilities(logits)
    together = select_distribution(probs.clone(), spec, seed=3, split="train", example_ids=example, positions=position)
    for n in range(6):  # each position alone, as another batching would compute it
        alone = select_distribution(teacher_probabilities(logits[n : n + 1]), spec, seed=3, split="train",
                                    example_ids=example[n : n + 1], positions=position[n : n + 1])  # fmt: skip
        torch.testing.assert_close(alone["ids"][0], together["ids"][n])
        torch.testing.assert_close(alone["counts"][0], together["counts"][n])
    estimate = torch.zeros(6, 30).scatter_add_(1, together["ids"].clamp_min(0), together["counts"].float()) / 4000
    assert (together["counts"].sum(-1) == 4000).all()
    assert (estimate - torch.softmax(logits, -1)).abs().max() < 0.03  # 4,000 draws: std below 0.008
    other = select_distribution(probs, spec, seed=4, split="train", example_ids=example, positions=position)
    assert not torch.equal(other["counts"], together["counts"])
    u = hashed_uniforms(0, 1, torch.arange(200), torch.zeros(200, dtype=torch.int64), 50)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


def test_topk_divergences_compare_k_ids_and_the_tail_as_their_definitions_say():
    torch.manual_seed(3)
    student, teacher = torch.randn(4, 12), torch.randn(4, 12)
    p = torch.softmax(teacher, -1)
    top = p.topk(3, -1)
    tail = 1 - top.values.sum(-1)
    q = torch.softmax(student, -1)
    q_top = q.gather(-1, top.indices)
    buckets_p = torch.cat([top.values, tail[:, None]], -1)
    buckets_q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    kl = (buckets_p * (buckets_p / buckets_q).log()).sum(-1).mean()
    got = topk_divergence(student, top.indices, top.values, tail, temperature=1.0, kind="kl", renormalize=False)
    torch.testing.assert_close(got, kl)
    rp, rq = top.values / top.values.sum(-1, keepdim=True), q_top / q_top.sum(-1, keepdim=True)
    renormalized = topk_divergence(student, top.indices, top.values, tail, temperature=1.0, kind="kl", renormalize=True)
    torch.testing.assert_close(renormalized, (rp * (rp / rq).log()).sum(-1).mean())
    reverse = topk_divergence(student, top.indices, top.values, tail, temperature=1.0, kind="reverse_kl",
                              renormalize=False)  # fmt: skip
    torch.testing.assert_close(reverse, (buckets_q * (buckets_q / buckets_p).log()).sum(-1).mean())
    m = (buckets_p + buckets_q) / 2
    jsd = 0.5 * ((buckets_p * (buckets_p / m).log()).sum(-1) + (buckets_q * (buckets_q / m).log()).sum(-1)).mean()
    got_jsd = topk_divergence(student, top.indices, top.values, tail, temperature=1.0, kind="jsd", renormalize=False)
    torch.testing.assert_close(got_jsd, jsd)
    full = divergence(torch.log_softmax(teacher, -1), torch.log_softmax(student, -1), "kl")
    torch.testing.assert_close(full, (p * (p / q).log()).sum(-1))


def test_the_sampled_estimators_gradient_is_full_kds_on_average():
    torch.manual_seed(4)
    teacher, student = torch.randn(3, 25), torch.randn(3, 25, requires_grad=True)
    T = 2.0
    full = divergence(torch.log_softmax(teacher / T, -1), torch.log_softmax(student / T, -1), "kl").mean() * T**2
    (exact,) = torch.autograd.grad(full, student)
    spec = SparseSpec("sampled", vocab_size=25, draws=10, temperature=T)
    grads = []
    for seed in range(400):
        drawn = select_distribution(teacher_probabilities(teacher, T), spec, seed=seed, split="train",
                                    example_ids=torch.zeros(3), positions=torch.arange(3))  # fmt: skip
        loss = sampled_kl(student, drawn["ids"].clamp_min(0), drawn["counts"], draws=10, temperature=T)
        grads.append(torch.autograd.grad(loss, student)[0])
    mean = torch.stack(grads).mean(0)
    assert F.cosine_similarity(mean.flatten(), exact.flatten(), dim=0) > 0.995
    assert F.cosine_similarity(grads[0].flatten(), exact.flatten(), dim=0) < 0.995  # one draw set is noisy
    p_hat = torch.zeros(3, 25).scatter_add_(1, drawn["ids"].clamp_min(0), drawn["counts"].float()) / 10
    seen = p_hat > 0  # KL(p_hat || student) by its definition, over the ids drawn
    by_definition = (p_hat * (p_hat.clamp_min(1e-12).log() - torch.log_softmax(student / T, -1)))[seen].sum() / 3 * T**2
    torch.testing.assert_close(loss, by_definition)
    masked = sampled_kl(student[None], drawn["ids"].clamp_min(0)[None], drawn["counts"][None], draws=10, temperature=T,
                        mask=torch.tensor([[True, False, True]]))  # fmt: skip
    rows = (p_hat * (p_hat.clamp_min(1e-12).log() - torch.log_softmax(student / T, -1))).sum(-1)
    torch.testing.assert_close(masked, (rows[0] + rows[2]) / 2 * T**2)


@pytest.mark.parametrize("scheme", ["topk", "sampled", "dense"])
def test_the_cache_holds_what_a_live_teacher_computes_on_the_same_blocks(scheme, lm_config_file, tiny_lm):
    cfg = load_config(lm_config_file(scheme))
    result = run_capture(cfg)
    cache = open_cache(result.location)
    spec = cache.manifest.distribution
    assert spec == SparseSpec(scheme, vocab_size=len(load_tokenizer(tiny_lm)), temperature=1.0,
                              k=6 if scheme == "topk" else None, draws=20 if scheme == "sampled" else None,
                              start_column="target_start")  # fmt: skip
    model = LM.load_model(tiny_lm).eval()
    entry = cache.shards("train")[1]
    data = cache.read_shard(entry, distribution=True)
    for i in (0, 5, entry.rows - 1):
        ids = torch.from_numpy(data.rows.input_ids[i].astype(np.int64))[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]  # (L, V)
        live = select_distribution(teacher_probabilities(logits), spec, seed=0, split="train", example_ids=torch.full((ids.shape[1],), int(
            data.rows.example_id[i])), positions=torch.arange(ids.shape[1]))  # fmt: skip
        stored = data.example_distribution(i)
        assert data.rows["covered_mass"][i] == pytest.approx(float(live["covered"].mean()), rel=1e-5)
        if scheme == "sampled":  # the mass of the distinct ids drawn, from the probabilities themselves
            p = torch.softmax(logits, -1)
            direct = [p[t, live["ids"][t][live["ids"][t] >= 0]].sum() for t in range(len(p))]
            torch.testing.assert_close(live["covered"], torch.stack(direct), rtol=1e-4, atol=1e-5)
        if scheme == "dense":
            np.testing.assert_allclose(stored["logprobs"], live["logprobs"].float().numpy(), atol=2e-2, rtol=1e-3)
        elif scheme == "topk":
            order = live["ids"].argsort(-1)
            np.testing.assert_array_equal(stored["ids"], live["ids"].gather(-1, order).numpy())
            probs = live["probs"].gather(-1, order).numpy()
            assert np.abs(np.sqrt(stored["probs"]) - np.sqrt(probs)).max() <= 1 / 510 + 1e-6
            np.testing.assert_allclose(stored["tail"], live["tail"].numpy(), rtol=1e-3, atol=1e-4)
        else:
            kept = live["ids"] >= 0
            np.testing.assert_array_equal(stored["entries"], kept.sum(-1).numpy())
            np.testing.assert_array_equal(stored["ids"], live["ids"][kept].numpy())
            np.testing.assert_array_equal(stored["counts"], live["counts"][kept].numpy())
    covered = cache.manifest.metadata["covered_mass"]
    assert 0.2 < covered <= 1.0 + 1e-6
    if scheme == "dense":
        assert covered == pytest.approx(1.0)
    elif scheme == "topk":  # one minus the mean stored tail, up to the tail's float16
        tails = np.concatenate(
            [cache.read_shard(e, distribution=True).distribution["tail"] for e in cache.shards("train")]
        )
        assert covered == pytest.approx(1 - tails.astype(np.float64).mean(), abs=1e-3)
    stats = np.stack(cache.read_shard(cache.shards("test")[0]).rows["lm_stats"])
    test = open_cache(result.location).manifest.metadata["teacher"]["metrics"]["test"]
    assert test["perplexity"] == pytest.approx(lm_metrics(stats.sum(0))["perplexity"], rel=1e-5)


@pytest.mark.parametrize("scheme", ["topk", "sampled", "dense"])
def test_a_student_learns_the_same_from_the_cache_as_from_the_live_teacher(scheme, lm_config_file):
    cfg = load_config(lm_config_file(scheme), ["distill.baselines=false"])
    run_capture(cfg)
    assert_cached_equals_online(cfg, "cut2", ("kl", "ce", "hidden_mse"))


def test_the_dry_run_estimates_the_distributions_bytes_with_the_rest(lm_config_file):
    from pipeline.teacher.capture import estimate_capture

    cfg = load_config(lm_config_file("sampled"))
    estimate = estimate_capture(cfg, sample_rows=40)
    manifest = run_capture(cfg).manifest
    assert set(estimate.bytes_by_output) == {"rows", "hidden_states", "distribution"}
    assert abs(estimate.bytes - manifest.bytes) / manifest.bytes < 0.2


def test_terms_a_distribution_cache_cannot_serve_are_refused_in_one_line(lm_config_file):
    path = lm_config_file("sampled")
    run_capture(load_config(path))
    bad = {
        "[{kind: kl, weight: 1.0, temperature: 2.0}]": r"taken at temperature 1.0; a kl term cannot use another",
        "[{kind: reverse_kl, weight: 1.0}]": r"holds draws \(sampled\), which estimate only forward KL",
        "[{kind: logit_mse, weight: 1.0}]": r"holds sampled distributions, not logits",
    }
    for loss, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            run_distill(load_config(path, [f"distill.loss={loss}"]))


def test_the_cli_distills_a_language_model_from_a_top_k_cache(lm_config_file, tmp_path):
    path = lm_config_file("topk")
    for command in ("teacher-train", "teacher-cache", "distill"):
        result = runner.invoke(app, [command, "--config", str(path)])
        assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "runs" / "latest" / "report.json").read_text())
    assert report["task"] == "causal-lm" and report["primary_metric"] == "perplexity"
    student = next(m for m in report["models"] if m["name"] == "cut2")
    assert set(student["metrics"]) == {"perplexity", "lm_loss", "accuracy", "ece"} and student["tokens_per_s"] > 0
    info = runner.invoke(app, ["cache", "info", str(tmp_path / "caches" / report["cache_key"])])
    info = json.loads(info.stdout)
    assert info["task"] == "causal-lm" and info["distribution"]["scheme"] == "topk" and info["distribution"]["k"] == 6
    assert 0 < info["metadata"]["covered_mass"] <= 1


def test_collated_batches_carry_each_tokens_distribution(lm_config_file):
    cfg = load_config(lm_config_file("sampled"))
    cache = open_cache(run_capture(cfg).location)
    data = cache.read_shard(cache.shards("train")[0], distribution=True)
    rows = [data.example_distribution(i) for i in (0, 3)]
    batch = pad_distributions(rows, 16, cache.manifest.distribution, np.zeros(2, np.int64))
    ids, counts = batch["teacher_distribution/ids"], batch["teacher_distribution/counts"]
    for b, row in enumerate(rows):
        starts = np.concatenate([[0], np.cumsum(row["entries"])])
        for t in range(len(row["entries"])):
            n = row["entries"][t]
            np.testing.assert_array_equal(ids[b, t, :n], row["ids"][starts[t] : starts[t + 1]])
            assert counts[b, t].sum() == 20 and (counts[b, t, n:] == 0).all()
