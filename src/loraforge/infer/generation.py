"""Text generation in one place: decoding settings, stop and pad tokens, prompt encoding, batched answers.

The evaluation (`eval/qualitative.py`), `loraforge generate`, `loraforge chat` and the server's engine all
take their settings from here, so a decoding name, a temperature or an EOS means the same thing in each:

- `Decoding` holds how tokens are picked; `Decoding.named` maps greedy / beam / sample to it (beam search is
  always `EvalConfig.num_beams` wide: the run's setting, else its default), `Decoding.from_eval` reads an
  `EvalConfig`, `Decoding.from_temperature` reads a chat or API request (temperature 0 = greedy), and
  `generate_kwargs(model, tokenizer, decoding)` is the one translation into `generate`'s keyword arguments,
  stop and pad tokens included.
- `stop_ids` / `pad_id`: an answer ends at the model's EOS ids (generation_config) or the tokenizer's EOS.
- `generate_batch`: left-padded batches through `generate`, or through `FastDecoder` (stock's kernels
  replayed as CUDA graphs, docs/serving.md) where it gives the same tokens: greedy and sampling, no beams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loraforge.config import EvalConfig
from loraforge.errors import DataError
from loraforge.infer.fast_decode import FastDecoder, left_padded, supported
from loraforge.model.runtime import eval_mode, model_device

DECODINGS = ("greedy", "beam", "sample")
BEAM_WIDTH: int = EvalConfig.num_beams  # the dataclass default: the beam width wherever no EvalConfig is given


@dataclass(frozen=True)
class Decoding:
    """How the next token is picked. Temperature and top-p apply only when sampling."""

    max_new_tokens: int = 256
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0  # 1 = none; only `generate` applies it

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_length (new tokens) must be at least 1; got {self.max_new_tokens}.")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1; got {self.num_beams}.")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"Sampling needs temperature > 0; got {self.temperature}. "
                             "Use do_sample=False for greedy or beam search.")

    @classmethod
    def named(cls, name: str, *, max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
              num_beams: int = BEAM_WIDTH, repetition_penalty: float = 1.0) -> Decoding:
        """`greedy`, `beam` (`num_beams` wide: pass `EvalConfig.num_beams`) or `sample`."""
        if name not in DECODINGS:
            raise DataError(f"--decoding must be greedy, beam or sample; got {name!r}.")
        return cls(max_new_tokens=max_new_tokens, num_beams=num_beams if name == "beam" else 1,
                   do_sample=name == "sample", temperature=temperature, top_p=top_p,
                   repetition_penalty=repetition_penalty)

    @classmethod
    def from_eval(cls, ecfg: EvalConfig) -> Decoding:
        """The evaluation's decoding: `eval.decoding`, its beam width, temperature, top-p and penalty."""
        return cls.named(ecfg.decoding, max_new_tokens=ecfg.max_new_tokens, temperature=ecfg.temperature,
                         top_p=ecfg.top_p, num_beams=ecfg.num_beams, repetition_penalty=ecfg.repetition_penalty)

    @classmethod
    def from_temperature(cls, temperature: float, top_p: float, max_new_tokens: int) -> Decoding:
        """A chat or API request's decoding, as OpenAI defines it: temperature 0 is greedy, above it sampling."""
        return cls.named("sample" if temperature > 0 else "greedy", max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p)

    @property
    def fast_ok(self) -> bool:
        """Whether `FastDecoder` decodes this: one beam, and no penalty (its graphed step has no logits processors)."""
        return self.num_beams == 1 and self.repetition_penalty == 1.0

    def as_kwargs(self) -> dict[str, Any]:
        """These settings as keyword arguments of transformers' `generate` (see `generate_kwargs`).

        Sampling is temperature and top-p only (`top_k=0` switches off the top-50 a model's
        generation_config usually brings), which is what `FastDecoder` samples; greedy and beam search
        clear the sampling settings, so the model's defaults for them raise no warnings.
        """
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                                  "do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


def generate_kwargs(model: Any, tokenizer: Any, decoding: Decoding) -> dict[str, Any]:
    """Everything `model.generate` needs besides the prompt: the decoding settings, stop and pad tokens."""
    stops = stop_ids(model, tokenizer)
    return {"pad_token_id": pad_id(tokenizer, stops), **({"eos_token_id": sorted(stops)} if stops else {}),
            **decoding.as_kwargs()}


def stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end an answer: the model's EOS ids (generation_config; one id or a list) and the
    tokenizer's EOS, which a fine-tuned model learnt to end its answers with."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos) if isinstance(eos, list) else {eos}
    ids.add(tokenizer.eos_token_id)
    return {int(i) for i in ids if i is not None}


def pad_id(tokenizer: Any, stops: set[int]) -> int:
    """The padding token: the tokenizer's, else its EOS, else a stop token. The model never sees it (padding
    is masked out); `generate` fills rows that ended with it, and decoding skips it as a special token."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    if not stops:
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
    return min(stops)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a formatted prompt, with the tokenizer's special tokens unless the text starts with BOS.

    Chat templates of Llama 2/3 and Mistral write the BOS token themselves; letting the tokenizer add
    another would give the model a double BOS it never saw in training. An empty prompt is the start of a
    document, as in OpenAI's completions: the BOS token, else the EOS (GPT-2 style vocabularies separate
    documents with it) — a model cannot continue zero tokens.
    """
    bos = getattr(tokenizer, "bos_token", None)
    ids = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
    if not ids:
        start = next((i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None), None)
        if start is None:
            raise DataError("The prompt is empty and the tokenizer has neither a BOS nor an EOS token to "
                            "start from; give a prompt.")
        ids = [int(start)]
    return ids


def generate_batch(model: Any, tokenizer: Any, prompts: Sequence[list[int]], decoding: Decoding, *,
                   batch_size: int = 8, fast: bool | None = False, **extra: Any) -> list[str]:
    """Answers to token-id `prompts`, in order, generated `batch_size` at a time with left padding.

    Returns only the new text, special tokens skipped, stripped; each row ends at its first stop token.
    `fast`: decode with `FastDecoder` (None: on a GPU, when it covers the model and `decoding`); beam
    search, a repetition penalty or `extra` keyword arguments for `generate` always go through `generate`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    stops = stop_ids(model, tokenizer)
    kwargs = {**generate_kwargs(model, tokenizer, decoding), **extra}
    pad = kwargs["pad_token_id"]
    if not decoding.fast_ok or extra:
        fast = False
    elif fast is None:
        fast = model_device(model).type == "cuda" and supported(model)[0]
    # Each batch brings new lengths: no per-shape attention plans (see FastDecoder's `attention`); a lone
    # unpadded prompt still runs stock's kernels.
    decoder = FastDecoder(model, max_rows=batch_size, attention="no-plans") if fast else None
    texts: list[str] = []
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[start:start + batch_size]]
            rows = (_fast_rows(decoder, chunk, decoding, stops, pad) if decoder is not None
                    else _generate_rows(model, chunk, kwargs))
            texts += [t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]
    return texts


def _generate_rows(model: Any, prompts: list[list[int]], kwargs: dict[str, Any]) -> list[list[int]]:
    """One batch through transformers' `generate`: the new tokens of each row."""
    ids, mask = left_padded(prompts, kwargs["pad_token_id"])
    device = model_device(model)
    output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    # Left padding puts every prompt's end at the same column, so the new tokens start there.
    return output[:, ids.shape[1]:].tolist()


def _fast_rows(decoder: FastDecoder, prompts: list[list[int]], decoding: Decoding, stops: set[int],
               pad: int) -> list[list[int]]:
    """One batch through `FastDecoder`: the tokens `_generate_rows` gives, each row ending at the stop
    token `generate` would stop at."""
    ids, mask = left_padded(prompts, pad)
    rows: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    temperature = decoding.temperature if decoding.do_sample else 0.0  # 0: greedy
    steps = decoder.stream(ids, mask, decoding.max_new_tokens, temperature=temperature, top_p=decoding.top_p)
    for tokens in steps:
        for i, t in enumerate(tokens):
            if not ended[i]:
                ended[i] = t in stops
                rows[i].append(t)
        if all(ended):
            break
    steps.close()
    return rows
