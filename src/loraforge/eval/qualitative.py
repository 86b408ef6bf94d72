"""Generated answers and their BLEU / ROUGE / exact-match scores against references.

Prompts are formatted the way the model was trained: with the training template when one is given,
else with the tokenizer's chat template, else as raw text. Generation defaults follow the spec:
256 new tokens, beam search with 4 beams; temperature 0.7 and top-p 0.9 apply when sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from loraforge.eval import metrics
from loraforge.eval.runtime import eval_mode, model_device

Message = dict[str, str]
Prompt = str | list[Message]


class QualitativeEvaluator:
    """Generates answers from `model` and scores them; `template(prompt) -> str` formats plain prompts."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any,
                 template: Callable[[str], str] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template

    # ---------------------------------------------------------------------------------------------------
    # Prompt formatting

    def format_prompt(self, prompt: Prompt) -> str:
        """The text the model sees: template, else chat template, else the raw prompt (messages: chat template)."""
        if isinstance(prompt, str):
            if self.template is not None:
                return self.template(prompt)
            if not getattr(self.tokenizer, "chat_template", None):
                return prompt
            messages = [{"role": "user", "content": prompt}]
        else:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("A list of messages needs a tokenizer with a chat template; "
                                 "this tokenizer has none. Pass a plain string prompt instead.")
            messages = list(prompt)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of the formatted prompt, with the tokenizer's special tokens unless BOS is already there."""
        text = self.format_prompt(prompt)
        # Chat templates of Llama 2/3 and Mistral write the BOS token themselves; letting the tokenizer
        # add another would give the model a double BOS it never saw in training.
        bos = getattr(self.tokenizer, "bos_token", None)
        add_special = not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    # ---------------------------------------------------------------------------------------------------
    # Generation

    def generate_response(self, prompt: Prompt, max_length: int = 256, temperature: float = 0.7,
                          num_beams: int = 4, top_p: float = 0.9, do_sample: bool = False,
                          **generate_kwargs: Any) -> str:
        """One answer to `prompt`; `max_length` counts new tokens. Greedy: `num_beams=1, do_sample=False`."""
        return self.generate_batch([prompt], max_length=max_length, temperature=temperature,
                                   num_beams=num_beams, top_p=top_p, do_sample=do_sample,
                                   batch_size=1, **generate_kwargs)[0]

    def generate_batch(self, prompts: Sequence[Prompt], max_length: int = 256, temperature: float = 0.7,
                       num_beams: int = 4, top_p: float = 0.9, do_sample: bool = False,
                       batch_size: int = 8, **generate_kwargs: Any) -> list[str]:
        """Answers to `prompts`, generated `batch_size` at a time with left padding.

        Returns only the new text, special tokens skipped, stripped. Extra keyword arguments go to
        `model.generate` (e.g. `repetition_penalty`).
        """
        if isinstance(prompts, str):
            raise TypeError("generate_batch takes a list of prompts; use generate_response for one prompt.")
        if max_length < 1:
            raise ValueError(f"max_length (new tokens) must be at least 1; got {max_length}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
        kwargs: dict[str, Any] = {"max_new_tokens": max_length, "num_beams": num_beams, "do_sample": do_sample}
        if do_sample:
            if temperature <= 0:
                raise ValueError(f"Sampling needs temperature > 0; got {temperature}. "
                                 "Use do_sample=False for greedy or beam search.")
            kwargs.update(temperature=temperature, top_p=top_p)
        kwargs.update(generate_kwargs)

        encoded = [self.encode_prompt(p) for p in prompts]
        answers: list[str] = []
        with _generation_padding(self.tokenizer), eval_mode(self.model), torch.no_grad():
            kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
            if getattr(getattr(self.model, "generation_config", None), "eos_token_id", None) is None:
                kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
            device = model_device(self.model)
            for start in range(0, len(encoded), batch_size):
                chunk = [{"input_ids": ids} for ids in encoded[start:start + batch_size]]
                batch = self.tokenizer.pad(chunk, padding=True, return_tensors="pt")
                batch = {k: v.to(device) for k, v in batch.items()}
                output = self.model.generate(**batch, **kwargs)
                # Left padding puts every prompt's end at the same column, so the new tokens start there.
                new_tokens = output[:, batch["input_ids"].shape[1]:]
                answers.extend(t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return answers

    # ---------------------------------------------------------------------------------------------------
    # Scores (0–1); see loraforge.eval.metrics

    def compute_bleu(self, references: Sequence[str], hypotheses: Sequence[str]) -> float:
        """Corpus BLEU in [0, 1] (sacreBLEU / 100)."""
        return metrics.bleu(references, hypotheses)

    def compute_rouge(self, references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
        """Mean ROUGE-1/2/L F-measure in [0, 1]."""
        return metrics.rouge(references, hypotheses)

    def compute_exact_match(self, references: Sequence[str], hypotheses: Sequence[str]) -> float:
        """Fraction of answers equal to their reference after lowercasing and removing punctuation."""
        return metrics.exact_match(references, hypotheses)

    def evaluate(self, prompts: Sequence[Prompt], references: Sequence[str],
                 **generation: Any) -> dict[str, Any]:
        """Generate answers to `prompts` and score them: BLEU, ROUGE-1/2/L, exact match and `generations`."""
        if len(prompts) != len(references):
            raise ValueError(f"Got {len(prompts)} prompt(s) but {len(references)} reference(s); "
                             "each prompt needs exactly one reference.")
        hypotheses = self.generate_batch(prompts, **generation)
        return {**metrics.text_metrics(references, hypotheses), "generations": hypotheses}


@contextmanager
def _generation_padding(tokenizer: Any) -> Iterator[None]:
    """Left padding, and EOS as pad when the tokenizer has none; the tokenizer is restored on exit.

    Decoder-only models continue from the last column, so prompts must end there: right padding would
    have the model generate after pad tokens.
    """
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None
