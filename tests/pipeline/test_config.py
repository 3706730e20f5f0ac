"""Configs: the demo loads, bad keys and values are refused by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config, resolve_location

ROOT = Path(__file__).resolve().parents[2]


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
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
    raw["distill"]["loss"][0]["temprature"] = 3
    with pytest.raises(
        ConfigError, match=r"distill\.loss\[0\]: unknown key\(s\) \['temprature'\]; choose from .*temperature"
    ):
        load_config(write(tmp_path, raw))


def test_out_of_range_value_is_named(tmp_path):
    raw = demo_raw()
    raw["distill"]["loss"][0]["temperature"] = -1.0
    with pytest.raises(ConfigError, match=r"loss kl: temperature must be > 0; got -1.0"):
        load_config(write(tmp_path, raw))
    raw["distill"]["loss"][0] = {"kind": "kld"}
    with pytest.raises(
        ConfigError, match=r"unknown loss kind 'kld'; choose from \['kl', 'reverse_kl', 'jsd', 'logit_mse', 'ce'"
    ):
        load_config(write(tmp_path, raw))
    with pytest.raises(
        ConfigError,
        match=r"unknown task 'ner'; choose from \['causal-lm', 'question-answering', 'sequence-classification', 'token-classification'\]",
    ):
        load_config(write(tmp_path, demo_raw() | {"task": "ner"}))


def test_wrong_type_is_named(tmp_path):
    raw = demo_raw()
    raw["capture"]["shard_rows"] = "many"
    with pytest.raises(ConfigError, match=r"capture.shard_rows: expected int, got 'many'"):
        load_config(write(tmp_path, raw))


def test_student_needs_exactly_one_origin(tmp_path):
    raw = demo_raw()
    raw["distill"]["students"][0]["pretrained"] = "some/model"
    with pytest.raises(ConfigError, match="exactly one of teacher_layers, pretrained or architecture"):
        load_config(write(tmp_path, raw))


def test_layer_mappings_auto_uniform_last_and_explicit():
    from pipeline.student.objective import layer_pairs

    student = load_config(ROOT / "configs" / "demo.yaml").distill.students[0]  # cut from teacher layers [3, 6]
    assert layer_pairs(student, 2, 6) == ((1, 3), (2, 6))
    arch = {"layers": 3, "hidden_size": 64, "heads": 4}
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"distill.students.0={{name: s, architecture: {arch}}}"])
    spec = cfg.distill.students[0]
    assert layer_pairs(spec, 3, 12) == ((1, 4), (2, 8), (3, 12))  # uniform: student layer i -> teacher 4i
    assert layer_pairs(dataclasses.replace(spec, mapping="last"), 3, 12) == ((1, 10), (2, 11), (3, 12))
    assert layer_pairs(dataclasses.replace(spec, layer_map=((0, 0), (3, 12))), 3, 12) == ((0, 0), (3, 12))
    with pytest.raises(ConfigError, match="3 layers cannot map onto 2 teacher layers"):
        layer_pairs(spec, 3, 2)


def test_package_locations_resolve_or_say_what_to_install():
    assert resolve_location("pkg://pytest/__init__.py").endswith("pytest/__init__.py")
    assert resolve_location("plain/path") == "plain/path"
    with pytest.raises(ConfigError, match="'no_such_pkg_xyz' .* is not installed; run `make setup`"):
        resolve_location("pkg://no_such_pkg_xyz/file")


def test_overrides_set_nested_keys_and_list_items_and_are_checked():
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        ["distill.loss.0.weight=0.7", "distill.seeds=[1, 2]", "distill.students.1.freeze_embeddings=false",
         "data.max_examples=500"],
    )  # fmt: skip
    assert cfg.distill.loss[0].weight == 0.7 and cfg.distill.seeds == (1, 2) and cfg.data.max_examples == 500
    assert cfg.distill.students[1].freeze_embeddings is False and cfg.distill.students[0].freeze_embeddings is True
    with pytest.raises(ConfigError, match=r"distill.loss\[0\]: unknown key\(s\) \['wieght'\]"):
        load_config(ROOT / "configs" / "demo.yaml", ["distill.loss.0.wieght=0.7"])
    with pytest.raises(ConfigError, match="no item '5'"):
        load_config(ROOT / "configs" / "demo.yaml", ["distill.students.5.name=x"])
    with pytest.raises(ConfigError, match="must look like key.subkey=value"):
        load_config(ROOT / "configs" / "demo.yaml", ["distill.epochs"])


def test_fractions_label_numbers_and_layer_pairs_from_yaml(tmp_path):
    raw = demo_raw()
    raw["data"]["test_size"], raw["data"]["validation_size"] = 0.2, 300
    cfg = load_config(write(tmp_path, raw))
    assert cfg.data.test_size == 0.2 and isinstance(cfg.data.validation_size, int)
    (tmp_path / "d.yaml").write_text("path: x.csv\nlabel_names: [0, 1]\n")
    from pipeline.config import load_dataset_spec

    assert load_dataset_spec(tmp_path / "d.yaml").label_names == ("0", "1")
    raw["distill"]["students"][0]["layer_map"] = [[1, 3, 5]]
    with pytest.raises(ConfigError, match=r"student 'minilm-l2': layer_map must list \[student layer, teacher layer\] "
                       r"pairs of layers >= 0; got \[\[1, 3, 5\]\]"):  # fmt: skip
        load_config(write(tmp_path, raw))


def test_a_config_extends_another_section_by_section_without_its_name(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "name": "base", "seed": 3, "data": {"dataset": "d.yaml", "max_length": 64},
        "teacher": {"base_model": "m", "epochs": 2}, "capture": {"hidden_layers": [1, 2]}}))  # fmt: skip
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({
        "extends": "base.yaml", "teacher": {"seed": 7}, "capture": {"hidden_layers": []}}))  # fmt: skip
    child = load_config(tmp_path / "child.yaml")
    assert (child.name, child.seed, child.data.max_length, child.teacher.epochs) == ("child", 3, 64, 2)
    assert (child.teacher_seed, child.capture.hidden_layers) == (7, ())
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"extends": "child.yaml"}))
    with pytest.raises(ConfigError, match="which extends it again"):
        load_config(tmp_path / "child.yaml")
