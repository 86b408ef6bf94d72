"""The tokenizer half of a GGUF file, written so that llama.cpp tokenizes the way transformers does.

llama.cpp does not run the Hugging Face tokenizer: it rebuilds one from the GGUF metadata, and three
fields decide whether it matches ours.
- Token types. A CONTROL (or USER_DEFINED) token is matched whole in the text before BPE runs; one
  typed NORMAL is not, so `<|im_start|>` would be split into `<`, `|`, `im`, ... and a chat prompt
  would no longer be the one the model was trained on.
- `tokenizer.ggml.pre`: llama.cpp picks its pre-tokenizer (the regex that cuts text before BPE) by
  name. Like llama.cpp's own converter we recognise it by what the tokenizer makes of a check text
  (the hash of the ids), which does not depend on how tokenizer.json spells its pre-tokenizer.
- The special-token ids and whether BOS/EOS are added.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.errors import ModelLoadError

log = logging.getLogger(__name__)

# llama.cpp's token types (gguf.TokenType), as plain ints so this module imports without gguf.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The text llama.cpp's convert_hf_to_gguf_update.py tokenizes to fingerprint a BPE pre-tokenizer: runs of
# whitespace, emoji joiners, digit groups, Khmer, CJK, Cyrillic and English contractions, where regexes differ.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
# sha256 of str(ids of CHECK_TEXT, special tokens added) -> llama.cpp's pre-tokenizer name, for the
# byte-level BPE tokenizers of Llama-architecture models. Values as llama.cpp's converter records them.
KNOWN_PRE = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, 3.1, 3.2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


@dataclass
class GGUFTokenizer:
    """Everything a GGUF file says about its tokenizer (`tokenizer.ggml.*` and `tokenizer.chat_template`)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # llama.cpp's pre-tokenizer name
    tokens: list[str | bytes]
    types: list[int]
    scores: list[float] | None = None  # SentencePiece only
    merges: list[str] = field(default_factory=list)  # byte-level BPE only, "a b" per merge
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def write(self, w: Any) -> None:
        """Add the fields to a `gguf.GGUFWriter`."""
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.merges:
            w.add_token_merges(self.merges)
        for name, token_id in self.special_ids.items():
            getattr(w, f"add_{name}_token_id")(token_id)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def looks_special(text: str) -> bool:
    """Marker-shaped added tokens that some tokenizers forget to flag special (`<|...|>`, as llama.cpp treats them)."""
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))


def pre_tokenizer_name(tokenizer_json: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer; "default" (with a warning) if unknown."""
    from tokenizers import Tokenizer  # the Rust tokenizer transformers' fast tokenizers wrap: the same ids

    ids = Tokenizer.from_file(str(tokenizer_json)).encode(CHECK_TEXT, add_special_tokens=True).ids
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest in KNOWN_PRE:
        return KNOWN_PRE[digest]
    log.warning("%s: pre-tokenizer not recognised (check hash %s); writing 'default', so llama.cpp may cut some "
                "text (digits, whitespace runs) differently. llama.cpp's convert_hf_to_gguf.py knows more.",
                tokenizer_json, digest)
    return "default"


def _byte_level_tokens(tj: dict[str, Any], n_vocab: int) -> tuple[list[str | bytes], list[int]]:
    """Token texts and types, by id, as llama.cpp's converter types them: added tokens flagged special (or
    shaped like markers) CONTROL, other added tokens USER_DEFINED, the BPE vocabulary NORMAL, and embedding
    rows beyond the tokenizer (padding) UNUSED."""
    by_id: dict[int, str] = {i: t for t, i in tj["model"]["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens") or []}
    by_id.update({i: a["content"] for i, a in added.items()})
    if by_id and max(by_id) >= n_vocab:
        raise ModelLoadError(f"the tokenizer has token id {max(by_id)} but the model only {n_vocab} embedding rows.")
    tokens: list[str | bytes] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            text = by_id[i]
            tokens.append(text)
            types.append(CONTROL if added[i].get("special") or looks_special(text) else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    return tokens, types


def _merges(tj: dict[str, Any]) -> list[str]:
    # tokenizers >= 0.20 saves each merge as a pair, older versions as one "a b" string.
    return [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges") or []]


def _adds_prefix_space(tj: dict[str, Any]) -> bool:
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps)


def _sentencepiece_tokens(model_dir: Path, n_vocab: int) -> tuple[list[str | bytes], list[float], list[int]]:
    """SentencePiece vocabularies (Llama 2, Mistral): gguf's reader already types them (UNKNOWN, CONTROL, BYTE)."""
    from gguf.vocab import LlamaHfVocab, SentencePieceVocab

    for cls in (LlamaHfVocab, SentencePieceVocab):
        try:
            vocab = cls(model_dir)
            break
        except (FileNotFoundError, TypeError, RuntimeError):
            continue
    else:
        raise ModelLoadError(f"{model_dir}: no tokenizer the GGUF writer understands (tokenizer.json with a "
                             "byte-level BPE or SentencePiece-style model, or tokenizer.model).")
    tokens: list[str | bytes] = []
    scores: list[float] = []
    types: list[int] = []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(ttype))
    for i in range(len(tokens), n_vocab):  # embedding rows beyond the tokenizer (padding)
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    return tokens, scores, types


def gguf_tokenizer(model_dir: str | Path, n_vocab: int, tokenizer: Any | None = None) -> GGUFTokenizer:
    """The GGUF tokenizer fields for the Hugging Face folder `model_dir` whose model has `n_vocab` rows.

    `tokenizer`: the folder's transformers tokenizer if the caller has it loaded (else it is loaded here);
    it gives the special tokens, whether BOS/EOS are added, and the chat template.
    """
    model_dir = Path(model_dir)
    if tokenizer is None:
        from transformers import AutoTokenizer  # seconds to import; callers that have a tokenizer pass it

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tj_file = model_dir / "tokenizer.json"
    tj = json.loads(tj_file.read_text(encoding="utf-8")) if tj_file.is_file() else None
    byte_level = (tj is not None and tj["model"].get("type") == "BPE" and not tj["model"].get("byte_fallback")
                  and (tj.get("decoder") or {}).get("type") == "ByteLevel")
    if byte_level:
        tokens, types = _byte_level_tokens(tj, n_vocab)
        out = GGUFTokenizer("gpt2", pre_tokenizer_name(tj_file), tokens, types, merges=_merges(tj),
                            add_space_prefix=_adds_prefix_space(tj))
    else:
        tokens, scores, types = _sentencepiece_tokens(model_dir, n_vocab)
        out = GGUFTokenizer("llama", "default", tokens, types, scores=scores)
    for name, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unk_token_id"),
                       ("pad", "pad_token_id")):
        token_id = getattr(tokenizer, attr, None)
        if isinstance(token_id, int) and 0 <= token_id < n_vocab:
            out.special_ids[name] = token_id
    # What the tokenizer does to plain text is what llama.cpp must do: look rather than read a flag.
    probe = tokenizer("a")["input_ids"]
    out.add_bos = "bos" in out.special_ids and probe[:1] == [out.special_ids["bos"]]
    out.add_eos = "eos" in out.special_ids and probe[-1:] == [out.special_ids["eos"]]
    template = getattr(tokenizer, "chat_template", None)
    out.chat_template = template if isinstance(template, str) else None
    return out
