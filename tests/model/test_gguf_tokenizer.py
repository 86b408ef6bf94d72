"""A GGUF file's tokenizer built from its metadata alone is the tokenizer transformers' GGUF converter builds."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from loraforge.data.chitchat import load_chitchat
from loraforge.errors import ModelLoadError
from loraforge.model import embedded, gguf_tokenizer

GGUF = embedded.embedded_gguf_path("smollm2-135m-instruct")

# Ids from transformers 5.24's GGUF converter for the embedded file: chat markers, accents, emoji, digits,
# runs of spaces and tabs, and special tokens inside text.
KNOWN_IDS = {
    "<|im_start|>user\nHi there, how's it going?<|im_end|>\n": [1, 4093, 198, 26843, 665, 28, 638, 506, 357, 2045, 47,
                                                                   2, 198],
    "Café ✓ 2024 — naïve 🙂": [51, 1939, 2756, 4636, 246, 237, 216, 34, 32, 34, 36, 1841, 15486, 46494, 47526],
    "  two  spaces\tand\ttabs\n\n<file_sep>x<|endoftext|>": [216, 827, 216, 5600, 197, 397, 197, 100, 7366, 1116, 5,
                                                            104, 0],
}


def _gguf_bytes(kvs: list[tuple[str, int, bytes]], order: str = "<", version: int = 3) -> bytes:
    """A GGUF header holding `kvs` as (key, value type, packed value), and no tensors."""
    out = b"GGUF" + struct.pack(f"{order}IQQ", version, 0, len(kvs))
    for key, kind, packed in kvs:
        out += struct.pack(f"{order}Q", len(key.encode())) + key.encode() + struct.pack(f"{order}I", kind) + packed
    return out


def _string(text: str, order: str = "<") -> bytes:
    return struct.pack(f"{order}Q", len(text.encode())) + text.encode()


@pytest.mark.parametrize("order", ["<", ">"])
def test_metadata_of_either_byte_order(tmp_path: Path, order: str) -> None:
    path = tmp_path / "tiny.gguf"
    strings = [_string(t, order) for t in ("a", "b", "é")]
    path.write_bytes(_gguf_bytes([
        ("tokenizer.ggml.model", 8, _string("gpt2", order)),
        ("tokenizer.ggml.tokens", 9, struct.pack(f"{order}IQ", 8, 3) + b"".join(strings)),
        ("tokenizer.ggml.token_type", 9, struct.pack(f"{order}IQ3i", 5, 3, 3, 1, 1)),
        ("tokenizer.ggml.eos_token_id", 4, struct.pack(f"{order}I", 0)),
        ("tokenizer.ggml.add_bos_token", 7, struct.pack(f"{order}?", False)),
        ("llama.rope.freq_base", 6, struct.pack(f"{order}f", 0.5)),
    ], order))
    assert gguf_tokenizer.read_metadata(path) == {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "é"],
        "tokenizer.ggml.token_type": [3, 1, 1], "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.add_bos_token": False, "llama.rope.freq_base": 0.5}


def test_unreadable_files_are_our_error_naming_the_file(tmp_path: Path) -> None:
    whole = _gguf_bytes([("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + _string("a") + _string("b"))])
    cases = {"not.gguf": b"PK\x03\x04 a zip file", "truncated.gguf": whole[:-3], "old.gguf": _gguf_bytes([], version=1),
             "huge-array.gguf": _gguf_bytes([("x", 9, struct.pack("<IQ", 8, 2**60))]),
             "bad-type.gguf": _gguf_bytes([("x", 99, b"")])}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelLoadError, match=name):
            gguf_tokenizer.read_metadata(tmp_path / name)


def test_embedded_metadata_describes_a_byte_level_vocabulary() -> None:
    metadata = gguf_tokenizer.read_metadata(GGUF)
    assert gguf_tokenizer.supported(metadata)
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152 and len(metadata["tokenizer.ggml.merges"]) == 48900
    assert "<|im_start|>" in metadata["tokenizer.chat_template"]
    assert not gguf_tokenizer.supported({**metadata, "tokenizer.ggml.pre": "llama3"})  # another text split
    assert not gguf_tokenizer.supported({**metadata, "tokenizer.ggml.model": "llama"})  # sentencepiece


def test_built_tokenizer_gives_the_converter_ids() -> None:
    tokenizer = gguf_tokenizer.byte_level_bpe(gguf_tokenizer.read_metadata(GGUF))
    for text, ids in KNOWN_IDS.items():
        assert tokenizer.encode(text).ids == ids, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.token_to_id("<|im_end|>") == 2 and tokenizer.get_vocab_size() == 49152


def test_materialized_tokenizer_folder(tmp_path: Path) -> None:
    folder = embedded.materialize_gguf_tokenizer(GGUF, str(tmp_path))
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|endoftext|>")
    assert tok.chat_template == gguf_tokenizer.read_metadata(GGUF)["tokenizer.chat_template"]
    for text, ids in KNOWN_IDS.items():
        assert tok(text)["input_ids"] == ids


def test_a_file_asking_for_bos_gets_it() -> None:
    # The embedded file says add_bos_token = false; with it true, transformers' converter gives [1, 28120, 905].
    metadata = {**gguf_tokenizer.read_metadata(GGUF), "tokenizer.ggml.add_bos_token": True}
    assert embedded._tokenizer_from_metadata(metadata)("hello world")["input_ids"] == [1, 28120, 905]


# Long because transformers' converter takes 5-10 s to read the whole 100 MB file (what this module avoids).
@pytest.mark.long
def test_same_tokenizer_as_transformers_gguf_converter(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    ours = PreTrainedTokenizerFast.from_pretrained(embedded.materialize_gguf_tokenizer(GGUF, str(tmp_path)))
    theirs = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
    assert ours.chat_template == theirs.chat_template
    assert ours.added_tokens_decoder == theirs.added_tokens_decoder
    conversations = [messages for _, messages in load_chitchat()[:150]]
    texts = [m["content"] for messages in conversations for m in messages][:400]
    texts += [theirs.apply_chat_template(messages, tokenize=False) for messages in conversations]
    texts += list(KNOWN_IDS) + ["<|im_start|><|im_end|><repo_name><jupyter_code>", " \u00a0\u2028\r\n", "x" * 300]
    assert len(texts) >= 500
    for text in texts:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
