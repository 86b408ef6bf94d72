"""Generated answers and their BLEU / ROUGE / exact-match scores against references.

Prompts are formatted the way the model was trained: with the training template when one is given,
else with the tokenizer's chat template, else as raw text. Generation defaults follow the spec:
256 new tokens, beam search with 4 beams (`EvalConfig.num_beams`); temperature 0.7 and top-p 0.9 apply
when sampling. The generating itself is `loraforge.infer.generation`'s, shared with `loraforge generate`,
the chat and the server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from loraforge.config import EvalConfig
from loraforge.eval import metrics
from loraforge.infer import generation
from loraforge.infer.generation import BEAM_WIDTH, Decoding
from loraforge.progress import track

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
        return generation.encode(self.tokenizer, self.format_prompt(prompt))

    # ---------------------------------------------------------------------------------------------------
    # Generation (loraforge.infer.generation)

    def generate_response(self, prompt: Prompt, max_length: int = 256, temperature: float = 0.7,
                          num_beams: int = BEAM_WIDTH, top_p: float = 0.9, do_sample: bool = False,
                          **generate_kwargs: Any) -> str:
        """One answer to `prompt`; `max_length` counts new tokens. Greedy: `num_beams=1, do_sample=False`."""
        return self.generate_batch([prompt], max_length=max_length, temperature=temperature,
                                   num_beams=num_beams, top_p=top_p, do_sample=do_sample,
                                   batch_size=1, **generate_kwargs)[0]

    def generate_batch(self, prompts: Sequence[Prompt], max_length: int = 256, temperature: float = 0.7,
                       num_beams: int = BEAM_WIDTH, top_p: float = 0.9, do_sample: bool = False,
                       batch_size: int = 8, **generate_kwargs: Any) -> list[str]:
        """Answers to `prompts`, generated `batch_size` at a time with left padding.

        Returns only the new text, special tokens skipped, stripped. Extra keyword arguments go to
        `model.generate` (e.g. `repetition_penalty`).
        """
        decoding = Decoding(max_new_tokens=max_length, num_beams=num_beams, do_sample=do_sample,
                            temperature=temperature, top_p=top_p)
        return self.answers(prompts, decoding, batch_size=batch_size, **generate_kwargs)

    def answers(self, prompts: Sequence[Prompt], decoding: Decoding, *, batch_size: int = 8,
                **generate_kwargs: Any) -> list[str]:
        """`generate_batch` with the settings as one `Decoding` (e.g. `Decoding.from_eval(run.eval)`)."""
        if isinstance(prompts, str):
            raise TypeError("generate_batch takes a list of prompts; use generate_response for one prompt.")
        encoded = [self.encode_prompt(p) for p in prompts]
        # Batch by batch (the batches generate_batch itself makes), so that a bar can show the progress.
        chunks = [encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]
        return [answer for chunk in track(chunks, f"generating {len(encoded)} answers")
                for answer in generation.generate_batch(self.model, self.tokenizer, chunk, decoding,
                                                        batch_size=batch_size, **generate_kwargs)]

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
                 **settings: Any) -> dict[str, Any]:
        """Generate answers to `prompts` and score them: BLEU, ROUGE-1/2/L, exact match and `generations`."""
        if len(prompts) != len(references):
            raise ValueError(f"Got {len(prompts)} prompt(s) but {len(references)} reference(s); "
                             "each prompt needs exactly one reference.")
        hypotheses = self.generate_batch(prompts, **settings)
        return {**metrics.text_metrics(references, hypotheses), "generations": hypotheses}


def generation_metrics(model: torch.nn.Module, tokenizer: Any, formatter: Callable[[str], str] | None,
                       prompts: Sequence[Prompt], references: Sequence[str], ecfg: EvalConfig) -> dict[str, Any]:
    """Generate answers to `prompts` with the run's eval settings (`Decoding.from_eval`) and score them
    against `references`: BLEU, ROUGE-1/2/L and exact match, their 95% bootstrap `intervals` over the
    answers and `n_replies`, with the answers under `generations`."""
    answers = QualitativeEvaluator(model, tokenizer, template=formatter).answers(
        prompts, Decoding.from_eval(ecfg), batch_size=ecfg.eval_batch_size)
    return {**metrics.text_metrics(references, answers), "n_replies": len(answers),
            "intervals": metrics.bootstrap_intervals(references, answers), "generations": answers}
