"""Someone else's run folder, dataset or config: nothing in it executes, and nothing in it crashes us.

Exploits are real payloads (a Jinja template that reaches Python's `os`, a model whose remote code writes a
file); each test proves the payload did not run by checking that the marker file it would create does not
exist. Bad input (odd encodings, compressed files, garbage, huge fields, deep nesting, a YAML alias bomb,
absurd numbers, truncated weights) gives our own error naming the file and the record or field, and
exit code 2 from the CLI — never a traceback.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loraforge.config import load_config
from loraforge.errors import ConfigError, DataError, ModelLoadError

SRC = Path(__file__).parents[2] / "src" / "loraforge"
REC = {"instruction": "Say hi", "output": "hi"}


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "loraforge.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def assert_clean_error(proc: subprocess.CompletedProcess, *names: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for name in names:
        assert name in out, f"{name!r} not in: {out[-2000:]}"


def evil_run(src: Path, dst: Path, *, template: str | None = None, kind: str | None = None,
             model: dict | None = None) -> Path:
    """A copy of a real run folder whose config.yaml / loraforge_run.json were edited by an attacker."""
    shutil.copytree(src, dst)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    if template is not None:
        cfg["data"]["template"] = template
    cfg["model"].update(model or {})
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    if kind is not None:
        facts = json.loads((dst / "loraforge_run.json").read_text())
        facts["data_kind"] = kind
        (dst / "loraforge_run.json").write_text(json.dumps(facts))
    return dst


# ------------------------------------------------------------------------------------ templates never execute

def exploits(marker: Path) -> list[str]:
    cmd = f"touch {marker}"
    return [
        f"{{{{ cycler.__init__.__globals__.os.popen('{cmd}').read() }}}}{{{{ instruction }}}}",
        f"{{{{ joiner.__init__.__globals__.os.system('{cmd}') }}}}",
        f"{{{{ lipsum.__globals__['os'].popen('{cmd}').read() }}}}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        f"{{{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('{cmd}') }}}}",
        "{{ (instruction|attr('__class__')|attr('__mro__'))[1] }}",
    ]


def test_user_templates_are_sandboxed(tmp_path: Path):
    from loraforge.data.templates import alpaca_segments

    marker = tmp_path / "PWNED"
    for template in exploits(marker):
        with pytest.raises(DataError, match="data.template"):
            alpaca_segments(dict(REC, input=""), template)
        assert not marker.exists(), template
    # The sandbox also bounds what a short template can build or loop over.
    for template in ("{{ 'x' * 10**10 }}", "{{ 9 ** (9 ** 9) }}", "{% for i in range(10**9) %}{% endfor %}"):
        with pytest.raises(DataError, match="data.template"):
            alpaca_segments(dict(REC, input=""), template)
    # An ordinary template still renders (Jinja drops one trailing newline, as it did before the sandbox).
    ok = "### Q: {{ instruction | upper }}{% if input %} ({{ input }}){% endif %}\n### A:\n"
    assert alpaca_segments(dict(REC, input=""), ok)[0][0] == "### Q: SAY HI\n### A:"


def test_a_run_folders_template_cannot_run_a_command(tiny_run: Path, tmp_path: Path):
    marker = tmp_path / "PWNED"
    run = evil_run(tiny_run, tmp_path / "evil", template=exploits(marker)[0], kind="alpaca")
    proc = cli("generate", str(run), "-p", "hi", "--max-new-tokens", "2")
    assert_clean_error(proc, "data.template", "unsafe")
    assert not marker.exists()


def test_a_models_chat_template_cannot_run_a_command(tiny_run: Path, tiny_model_dir: Path, tmp_path: Path):
    """transformers renders chat templates in Jinja's sandbox; the refusal reaches the user as one message."""
    marker = tmp_path / "PWNED"
    base = shutil.copytree(tiny_model_dir, tmp_path / "evil-base")
    (base / "chat_template.jinja").unlink(missing_ok=True)  # it would win over tokenizer_config.json
    tok_cfg = json.loads((base / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = exploits(marker)[0] + "{{ messages[0]['content'] }}"
    (base / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    run = evil_run(tiny_run, tmp_path / "evil", kind="chat", model={"model_name": str(base)})
    proc = cli("generate", str(run), "-p", "hi", "--max-new-tokens", "2")
    assert_clean_error(proc, "chat template", "unsafe")
    assert not marker.exists()


# --------------------------------------------------------------------------- remote code only when the user says

def test_a_run_folder_cannot_turn_on_remote_code(tiny_run: Path, tiny_model_dir: Path, tmp_path: Path):
    marker = tmp_path / "REMOTE-CODE-RAN"
    base = shutil.copytree(tiny_model_dir, tmp_path / "hub-model")
    (base / "evil_llama.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\n\n\n"
        "class EvilLlama(LlamaForCausalLM):\n    pass\n")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil_llama.EvilLlama"}
    (base / "config.json").write_text(json.dumps(config))
    run = evil_run(tiny_run, tmp_path / "run", model={"model_name": str(base), "trust_remote_code": True})
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}

    proc = cli("generate", str(run), "-p", "hi", "--max-new-tokens", "2", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists(), "the run folder's trust_remote_code ran the model's code"
    line = next(x for x in proc.stderr.splitlines() if "trust_remote_code" in x)
    assert str(run) in line and "--trust-remote-code" in line, line

    # The flag is what allows it (and proves the payload above was live).
    proc = cli("generate", str(run), "-p", "hi", "--max-new-tokens", "2", "--trust-remote-code", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()


def test_run_folder_facts_that_are_not_json_are_a_model_load_error(tiny_run: Path, tmp_path: Path):
    from loraforge.infer.load import locate

    run = shutil.copytree(tiny_run, tmp_path / "run")
    for text in ("{not json", "[1, 2]", '{"data_kind": "python"}', "[" * 100_000):
        (run / "loraforge_run.json").write_text(text)
        with pytest.raises(ModelLoadError, match="loraforge_run.json"):
            locate(run)


# ------------------------------------------------------------------------------------------------ data files

def read_all(path: Path) -> list:
    from loraforge.data.sources import iter_source

    return [r.data for r in iter_source(str(path))]


@pytest.mark.parametrize("name, content", [
    ("utf16.jsonl", (json.dumps(REC) + "\n").encode("utf-16")),
    ("utf16be.csv", codecs.BOM_UTF16_BE + "instruction,output\nSay hi,hi\n".encode("utf-16-be")),
    ("bom.jsonl", codecs.BOM_UTF8 + (json.dumps(REC) + "\n").encode()),
    ("bom.json", codecs.BOM_UTF8 + json.dumps([REC]).encode()),
    ("bom.csv", codecs.BOM_UTF8 + b"instruction,output\r\nSay hi,hi\r\n"),
    ("data.jsonl.gz", gzip.compress((json.dumps(REC) + "\n").encode())),
    ("data.csv.gz", gzip.compress(b"instruction,output\nSay hi,hi\n")),
    ("data.json.gz", gzip.compress(json.dumps({"rows": [REC]}).encode())),
])
def test_other_encodings_and_gzip_are_read(tmp_path: Path, name: str, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    assert read_all(path) == [REC]


def test_long_csv_fields_are_read(tmp_path: Path):
    path = tmp_path / "long.csv"
    path.write_text(f"instruction,output\n{'a' * 200_000},hi\n")  # csv's default limit is 131,072
    assert read_all(path)[0]["instruction"] == "a" * 200_000


@pytest.mark.parametrize("name, content, where", [
    ("garbage.jsonl", bytes(range(256)) * 64, "binary file"),
    ("garbage.csv", os.urandom(4096).replace(b"\x00", b"") + b"\x00", "binary file"),
    ("garbage.parquet", b"PAR1" + os.urandom(256) + b"PAR1", "not a readable Parquet file"),
    ("empty.parquet", b"", "not a readable Parquet file"),
    ("truncated.jsonl.gz", gzip.compress((json.dumps(REC) + "\n").encode() * 50)[:40], "truncated gzip"),
    ("huge-field.csv", b"instruction,output\nok,fine\n" + b"a" * (17 * 1024 * 1024) + b",b\n", "line 3"),
    ("bad-utf8.txt", b"a document\n\n\xff\xfe\xfa broken\n", "line 3"),
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
def test_unreadable_files_name_the_file_and_line(tmp_path: Path, name: str, content: bytes, where: str):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_all(path)
    assert str(path) in str(info.value) and where in str(info.value), str(info.value)


@pytest.mark.parametrize("line, problem", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (b'{"instruction": "\xff", "output": "x"}', "not UTF-8"),
])
def test_a_bad_jsonl_line_is_a_record_error_naming_the_line(tmp_path: Path, tiny_model_dir: Path, line, problem):
    """One bad line is an invalid record: reported with its line, or skipped and counted with skip_invalid."""
    from loraforge.config import DataConfig, ModelConfig
    from loraforge.data.pipeline import build_datasets
    from loraforge.model.load import load_tokenizer

    path = tmp_path / "data.jsonl"
    line = line if isinstance(line, bytes) else line.encode()
    path.write_bytes((json.dumps(REC) + "\n").encode() * 3 + line + b"\n")
    tok = load_tokenizer(str(tiny_model_dir), ModelConfig(model_name=str(tiny_model_dir)))
    cfg = DataConfig(dataset=str(path), max_length=32, validation_split=0.0, cache=False)
    with pytest.raises(DataError) as info:
        build_datasets(cfg, tok, 0)
    assert f"{path}, line 4" in str(info.value) and problem in str(info.value), str(info.value)
    bundle = build_datasets(DataConfig(**{**cfg.__dict__, "skip_invalid": True}), tok, 0)
    assert len(bundle.train) == 3


def test_binary_dataset_through_the_cli_exits_2(tmp_path: Path, tiny_model_dir: Path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(bytes(range(256)) * 64)
    assert_clean_error(cli("data", "preview", str(path), "--model", str(tiny_model_dir)), str(path), "binary")


# ---------------------------------------------------------------------------------------------------- configs

def billion_laughs() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\nmodel: {model_name: *i}\n"


def test_yaml_alias_bomb_is_refused_quickly_through_the_cli(tmp_path: Path):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    start = time.monotonic()
    proc = cli("train", str(path))
    assert_clean_error(proc, str(path), "aliases")
    assert time.monotonic() - start < 60  # 87 s and 4.76 GB before the bound; import time dominates now


@pytest.mark.parametrize("text, names", [
    ("lora:\n  r: 8\n  lora_alpha: 16\n  r: 16\n", ["duplicate key 'r'", "line 4", "first on line 2"]),
    ("lora: {r: 8}\nmodel: {}\nlora: {r: 4}\n", ["duplicate key 'lora'", "line 3"]),
    ("training:\n  num_train_epochs: .inf\n", ["training.num_train_epochs", "finite"]),
    ("training:\n  seed: 1e30\n", ["training.seed"]),
    ("training:\n  seed: 1.0e+30\n", ["training.seed", "4294967295"]),
    ("data:\n  seed: -1\n", ["data.seed", ">= 0"]),
    ("lora:\n  lora_alpha: 1.0e+30\n", ["lora.lora_alpha", "<= 65536"]),
    ("training:\n  max_steps: 1" + "0" * 400 + "\n", ["training.max_steps", "2**63-1"]),
    ("training:\n  learning_rate: 1" + "0" * 400 + "\n", ["training.learning_rate", "401 digits"]),
    ("eval:\n  temperature: .nan\n", ["eval.temperature", "finite"]),
    ("model:\n  model_name: weights/model.safetensors\n", ["model.model_name", "weights file"]),
    ("model: " + "[" * 5000 + "]" * 5000 + "\n", ["nested too deeply"]),
])
def test_bad_config_values_name_the_file_and_key(tmp_path: Path, text: str, names: list[str]):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    for name in [str(path), *names]:
        assert name in str(info.value), str(info.value)


def test_config_merge_keys_and_a_few_anchors_still_work(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text("lora: &l {r: 4, lora_alpha: 8}\n"
                    "eval: {num_beams: 2}\n")
    assert load_config(path).lora.r == 4
    path.write_text("lora:\n  <<: {r: 4, lora_alpha: 8}\n  r: 16\n")  # an explicit key overrides a merged one
    assert load_config(path).lora.r == 16


def test_output_dir_that_is_a_file_is_a_config_error(tmp_path: Path):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    with pytest.raises(ConfigError, match="training.output_dir .* existing file"):
        load_config(None, [f"training.output_dir={taken}"])
    assert taken.read_text() == "mine"


# ----------------------------------------------------------------------------------------------------- models

def test_truncated_weights_given_as_model_name_are_model_load_errors(tmp_path: Path, tiny_model_dir: Path):
    from loraforge.config import ModelConfig
    from loraforge.model.embedded import embedded_gguf_path
    from loraforge.model.load import load_base

    folder = shutil.copytree(tiny_model_dir, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    gguf = tmp_path / "truncated.gguf"
    with embedded_gguf_path("smollm2-135m-instruct").open("rb") as f:
        gguf.write_bytes(f.read(4 * 1024 * 1024))  # the header and the first tensors only
    for name in (folder, gguf):
        cfg = ModelConfig(model_name=str(name), use_4bit=False, device="cpu", cache_dir=str(tmp_path / "cache"))
        with pytest.raises(ModelLoadError) as info:
            load_base(cfg, for_training=False)
        assert str(name) in str(info.value), str(info.value)


def test_modules_to_save_that_name_nothing_are_refused(tiny_model_dir: Path):
    from loraforge.config import LoRAConfig, ModelConfig
    from loraforge.model.load import load_base
    from loraforge.model.lora import peft_config

    model, _ = load_base(ModelConfig(model_name=str(tiny_model_dir), use_4bit=False, device="cpu"))
    with pytest.raises(ConfigError, match=r"lora.modules_to_save: \['lm_haed'\]"):
        peft_config(LoRAConfig(modules_to_save=["lm_haed"]), model)
    assert peft_config(LoRAConfig(modules_to_save=["lm_head"]), model).modules_to_save == ["lm_head"]


# ------------------------------------------------------------------------------------------------ static check

UNSAFE_READERS = {
    "pickle-like deserializers": r"\bimport (c?pickle|dill|joblib|shelve|marshal)\b|\bfrom (c?pickle|dill|joblib) ",
    "numpy pickles": r"allow_pickle\s*=\s*True",
    "yaml loaders that build objects": r"yaml\.(unsafe_load|full_load)\(|(Unsafe|Full)Loader\b|Loader=yaml\.Loader",
    "Jinja outside the sandbox": r"\bfrom jinja2 import [^\n]*\bEnvironment\b|\bjinja2\.Environment\(",
}


def test_src_reads_only_safetensors_json_and_yaml():
    """No pickle-like reader, no object-building YAML, no unsandboxed Jinja anywhere in the package (torch.load
    without weights_only=True and yaml.load without SafeLoader: test_security_static.py)."""
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        text = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        for what, pattern in UNSAFE_READERS.items():
            for m in re.finditer(pattern, text):
                bad.append(f"{path.relative_to(SRC)}:{text.count(chr(10), 0, m.start()) + 1}: {what}")
    assert not bad, bad


def test_a_data_folder_mixing_formats_is_refused_not_half_read(tmp_path: Path) -> None:
    # datasets read only the .jsonl here and dropped the .csv's records without a word.
    from loraforge.data import sources
    from loraforge.errors import DataError

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (folder / "b.csv").write_text("instruction,output\nc,d\n")
    with pytest.raises(DataError, match=r"mixes data formats \(1 \.csv file, 1 \.jsonl file\)"):
        list(sources.iter_source(str(folder)))
    (folder / "b.csv").unlink()
    (folder / "dataset_info.json").write_text("{}")  # metadata beside the data is not a second format
    assert [r.data["output"] for r in sources.iter_source(str(folder))] == ["b"]
