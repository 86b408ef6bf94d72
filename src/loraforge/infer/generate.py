"""`loraforge generate`: prompts (or a file of prompts) in, answers out as JSONL, generated in batches.

Prompts are rendered the way the run was trained (`Loaded.formatter`), then generated through
`QualitativeEvaluator.generate_batch` — the same left-padded batched generation the evaluation uses. On a
GPU, greedy and sampled decoding go through `FastDecoder` instead (stock's kernels replayed as CUDA graphs,
docs/serving.md): the same tokens as `generate` for greedy, ~3× faster for a 7B model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from loraforge.errors import DataError
from loraforge.eval.qualitative import QualitativeEvaluator
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


def decoding_kwargs(decoding: str, temperature: float, top_p: float) -> dict[str, Any]:
    if decoding == "greedy":
        return {"num_beams": 1, "do_sample": False}
    if decoding == "beam":
        return {"num_beams": 4, "do_sample": False}
    if decoding == "sample":
        return {"num_beams": 1, "do_sample": True, "temperature": temperature, "top_p": top_p}
    raise DataError(f"--decoding must be greedy, beam or sample; got {decoding!r}.")


def generate_texts(loaded: Loaded, prompts: list[Prompt], *, max_new_tokens: int = 256, decoding: str = "greedy",
                   temperature: float = 0.7, top_p: float = 0.9, batch_size: int = 8,
                   fast: bool | None = None) -> list[str]:
    """Answers to `prompts` (strings or message lists), in order. `fast`: decode with FastDecoder (None: on a
    GPU, for greedy and sampling, when the model is one it covers)."""
    texts = [render(loaded, p) for p in prompts]
    # The texts are already in the training format, so the evaluator must not template them again.
    evaluator = QualitativeEvaluator(loaded.model, loaded.tokenizer, template=lambda text: text)
    kwargs = decoding_kwargs(decoding, temperature, top_p)
    if fast is None:
        from loraforge.infer.fast_decode import supported

        fast = (decoding != "beam" and next(loaded.model.parameters()).device.type == "cuda"
                and supported(loaded.model)[0])
    if not fast or decoding == "beam":
        return evaluator.generate_batch(texts, max_length=max_new_tokens, batch_size=batch_size, **kwargs)
    return _fast_texts(loaded, [evaluator.encode_prompt(t) for t in texts], max_new_tokens, batch_size,
                       temperature if decoding == "sample" else 0.0, top_p)


def _fast_texts(loaded: Loaded, encoded: list[list[int]], max_new_tokens: int, batch_size: int,
                temperature: float, top_p: float) -> list[str]:
    """What `QualitativeEvaluator.generate_batch` answers, through FastDecoder: the same left-padded
    batches, each row ending at the EOS `generate` would stop at, decoded the same way."""
    from loraforge.infer.fast_decode import FastDecoder, left_padded

    tok = loaded.tokenizer
    # Each batch brings new lengths: without per-shape attention plans (see FastDecoder's `attention`); a
    # lone unpadded prompt still runs stock's kernels.
    decoder = FastDecoder(loaded.model, max_rows=batch_size, attention="no-plans")
    eos = getattr(loaded.model.generation_config, "eos_token_id", None)
    eos = tok.eos_token_id if eos is None else eos
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos_ids)
    answers: list[str] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        ids, mask = left_padded(chunk, pad)
        rows: list[list[int]] = [[] for _ in chunk]
        ended = [False] * len(chunk)
        steps = decoder.stream(ids, mask, max_new_tokens, temperature=temperature, top_p=top_p)
        for tokens in steps:
            for i, t in enumerate(tokens):
                if not ended[i]:
                    ended[i] = t in eos_ids
                    rows[i].append(t)
            if all(ended):
                break
        steps.close()
        answers += [tok.decode(r, skip_special_tokens=True).strip() for r in rows]
    return answers


def generate_cli(run: str | Path, *, prompts: list[str], file: str | Path | None = None, out: str | Path | None = None,
                 max_new_tokens: int = 256, decoding: str = "greedy", temperature: float = 0.7, top_p: float = 0.9,
                 batch_size: int = 8) -> list[dict[str, Any]]:
    """Generate for `prompts` and the prompts in `file`; write JSONL to `out` (or print it)."""
    all_prompts: list[Prompt] = list(prompts) + (read_prompts(file) if file else [])
    if not all_prompts:
        raise DataError("nothing to generate: give --prompt TEXT (repeatable) or --file PROMPTS.txt|.jsonl.")
    decoding_kwargs(decoding, temperature, top_p)  # fail on a bad option before loading the model
    loaded = load(run)
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
