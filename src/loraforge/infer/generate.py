"""`loraforge generate`: prompts (or a file of prompts) in, answers out as JSONL, generated in batches.

Prompts are rendered the way the run was trained (`Loaded.formatter`), then generated through
`loraforge.infer.generation.generate_batch` — the same left-padded batched generation the evaluation uses.
On a GPU, greedy and sampled decoding go through `FastDecoder` (stock's kernels replayed as CUDA graphs,
docs/serving.md): the same tokens as `generate` for greedy, ~3× faster for a 7B model. Beam search is
`eval.num_beams` wide, the run's setting (4 unless its config says otherwise), as in its evaluation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from loraforge.errors import DataError
from loraforge.infer.generation import BEAM_WIDTH, Decoding, encode, generate_batch
from loraforge.infer.load import Loaded, load

Prompt = str | list[dict[str, str]]


def read_prompts(file: str | Path) -> list[Prompt]:
    """Prompts from a .txt file (one per non-empty line) or a .jsonl file.

    A JSONL line is a string, or an object with `prompt`, `instruction` (+ optional `input`), or
    `messages` (a trailing assistant message — the reference answer — is dropped).
    """
    path = Path(file)
    if not path.is_file():
        raise DataError(f"prompt file {str(path)!r} does not exist.")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts: list[Prompt] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg}).") from e
        if isinstance(rec, str):
            prompts.append(rec)
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            msgs = [m for m in rec["messages"] if isinstance(m, dict)]
            while msgs and msgs[-1].get("role") == "assistant":
                msgs.pop()
            if not msgs:
                raise DataError(f"{path}:{n}: 'messages' has no user turn to answer.")
            prompts.append(msgs)
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            prompts.append(rec["prompt"])
        elif isinstance(rec, dict) and isinstance(rec.get("instruction"), str):
            extra = rec.get("input") or ""
            prompts.append(rec["instruction"] + (f"\n\n{extra}" if extra.strip() else ""))
        else:
            raise DataError(f"{path}:{n}: expected a string or an object with 'prompt', 'instruction' or "
                            f"'messages'; got keys {sorted(rec) if isinstance(rec, dict) else type(rec).__name__}.")
    return prompts


def render(loaded: Loaded, prompt: Prompt) -> str:
    """The model input text for `prompt`, in the run's training format.

    Chat runs take a message list as is; other runs (alpaca, text) see only the last user message,
    as they were trained on single prompts.
    """
    if isinstance(prompt, list) and loaded.data_kind != "chat":
        prompt = next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")
    return loaded.formatter(prompt)


def generate_texts(loaded: Loaded, prompts: list[Prompt], *, max_new_tokens: int = 256, decoding: str = "greedy",
                   temperature: float = 0.7, top_p: float = 0.9, batch_size: int = 8,
                   fast: bool | None = None) -> list[str]:
    """Answers to `prompts` (strings or message lists), in order. `fast`: decode with FastDecoder (None: on a
    GPU, for greedy and sampling, when the model is one it covers)."""
    beams = loaded.run.eval.num_beams if loaded.run is not None else BEAM_WIDTH
    settings = Decoding.named(decoding, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              num_beams=beams)
    encoded = [encode(loaded.tokenizer, render(loaded, p)) for p in prompts]
    return generate_batch(loaded.model, loaded.tokenizer, encoded, settings, batch_size=batch_size, fast=fast)


def generate_cli(run: str | Path, *, prompts: list[str], file: str | Path | None = None, out: str | Path | None = None,
                 max_new_tokens: int = 256, decoding: str = "greedy", temperature: float = 0.7, top_p: float = 0.9,
                 batch_size: int = 8, trust_remote_code: bool = False) -> list[dict[str, Any]]:
    """Generate for `prompts` and the prompts in `file`; write JSONL to `out` (or print it)."""
    all_prompts: list[Prompt] = list(prompts) + (read_prompts(file) if file else [])
    if not all_prompts:
        raise DataError("nothing to generate: give --prompt TEXT (repeatable) or --file PROMPTS.txt|.jsonl.")
    # Checked before the model loads, so that a bad option fails at once.
    Decoding.named(decoding, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    loaded = load(run, trust_remote_code=trust_remote_code)
    answers = generate_texts(loaded, all_prompts, max_new_tokens=max_new_tokens, decoding=decoding,
                             temperature=temperature, top_p=top_p, batch_size=batch_size)
    records = [{"prompt": p, "output": a} for p, a in zip(all_prompts, answers, strict=False)]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
    return records
