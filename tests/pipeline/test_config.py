"""Configs: the demo loads, bad keys and values are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config, resolve_location

ROOT = Path(__file__).resolve().parents[2]


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.distill.students, path


def write(tmp_path, raw) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def demo_raw() -> dict:
    return yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())


def test_unknown_key_is_named_with_the_choices(tmp_path):
    raw = demo_raw()
    raw["distill"]["loss"]["temprature"] = 3
    with pytest.raises(
        ConfigError, match=r"distill\.loss: unknown key\(s\) \['temprature'\]; choose from .*temperature"
    ):
        load_config(write(tmp_path, raw))


def test_out_of_range_value_is_named(tmp_path):
    raw = demo_raw()
    raw["distill"]["loss"]["alpha"] = 1.5
    with pytest.raises(ConfigError, match=r"loss.alpha must be in \[0, 1\]; got 1.5"):
        load_config(write(tmp_path, raw))


def test_wrong_type_is_named(tmp_path):
    raw = demo_raw()
    raw["capture"]["shard_rows"] = "many"
    with pytest.raises(ConfigError, match=r"capture.shard_rows: expected int, got 'many'"):
        load_config(write(tmp_path, raw))


def test_student_needs_exactly_one_origin(tmp_path):
    raw = demo_raw()
    raw["distill"]["students"][0]["pretrained"] = "some/model"
    with pytest.raises(ConfigError, match="exactly one of teacher_layers or pretrained"):
        load_config(write(tmp_path, raw))


def test_layer_map_defaults_to_the_layers_a_student_was_cut_from():
    student = load_config(ROOT / "configs" / "demo.yaml").distill.students[0]
    assert student.mapping == tuple((i + 1, t) for i, t in enumerate(student.teacher_layers))


def test_package_locations_resolve_or_say_what_to_install():
    assert resolve_location("pkg://pytest/__init__.py").endswith("pytest/__init__.py")
    assert resolve_location("plain/path") == "plain/path"
    with pytest.raises(ConfigError, match="'no_such_pkg_xyz' .* is not installed; run `make setup`"):
        resolve_location("pkg://no_such_pkg_xyz/file")


def test_overrides_set_nested_keys_and_list_items_and_are_checked():
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        ["distill.loss.alpha=0.7", "distill.seeds=[1, 2]", "distill.students.1.freeze_embeddings=false",
         "data.max_examples=500"],
    )  # fmt: skip
    assert cfg.distill.loss.alpha == 0.7 and cfg.distill.seeds == (1, 2) and cfg.data.max_examples == 500
    assert cfg.distill.students[1].freeze_embeddings is False and cfg.distill.students[0].freeze_embeddings is True
    with pytest.raises(ConfigError, match=r"distill.loss: unknown key\(s\) \['alfa'\]"):
        load_config(ROOT / "configs" / "demo.yaml", ["distill.loss.alfa=0.7"])
    with pytest.raises(ConfigError, match="no item '5'"):
        load_config(ROOT / "configs" / "demo.yaml", ["distill.students.5.name=x"])
    with pytest.raises(ConfigError, match="must look like key.subkey=value"):
        load_config(ROOT / "configs" / "demo.yaml", ["distill.loss.alpha"])
