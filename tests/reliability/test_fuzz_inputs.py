"""Bad input, generated: every malformed dataset, config or adapter gives our own error with a message that
points at the culprit — never another exception type, a traceback or a hang.

Datasets: JSONL files of random JSON-ish records around the alpaca/chat/dialogue shapes, with invalid
JSON lines mixed in, read by the real data pipeline. Configs: YAML files with random sections, keys and
values. Adapters: a trained adapter folder truncated, overwritten with random bytes, given tensors of the
wrong shape or a broken adapter_config.json, loaded with `loraforge.infer.load.load`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loraforge.config import SECTIONS, load_config
from loraforge.errors import ConfigError, DataError, LoraforgeError, ModelLoadError

SHORT = settings(max_examples=40, deadline=5000, suppress_health_check=list(HealthCheck), derandomize=True)
LONG = settings(max_examples=400, deadline=10000, suppress_health_check=list(HealthCheck))

KEYS = ["instruction", "input", "output", "messages", "conversations", "role", "content", "from", "value", "dialog",
        "dialogue", "turns", "text", "message_id", "parent_id"]
ROLES = ["user", "assistant", "system", "human", "gpt", "wizard", "", "USER"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                    st.text(max_size=30), st.sampled_from(ROLES))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=5)),
    max_leaves=20)
message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(ROLES) | json_values,
                                              "content": st.text(max_size=40) | json_values})
records = st.one_of(
    st.fixed_dictionaries({}, optional={"instruction": st.text(max_size=40) | json_values,
                                        "input": st.text(max_size=20) | json_values,
                                        "output": st.text(max_size=40) | json_values}),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=4) | json_values}),
    st.fixed_dictionaries({"dialog": st.lists(st.text(max_size=20) | json_values, max_size=4) | json_values}),
    json_values)
valid = st.one_of(
    st.fixed_dictionaries({"instruction": st.text(min_size=1, max_size=20), "output": st.text(min_size=1, max_size=20)},
                          optional={"input": st.text(max_size=10)}),
    st.fixed_dictionaries({"messages": st.just([{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello there"}])}))
BROKEN_LINES = ['{"instruction": "a", ', "[1, 2", "nul", '{"messages": [}', "\x00\x01", "'x'"]
lines = st.lists(st.one_of(valid.map(json.dumps), valid.map(json.dumps), records.map(json.dumps),
                           st.sampled_from(BROKEN_LINES)),
                 min_size=1, max_size=6)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from loraforge.config import ModelConfig
    from loraforge.model.load import load_tokenizer

    return load_tokenizer(str(tiny_model_dir), ModelConfig(model_name=str(tiny_model_dir)))


def _read_dataset(tmp: Path, tokenizer, rows: list[str], fmt: str, skip: bool, counter: dict) -> None:
    from loraforge.config import DataConfig
    from loraforge.data.pipeline import build_datasets

    path = tmp / f"data-{counter['n']}.jsonl"
    counter["n"] += 1
    path.write_text("\n".join(rows) + "\n")
    cfg = DataConfig(dataset=str(path), format=fmt, max_length=32, validation_split=0.0, cache=False,
                     skip_invalid=skip)
    try:
        bundle = build_datasets(cfg, tokenizer, 0)
    except LoraforgeError as e:
        counter["errors"] += 1
        assert isinstance(e, DataError), f"{type(e).__name__}: {e}"
        msg = str(e)
        assert path.name in msg, f"the message does not name the file: {msg}"
        if "line " not in msg:  # a record-level message names its line; a file-level one says what it lacks
            assert "no usable" in msg or "holds no records" in msg or "format" in msg, msg
        return
    counter["ok"] += 1
    stats = bundle.stats["train"]
    # Nothing silently dropped: every line read is used, skipped as invalid, or dropped and counted.
    assert stats.used + stats.skipped_invalid + stats.dropped_no_labels == stats.read, stats
    assert stats.read == len(rows), (stats, rows)


def _dataset_property(tmp_path_factory, tokenizer, counter):
    tmp = tmp_path_factory.mktemp("fuzz-data")

    # Found by the long run on a fresh machine: one JSONL line holding a JSON array was read as two records.
    @example(rows=['["0", null]'], fmt="auto", skip=True)
    @example(rows=['["0", null]', '{"instruction": "a", "output": "b"}'], fmt="auto", skip=False)
    @given(rows=lines, fmt=st.sampled_from(["auto", "alpaca", "chat", "dialogue"]), skip=st.booleans())
    def prop(rows, fmt, skip):
        _read_dataset(tmp, tokenizer, rows, fmt, skip, counter)

    return prop


def test_fuzzed_dataset_records_give_data_errors_naming_file_and_line(tmp_path_factory, tokenizer):
    counter = {"n": 0, "ok": 0, "errors": 0}
    SHORT(_dataset_property(tmp_path_factory, tokenizer, counter))()
    print(f"datasets tried: {counter['n']} ({counter['errors']} DataError, {counter['ok']} read)")
    assert counter["errors"] > 0 and counter["ok"] > 0


@pytest.mark.long
def test_fuzzed_dataset_records_long(tmp_path_factory, tokenizer):
    counter = {"n": 0, "ok": 0, "errors": 0}
    LONG(_dataset_property(tmp_path_factory, tokenizer, counter))()
    print(f"datasets tried: {counter['n']} ({counter['errors']} DataError, {counter['ok']} read)")


# ---------------------------------------------------------------------------------------------- configs

FIELDS = {name: [f for f in cls.__dataclass_fields__] for name, cls in SECTIONS.items()}
section_names = st.sampled_from([*SECTIONS, "trainer", "Model", ""]) | st.text(max_size=6)
yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(), st.text(max_size=12),
              st.sampled_from(["auto", "nf4", "qv", "all-linear", "cosine", "1e-4", "nan", "-1", "yes", "~"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)


@st.composite
def configs(draw):
    doc: dict = {}
    for section in draw(st.lists(section_names, max_size=4, unique=True)):
        known = FIELDS.get(section, [])
        keys = draw(st.lists(st.sampled_from(known) | st.text(max_size=10) if known else st.text(max_size=10),
                             max_size=4, unique=True))
        doc[section] = draw(st.just({k: draw(yaml_values) for k in keys}) | yaml_values)
    return draw(st.just(doc) | yaml_values)


def _load_yaml(path: Path, text: str, counter: dict) -> None:
    path.write_text(text)
    counter["n"] += 1
    try:
        load_config(path)
    except LoraforgeError as e:
        counter["errors"] += 1
        assert isinstance(e, ConfigError), f"{type(e).__name__}: {e}"
        msg = str(e)
        assert str(path) in msg, f"the message does not name the file: {msg}"
        return
    counter["ok"] += 1


def _config_property(tmp_path_factory, counter):
    path = tmp_path_factory.mktemp("fuzz-config") / "config.yaml"

    @given(doc=configs())
    def structured(doc):
        _load_yaml(path, yaml.safe_dump(doc, allow_unicode=True), counter)

    @given(text=st.text(max_size=80))
    def raw_text(text):
        _load_yaml(path, text, counter)

    return structured, raw_text


def test_fuzzed_configs_give_config_errors_naming_file_and_key(tmp_path_factory):
    counter = {"n": 0, "ok": 0, "errors": 0}
    for prop in _config_property(tmp_path_factory, counter):
        SHORT(prop)()
    print(f"configs tried: {counter['n']} ({counter['errors']} ConfigError, {counter['ok']} valid)")
    assert counter["errors"] > 0


@pytest.mark.parametrize("text, names", [
    ("model: [1, 2]\n", "model"), ("model: 5\n", "model"), ("lora: just-a-string\n", "lora"),
    ("training:\n  max_steps: [3]\n", "training.max_steps"), ("lora:\n  r: .inf\n", "lora.r"),
    ("training:\n  learning_rate: .nan\n", "training.learning_rate"), ("data:\n  sources: [7]\n", "data.sources"),
    ("eval: {num_beams: true}\n", "eval.num_beams"), ("1: {}\n", "unknown section '1'"),
])
def test_wrong_section_shapes_name_the_section_or_key(tmp_path: Path, text: str, names: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert names in str(info.value) and str(path) in str(info.value), str(info.value)


@pytest.mark.long
def test_fuzzed_configs_long(tmp_path_factory):
    counter = {"n": 0, "ok": 0, "errors": 0}
    for prop in _config_property(tmp_path_factory, counter):
        LONG(prop)()
    print(f"configs tried: {counter['n']} ({counter['errors']} ConfigError, {counter['ok']} valid)")


# ---------------------------------------------------------------------------------------------- adapters


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """A trained adapter folder of the tiny model (PEFT layout; its base is named by absolute path)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "infer"))
    from lora_runs import make_lora_run

    run = make_lora_run(tmp_path_factory.mktemp("fuzz-adapter") / "run", str(tiny_model_dir), steps=1)
    return run / "adapter"


def _corrupt(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "adapter_model.safetensors"
    data = weights.read_bytes()
    rnd = bytes(os.urandom(len(data)))
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "random-bytes":
        weights.write_bytes(rnd)
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "bad-header-length":
        weights.write_bytes((2**60).to_bytes(8, "little") + data[8:])
    elif how == "wrong-shapes":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        save_file({k: v.new_zeros(v.shape[0] + 3, v.shape[-1] + 1) for k, v in tensors.items()}, str(weights))
    elif how == "config-not-json":
        (dst / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    elif how == "config-wrong-types":
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(r="eight", target_modules=7)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    elif how == "missing-weights":
        weights.unlink()
    elif how == "pickle-only":  # an old-style adapter_model.bin: never unpickled, only safetensors load
        weights.rename(dst / "adapter_model.bin")
    return dst


CORRUPTIONS = ["truncated", "random-bytes", "empty", "bad-header-length", "wrong-shapes", "config-not-json",
               "config-wrong-types", "missing-weights", "pickle-only"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_adapter_gives_a_clear_model_load_error(adapter_dir: Path, tmp_path: Path, how: str):
    from loraforge.infer.load import load

    bad = _corrupt(adapter_dir, tmp_path / "adapter", how)
    with pytest.raises(ModelLoadError) as info:
        load(bad, device="cpu")
    assert str(bad) in str(info.value), str(info.value)
