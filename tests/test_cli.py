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
    assert summary["reused"] is False and summary["rows"] == 100 and summary["bytes"] > 0
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
    info = json.loads(invoke("cache", "info", path).stdout)
    assert info["rows"] == 100 and info["splits"]["train"]["rows"] == 80
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
