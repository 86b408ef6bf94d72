"""Config parsing: the seed's names and defaults, YAML + overrides, and errors a newcomer understands."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loraforge.config import (
    DataConfig,
    EvalConfig,
    LoRAConfig,
    ModelConfig,
    TrainingConfig,
    config_from_dict,
    load_config,
    parse_overrides,
)
from loraforge.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_seed_defaults():
    m, lo, t, e = ModelConfig(), LoRAConfig(), TrainingConfig(), EvalConfig()
    assert m.use_4bit and m.bnb_4bit_quant_type == "nf4" and m.model_name == "smollm2-135m-instruct"
    assert (lo.r, lo.lora_alpha, lo.lora_dropout, lo.bias, lo.task_type) == (8, 16, 0.05, "none", "CAUSAL_LM")
    assert lo.resolved_targets() == ["q_proj", "v_proj"]
    assert (t.learning_rate, t.per_device_train_batch_size, t.gradient_accumulation_steps) == (2e-4, 4, 4)
    assert (t.num_train_epochs, t.weight_decay, t.warmup_ratio, t.max_grad_norm) == (3.0, 0.01, 0.03, 0.3)
    assert t.optim == "paged_adamw_32bit" and t.lr_scheduler_type == "cosine"
    assert (e.max_new_tokens, e.num_beams, e.temperature, e.top_p) == (256, 4, 0.7, 0.9)
    assert DataConfig().max_length == 512 and not DataConfig().train_on_inputs


def test_presets_resolve():
    assert LoRAConfig(target_modules="all-linear").resolved_targets() == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert LoRAConfig(target_modules="attention").resolved_targets() == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert LoRAConfig(target_modules=["q_proj", "o_proj"]).resolved_targets() == ["q_proj", "o_proj"]


def test_yaml_and_overrides(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  learning_rate: 1e-4\n  max_steps: 10\nlora:\n  r: 4\n")
    cfg = load_config(path, ["lora.r=32", "lora.target_modules=[q_proj,k_proj]", "data.packing=true",
                             "eval.decoding=greedy"])
    assert cfg.training.learning_rate == pytest.approx(1e-4)  # "1e-4" is a str for PyYAML; coerced
    assert cfg.training.max_steps == 10
    assert cfg.lora.r == 32  # the command line wins over the file
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.data.packing is True and cfg.eval.decoding == "greedy"


def test_round_trip(tmp_path: Path):
    cfg = load_config(None, ["training.max_steps=7", "data.sources=[{path: a.jsonl, weight: 2}]"])
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


@pytest.mark.parametrize("raw, needles", [
    ({"training": {"learing_rate": 1}}, ["training.learing_rate", "unknown key", "Did you mean 'learning_rate'"]),
    ({"trainig": {}}, ["unknown section 'trainig'", "Did you mean 'training'"]),
    ({"lora": {"r": 0}}, ["lora.r = 0", "out of range", ">= 1"]),
    ({"lora": {"lora_dropout": 1.5}}, ["lora.lora_dropout = 1.5", "< 1.0"]),
    ({"model": {"use_4bit": "yes"}}, ["model.use_4bit = 'yes'", "true or false"]),
    ({"model": {"bnb_4bit_quant_type": "nf5"}}, ["model.bnb_4bit_quant_type = 'nf5'", "'nf4', 'fp4'"]),
    ({"lora": {"target_modules": "everything"}}, ["not a preset", "all-linear"]),
    ({"training": {"per_device_train_batch_size": 2.5}}, ["per_device_train_batch_size = 2.5", "an integer"]),
    ({"model": {"use_4bit": True, "use_8bit": True}}, ["choose one"]),
    ({"data": {"sources": [{"pth": "x"}]}}, ["data.sources[0].pth", "Did you mean 'path'"]),
])
def test_errors_name_key_value_and_allowed(raw, needles):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, "my.yaml")
    text = str(err.value)
    assert text.startswith("my.yaml: ")
    for needle in needles:
        assert needle in text


def test_python_api_validates_too():
    with pytest.raises(ConfigError, match="lora_alpha"):
        LoRAConfig(lora_alpha=-1)


def test_bad_yaml_and_missing_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["learning_rate"])


def test_every_shipped_config_loads():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs, "configs/ should hold ready-to-run files"
    for path in configs:
        load_config(path)  # raises on any unknown key, wrong type or out-of-range value


def test_demo_config_is_a_plain_run_config():
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg = config_from_dict(raw)
    assert cfg.model.model_name == "smollm2-135m-instruct" and cfg.data.dataset == "chitchat"
