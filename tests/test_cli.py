"""The command line: each stage through `kdcache`, JSON output, and one-line errors."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_the_three_stages_run_from_the_command_line(config_file, tmp_path):
    assert invoke("teacher-train", "--config", config_file).exit_code == 0
    first = invoke("teacher-cache", "--config", config_file, "--json")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["reused"] is False and summary["rows"] == 120 and summary["bytes"] > 0
    again = json.loads(invoke("teacher-cache", "--config", config_file, "--json").stdout.strip().splitlines()[-1])
    assert again == {**summary, "reused": True}
    other_root = tmp_path / "other-root"
    moved = invoke("teacher-cache", "--config", config_file, "--cache-root", other_root, "--json")
    assert json.loads(moved.stdout.strip().splitlines()[-1])["path"] == str(other_root / summary["key"])
    result = invoke(
        "distill", "--config", config_file, "--no-baselines", "--seeds", "3", "--set", "distill.loss.1.weight=0.0"
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "runs" / "latest" / "report.json").read_text())
    assert [(m["name"], m["seeds"]) for m in report["models"]] == [("teacher", [0]), ("tiny-l2", [3])]
    assert report["config"]["distill"]["loss"][1]["weight"] == 0.0  # from --set


def test_errors_are_one_line_and_exit_1(config_file, tmp_path):
    result = invoke("distill", "--config", tmp_path / "missing.yaml")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"error: config file {tmp_path / 'missing.yaml'} does not exist"]
    raw = yaml.safe_load(config_file.read_text())
    raw["capture"]["hidden_layers"] = [9]
    config_file.write_text(yaml.safe_dump(raw))
    assert invoke("teacher-train", "--config", config_file).exit_code == 0
    result = invoke("teacher-cache", "--config", config_file)
    assert result.exit_code == 1
    assert (
        result.stderr.strip().splitlines()[-1] == "error: capture.hidden_layers [9]: [9] outside 0..4 for this teacher"
    )


def test_cache_commands_verify_list_describe_copy_and_remove(config_file, tmp_path):
    assert invoke("teacher-train", "--config", config_file).exit_code == 0
    summary = json.loads(invoke("teacher-cache", "--config", config_file, "--json").stdout.strip().splitlines()[-1])
    path = summary["path"]
    assert invoke("cache", "verify", path).exit_code == 0
    listing = invoke("cache", "ls", tmp_path / "caches")
    assert summary["key"] in listing.stdout and "complete" in listing.stdout
    assert "fingerprint" not in listing.stdout and "{" not in listing.stdout  # the teacher's source, not its card
    info = json.loads(invoke("cache", "info", path).stdout)
    assert info["task"] == "sequence-classification"
    assert info["rows"] == 120 and info["splits"]["train"]["rows"] == 80 and info["splits"]["test"]["rows"] == 20
    assert info["splits"]["train"]["tensors"] and not info["splits"]["test"]["tensors"]
    assert set(info["attachments"]) == {"tokenizer", "teacher"}
    pushed = invoke("cache", "push", path, tmp_path / "shared")
    assert pushed.exit_code == 0 and "copied" in pushed.stdout
    shard = sorted((tmp_path / "caches" / summary["key"] / "train").glob("shard-*"))[1]
    rows = shard / "rows.arrow"
    data = bytearray(rows.read_bytes())
    data[100] ^= 0xFF
    rows.write_bytes(bytes(data))
    result = invoke("cache", "verify", path)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"bad shard train/{shard.name}: rows.arrow does not match its checksum"
    assert invoke("cache", "verify", tmp_path / "shared" / summary["key"]).exit_code == 0
    assert invoke("cache", "rm", path).exit_code == 0
    gone = invoke("cache", "verify", path)
    assert gone.exit_code == 1 and "no complete cache" in gone.stderr


def test_a_colleague_with_only_the_cache_url_distills(config_file, tiny_dataset, tiny_teacher, s3_bucket, tmp_path):
    """The two commands of a shared cache: the capture goes to S3 (moto on loopback); then, in an empty directory
    with no data file and no teacher on disk, distill reads nothing but the cache's URL and a students-only config."""
    import os
    import shutil
    import subprocess
    import sys

    data = tmp_path / "data"  # a copy of the data set that this test can delete
    shutil.copytree(tiny_dataset.parent, data)
    definition = yaml.safe_load((data / "reviews.yaml").read_text()) | {"path": str(data / "reviews.csv")}
    (data / "reviews.yaml").write_text(yaml.safe_dump(definition))
    raw = yaml.safe_load(config_file.read_text())
    raw["data"]["dataset"] = str(data / "reviews.yaml")
    config_file.write_text(yaml.safe_dump(raw))
    root = f"s3://{s3_bucket}/team"
    assert invoke("teacher-train", "--config", config_file).exit_code == 0
    captured = invoke("teacher-cache", "--config", config_file, "--cache-root", root, "--json")
    assert captured.exit_code == 0, captured.output
    url = json.loads(captured.stdout.strip().splitlines()[-1])["path"]
    shutil.rmtree(data)
    shutil.rmtree(tmp_path / "teachers")

    laptop = tmp_path / "laptop"
    laptop.mkdir()
    (laptop / "students.yaml").write_text(yaml.safe_dump({"distill": {
        "students": [
            {"name": "cut", "teacher_layers": [2, 4]},  # needs the teacher: the cache bundles it
            {"name": "small", "architecture": {"layers": 2, "hidden_size": 16, "heads": 2}, "mapping": "uniform"},
            {"name": "mine", "pretrained": str(tiny_teacher), "loss": [{"kind": "kl"}, {"kind": "ce"}]},
        ],
        "loss": [{"kind": "kl", "weight": 0.5}, {"kind": "ce", "weight": 0.5}, {"kind": "hidden_mse"}],
        "epochs": 1, "batch_size": 16,
    }}))  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KDCACHE_HOME": str(tmp_path / "home")}

    def kdcache(*args):
        command = [sys.executable, "-m", "cli", *args]
        return subprocess.run(command, cwd=laptop, capture_output=True, text=True, timeout=300, env=env)

    run = kdcache("distill", "--cache", url, "--config", "students.yaml")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((laptop / "runs" / "latest" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["teacher", "cut", "small", "mine", "cut-no-kd", "small-no-kd",
                                                     "mine-no-kd"]  # fmt: skip
    from cache_store import open_cache

    card = open_cache(url).manifest.metadata["teacher"]
    teacher = report["models"][0]
    assert teacher["metrics"] == card["metrics"]["test"]
    assert teacher["params"] == card["params"] and teacher["examples_per_s"] > 0  # loaded for the cut student
    saved = laptop / "runs" / "latest" / "models" / "small-seed0"
    assert (saved / "tokenizer_config.json").exists()  # the student ships the cache's tokenizer

    from transformers import BertTokenizer

    other = tmp_path / "other-vocab"
    shutil.copytree(tiny_teacher, other)
    BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "film"])}
                  ).save_pretrained(str(other))  # fmt: skip
    raw = yaml.safe_load((laptop / "students.yaml").read_text())
    raw["distill"]["students"] = [{"name": "mismatched", "pretrained": str(other)}]
    (laptop / "other.yaml").write_text(yaml.safe_dump(raw))
    refused = kdcache("distill", "--cache", url, "--config", "other.yaml")
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert (
        refused.stderr.startswith("error: student 'mismatched': the tokenizer of ") and "fingerprint" in refused.stderr
    )
