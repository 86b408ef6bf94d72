"""A GGUF file's tokenizer, read from the metadata at the start of the file alone.

transformers' GGUF loader reads a whole file's metadata and tensor index before converting its vocabulary
(5-6 s of CPU for the embedded 100 MB SmolLM2 file, `gguf` import included). The tokenizer needs only the
key-value section at the head of the file (2 MB there), and a byte-level BPE vocabulary (llama.cpp's "gpt2"
tokenizer model) maps directly onto a `tokenizers` BPE model. `byte_level_bpe` builds the same tokenizer as
transformers' converter (`tests/model/test_gguf_tokenizer.py` compares them token for token); other
vocabularies (sentencepiece, unigram) are left to transformers (`supported` says which).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from loraforge.errors import ModelLoadError

# GGUF metadata value types (llama.cpp's gguf.h): fixed-size scalars by struct code; 8 is a string (u64
# length + UTF-8 bytes), 9 an array (u32 element type + u64 count + elements).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_VERSIONS = (2, 3)  # version 1 used 32-bit counts; no file in use still has it

# llama.cpp's token types (tokenizer.ggml.token_type)
CONTROL, USER_DEFINED = 3, 4

# tokenizer.ggml.pre values whose text splitting is GPT-2's own ByteLevel regex, which is what transformers
# gives every byte-level vocabulary that its converter has no split of its own for. Others (llama3, qwen2,
# ...) split text differently and go through transformers' converter.
GPT2_SPLIT_PRE_TOKENIZERS = frozenset({"gpt-2", "smollm"})


class _Header:
    """A cursor over the file's bytes, in the file's byte order."""

    def __init__(self, buf: mmap.mmap, order: str) -> None:
        self.buf, self.order, self.pos = buf, order, 0

    def scalars(self, code: str, count: int = 1) -> tuple[Any, ...]:
        size = struct.calcsize(code) * count
        if self.pos + size > len(self.buf):
            raise ValueError(f"the metadata runs past the end of the file (at byte {self.pos})")
        values = struct.unpack_from(f"{self.order}{count}{code}", self.buf, self.pos)
        self.pos += size
        return values

    def string(self) -> str:
        (length,) = self.scalars("Q")
        end = self.pos + length
        if end > len(self.buf):
            raise ValueError(f"a string of {length} bytes runs past the end of the file (at byte {self.pos})")
        text = self.buf[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end
        return text

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalars(_SCALARS[kind])[0]
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            (item_kind,), (count,) = self.scalars("I"), self.scalars("Q")
            if item_kind in _SCALARS:
                return list(self.scalars(_SCALARS[item_kind], count))
            if count > len(self.buf) - self.pos:  # every element takes at least one byte
                raise ValueError(f"an array of {count} elements cannot fit in the file (at byte {self.pos})")
            return [self.value(item_kind) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {kind} (at byte {self.pos})")


def read_metadata(gguf: str | Path) -> dict[str, Any]:
    """Every key-value pair of a GGUF file's metadata; the tensor index that follows it is not read."""
    path = Path(gguf)
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise ValueError("it does not start with the GGUF magic bytes")
            # The version is small, so its byte order tells the file's (big-endian files exist, for s390x).
            order = "<" if struct.unpack_from("<I", buf, 4)[0] in _VERSIONS else ">"
            header = _Header(buf, order)
            header.pos = 4
            (version,) = header.scalars("I")
            if version not in _VERSIONS:
                raise ValueError(f"GGUF version {version} (supported: {', '.join(map(str, _VERSIONS))})")
            _, kv_count = header.scalars("Q", 2)  # the tensor count, then the number of key-value pairs
            metadata = {}
            for _ in range(kv_count):
                key = header.string()
                (kind,) = header.scalars("I")
                metadata[key] = header.value(kind)
            return metadata
    except (OSError, ValueError, struct.error) as e:
        raise ModelLoadError(f"cannot read the metadata of the GGUF file {str(path)!r}: {e}") from e


def special_tokens(metadata: dict[str, Any]) -> dict[str, str]:
    """The special tokens the metadata declares (`tokenizer.ggml.{bos,eos,unknown,padding}_token_id`)."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    out = {}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            out[name] = tokens[token_id]
    return out


def supported(metadata: dict[str, Any]) -> bool:
    """Whether `byte_level_bpe` builds this file's tokenizer: a byte-level BPE vocabulary with its merges,
    split as GPT-2 splits text."""
    return (metadata.get("tokenizer.ggml.model") == "gpt2" and "tokenizer.ggml.merges" in metadata
            and metadata.get("tokenizer.ggml.pre", "gpt-2") in GPT2_SPLIT_PRE_TOKENIZERS)


def byte_level_bpe(metadata: dict[str, Any]) -> Tokenizer:
    """The byte-level BPE tokenizer a GGUF file describes, built as transformers' GGUF converter builds it.

    Tokens marked control become special added tokens and user-defined ones plain added tokens, so that
    text holding them (the chat markers) keeps them whole. The vocabulary is spelled in GPT-2's byte
    alphabet (Ġ for a space); the rare token that is not is respelled through it, byte by byte.
    """
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or []
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())

    def spelled(token: str) -> str:
        return token if set(token) <= alphabet else "".join(p for p, _ in byte_level.pre_tokenize_str(token))

    # A token spelled twice keeps its last id, as in transformers' converter.
    vocab = {spelled(token): i for i, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                              byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # Adds nothing around a text; transformers' tokenizer class puts BOS/EOS here when the file asks it to.
    tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    # A control token outside the byte alphabet is a mislabel (llama.cpp's), and is not a token of this
    # vocabulary as the model sees it: left out, like transformers does.
    control = [t for t, kind in zip(tokens, types, strict=False) if kind == CONTROL and set(t) <= alphabet]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, kind in zip(tokens, types, strict=False) if kind == USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tokenizer
