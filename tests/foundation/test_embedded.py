"""The embedded model and data: real SmolLM2 weights from the GGUF package, real chitchat conversations."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraforge.config import DataConfig
from loraforge.data import chitchat
from loraforge.data.pipeline import build_datasets


def test_materialized_folder_is_a_standard_hf_model(embedded_model_dir: Path):
    names = {p.name for p in embedded_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    config = json.loads((embedded_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config  # a plain model: quantizable, mergeable, servable


def test_embedded_model_answers_sensibly(embedded_model_dir: Path):
    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.pad_token_id != tok.eos_token_id  # a distinct pad keeps EOS in the labels
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as SmolLM2
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_chitchat_roles_alternate_and_same_sender_turns_merge():
    conv = {"messages": [
        [{"text": "hi", "sender": "a"}, {"text": "there", "sender": "a"}],
        [{"text": "hello", "sender": "b"}],
        [{"text": "more from b", "sender": "b"}],
        [{"text": "bye", "sender": "a"}],
    ]}
    msgs = chitchat.conversation_to_messages(conv)
    assert msgs == [{"role": "user", "content": "hi\nthere"},
                    {"role": "assistant", "content": "hello\nmore from b"},
                    {"role": "user", "content": "bye"}]


def test_chitchat_loader_reads_all_conversations():
    convs = chitchat.load_chitchat()
    # 7,168 in the package; 3,150 have one speaker only (nobody answered) and hold nothing to train on
    assert 4000 <= len(convs) <= 4018
    for _, msgs in convs[:200]:
        roles = [m["role"] for m in msgs]
        assert roles[0] == "user" and all(a != b for a, b in zip(roles, roles[1:], strict=False))


def test_chitchat_split_is_fixed_and_seeded(embedded_model_dir: Path):
    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    cfg = DataConfig(max_samples=40, max_eval_samples=10, validation_split=0.01, max_length=96)
    a, b = build_datasets(cfg, tok, 2), build_datasets(cfg, tok, 2)
    assert a.validation == b.validation and a.train == b.train
    other = build_datasets(DataConfig(**{**cfg.__dict__, "seed": 7}), tok, 2)
    assert other.validation != a.validation
    # no conversation is in both splits
    assert not {tuple(x["input_ids"]) for x in a.train} & {tuple(x["input_ids"]) for x in a.validation}


def test_a_read_only_or_missing_home_cache_falls_back_to_the_temp_folder(tmp_path: Path, monkeypatch):
    import tempfile

    from loraforge.model import embedded

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # mkdir under a file fails, for root too (a chmod-ed folder would not stop root)
    monkeypatch.delenv("LORAFORGE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))
    root = embedded.cache_root()
    assert root.parent == Path(tempfile.gettempdir()) and root.name.startswith("loraforge-cache-")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    assert embedded.cache_root() == tmp_path / "home-cache" / "loraforge"
    assert embedded.cache_root("/explicit") == Path("/explicit")


def test_the_tokenizer_alone_comes_without_dequantizing_the_model(tmp_path: Path, embedded_model_dir: Path):
    from loraforge.model import embedded

    gguf = embedded.embedded_gguf_path("smollm2-135m-instruct")
    folder = embedded.materialize_gguf_tokenizer(gguf, str(tmp_path))
    assert not (tmp_path / "models").exists() and embedded.materialized(gguf, str(tmp_path)) is None
    alone, full = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(embedded_model_dir)
    text = "<|im_start|>user\nHi there, how's it going?<|im_end|>\n"
    assert alone(text)["input_ids"] == full(text)["input_ids"]
    assert (alone.bos_token, alone.eos_token, alone.pad_token) == (full.bos_token, full.eos_token, full.pad_token)
    assert alone.chat_template == full.chat_template
