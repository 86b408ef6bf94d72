"""Prompt templates: render an example as text segments, each marked trainable or not.

Every example becomes a list of `(text, trainable)` segments whose concatenation is exactly the text the
model sees. The tokenizer step (tokenize.py) turns the trainable characters into labelled tokens, so one
rule covers Alpaca, chat and raw text, and the labelled tokens decode back to exactly the responses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, StrictUndefined

from loraforge.errors import DataError

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

# Used for tokenizers without a chat template (e.g. base Llama 2). Plain-text role headers, so no new
# tokens are needed; every turn ends with the tokenizer's EOS so the model learns to stop.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)

Segments = list[tuple[str, bool]]


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt up to and including '### Response:\\n' (no Input block when input is empty)."""
    if input and input.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def ensure_chat_template(tokenizer: Any) -> None:
    """Give a tokenizer without a chat template the plain fallback format."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def load_user_template(template: str) -> str | None:
    """`data.template` may be a preset name, a .jinja file, or a Jinja string; return the Jinja text or None."""
    if template in ("auto", "alpaca", "chat"):
        return None
    path = Path(template).expanduser()
    if template.endswith((".jinja", ".j2", ".txt")):
        if not path.is_file():
            raise DataError(f"data.template: template file {template!r} does not exist.")
        return path.read_text()
    return template


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_segments(messages: list[dict[str, str]], tokenizer: Any) -> Segments:
    """Render a conversation with the tokenizer's chat template, marking every assistant turn trainable.

    For assistant message i, the template rendered up to message i with a generation prompt is a prefix of
    the rendering up to and including message i; the difference is the reply plus the template's
    end-of-turn marker (e.g. '<|im_end|>'), which is trained on so the model learns to stop. Trailing
    whitespace after the marker is not trained on.
    """
    ensure_chat_template(tokenizer)
    segments: Segments = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True)
        full = _render(tokenizer, messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            return _chat_segments_by_search(messages, tokenizer)
        reply = full[len(prompt):]
        trained = reply.rstrip()
        segments += [(prompt[len(done):], False), (trained, True), (reply[len(trained):], False)]
        done = full
    whole = _render(tokenizer, messages, False)
    if not whole.startswith(done):
        return _chat_segments_by_search(messages, tokenizer)
    segments.append((whole[len(done):], False))
    return [s for s in segments if s[0]]


def _chat_segments_by_search(messages: list[dict[str, str]], tokenizer: Any) -> Segments:
    """Fallback for templates that are not prefix-stable: find each reply's text in the full rendering."""
    whole = _render(tokenizer, messages, False)
    segments: Segments = []
    pos = 0
    for message in messages:
        if message["role"] != "assistant" or not message["content"]:
            continue
        at = whole.find(message["content"], pos)
        if at < 0:
            continue
        end = at + len(message["content"])
        eos = tokenizer.eos_token or ""
        if eos and whole.startswith(eos, end):
            end += len(eos)
        segments += [(whole[pos:at], False), (whole[at:end], True)]
        pos = end
    segments.append((whole[pos:], False))
    return [s for s in segments if s[0]]


def alpaca_segments(example: dict[str, str], user_template: str | None = None) -> Segments:
    """Alpaca example → [(prompt, False), (output, True)]; EOS is appended at tokenization."""
    if user_template:
        try:
            prompt = Environment(undefined=StrictUndefined).from_string(user_template).render(**example)
        except Exception as e:  # noqa: BLE001 - any Jinja error is the user's template
            raise DataError(f"data.template: cannot render with this record's fields {sorted(example)}: {e}") from e
    else:
        prompt = alpaca_prompt(example["instruction"], example.get("input", ""))
    return [(prompt, False), (example["output"], True)]


def prompt_formatter(kind: str, tokenizer: Any, user_template: str | None = None, system_prompt: str | None = None):
    """A function prompt -> model input text, matching how training data was rendered (for generation)."""
    if kind == "alpaca":
        if user_template:
            return lambda prompt: alpaca_segments({"instruction": prompt, "input": "", "output": ""},
                                                  user_template)[0][0]
        return lambda prompt: alpaca_prompt(prompt)
    if kind == "text":
        return lambda prompt: prompt
    ensure_chat_template(tokenizer)

    def chat(prompt: str | list[dict[str, str]]) -> str:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        return _render(tokenizer, messages, True)

    return chat
