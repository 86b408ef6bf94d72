"""Does the merged model answer like base + adapter? Greedy tokens and logits on a few prompts.

`merge` records base + adapter's answers before it merges (merging rewrites the weights in place), then
loads the written folder the way a user would and compares. In float32 the two agree to rounding; in
16 bits the merged weight W + B·A is rounded once where base + adapter rounds W and B·A·x separately,
so logits move by up to a few tenths and a greedy token can flip where the top two were that close.
A flip is accepted only where the logit difference the check measured could have caused it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from loraforge.progress import track

PROMPTS = ("Say hello in one short sentence.", "What is 2 + 3?", "Name three colours.")
NEW_TOKENS = 16
# Largest |logit difference| accepted, by the dtype both models run in. float32: merging is exact but for
# summation order. 16 bits: the logits themselves are rounded (bfloat16 steps are 0.125 between 16 and 32);
# on SmolLM2-135M with a strong random LoRA (r=16, all linear layers) bfloat16 differed by up to 0.98, where
# leaving the adapter out moved the logits by 2.4 and a wrong RoPE base by 6.8. float16 has 3 more bits.
TOLERANCE = {"float32": 1e-3, "bfloat16": 1.5, "float16": 0.25}


@dataclass
class Answer:
    """One prompt's greedy continuation and the logits that chose it (teacher-forced, float32, on CPU)."""

    prompt_ids: torch.Tensor  # [1, prompt length]
    tokens: list[int]
    logits: torch.Tensor  # [len(tokens), vocab]: row i chose tokens[i]


@dataclass
class ParityResult:
    """What `merge` says about base + adapter versus the merged folder."""

    ok: bool
    prompts: int
    new_tokens: int
    identical: int  # prompts whose greedy continuation is the same token for token
    max_logit_diff: float
    tolerance: float
    flips: list[str] = field(default_factory=list)  # accepted near-tie flips, described

    def line(self) -> str:
        verdict = "passed" if self.ok else "FAILED"
        text = (f"parity check {verdict}: greedy tokens identical on {self.identical}/{self.prompts} prompts "
                f"({self.new_tokens} tokens each), max |logit difference| {self.max_logit_diff:.2g} "
                f"(tolerance {self.tolerance:g})")
        return text + (f"; {'; '.join(self.flips)}" if self.flips else "")


def _logits(model: Any, prompt_ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Teacher-forced logits that predict each of `tokens` after the prompt."""
    device = next(model.parameters()).device
    ids = torch.cat([prompt_ids, torch.tensor([tokens], dtype=prompt_ids.dtype)], dim=1).to(device)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    return out[prompt_ids.shape[1] - 1: -1].float().cpu()


def _greedy(model: Any, prompt_ids: torch.Tensor, pad_id: int | None) -> list[int]:
    device = next(model.parameters()).device
    ids = prompt_ids.to(device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
    return out[0, prompt_ids.shape[1]:].tolist()


def answers(model: Any, tokenizer: Any, formatter: Any) -> list[Answer]:
    """The model's greedy answers to PROMPTS, each formatted the way the run was trained (`formatter`).

    min_new_tokens keeps every answer NEW_TOKENS long: an early EOS would leave less to compare.
    """
    out = []
    for prompt in track(PROMPTS, "parity check: base + adapter"):
        prompt_ids = tokenizer(formatter(prompt), return_tensors="pt", add_special_tokens=False)["input_ids"]
        tokens = _greedy(model, prompt_ids, tokenizer.pad_token_id)
        out.append(Answer(prompt_ids, tokens, _logits(model, prompt_ids, tokens)))
    return out


def compare(model: Any, tokenizer: Any, reference: list[Answer], tolerance: float) -> ParityResult:
    """Check `model` against `reference` (base + adapter's answers)."""
    identical, worst, flips, ok = 0, 0.0, [], True
    for n, ref in enumerate(track(reference, "parity check: merged model")):
        worst = max(worst, (_logits(model, ref.prompt_ids, ref.tokens) - ref.logits).abs().max().item())
        tokens = _greedy(model, ref.prompt_ids, tokenizer.pad_token_id)
        if tokens == ref.tokens:
            identical += 1
            continue
        k = next(i for i, (a, b) in enumerate(zip(tokens, ref.tokens, strict=True)) if a != b)
        top2 = ref.logits[k].topk(2).values
        margin = (top2[0] - top2[1]).item()
        # Two logits that each move by at most `tolerance` can swap only if they were within 2x of it.
        if margin <= 2 * tolerance:
            flips.append(f"prompt {n + 1} differs from token {k + 1} on, where base + adapter's top two "
                         f"were {margin:.2g} apart (a near tie)")
        else:
            ok = False
            flips.append(f"prompt {n + 1} differs from token {k + 1} on, where base + adapter's top two "
                         f"were {margin:.2g} apart: NOT a near tie")
    ok = ok and worst <= tolerance
    return ParityResult(ok, len(reference), NEW_TOKENS, identical, worst, tolerance, flips)
