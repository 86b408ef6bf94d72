"""Prompt templates: render an example as text segments, each marked trainable or not.

Every example becomes a list of `(text, trainable)` segments whose concatenation is exactly the text the
model sees. The tokenizer step (tokenize.py) turns the trainable characters into labelled tokens, so one
rule covers Alpaca, chat and raw text, and the labelled tokens decode back to exactly the responses.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

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
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"data.template: cannot read template file {template!r} as UTF-8 text ({e}).") from None
    return template


# A user template may come from someone else's run folder, so it is rendered in Jinja's immutable sandbox
# (as transformers renders chat templates): no attributes starting with '_', no calls that mutate, and
# `range` capped. On top of the sandbox, the two operators that can build an unbounded value from a short
# template ('x' * 10**10, 9 ** (9 ** 9)) are refused past a size no prompt needs.
MAX_TEMPLATE_REPEAT = 100_000
MAX_TEMPLATE_EXPONENT = 1_000


class _TemplateSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_TEMPLATE_EXPONENT:
            raise SecurityError(f"an exponent over {MAX_TEMPLATE_EXPONENT} is not allowed")
        if operator == "*" and isinstance(left, (str, list, tuple)) != isinstance(right, (str, list, tuple)):
            count = right if isinstance(left, (str, list, tuple)) else left
            if isinstance(count, int) and count > MAX_TEMPLATE_REPEAT:
                raise SecurityError(f"repeating a value more than {MAX_TEMPLATE_REPEAT} times is not allowed")
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=16)
def _compiled(user_template: str) -> Template:
    """Compile once per template text (records are rendered by the thousand)."""
    try:
        return _TemplateSandbox(undefined=StrictUndefined).from_string(user_template)
    except TemplateError as e:
        raise DataError(f"data.template: not a valid Jinja template: {e}.") from None


def render_user_template(user_template: str, fields: dict[str, str]) -> str:
    """Render `data.template` with a record's fields, sandboxed; any failure is a DataError naming data.template."""
    try:
        return _compiled(user_template).render(**fields)
    except SecurityError as e:
        raise DataError(f"data.template: refused to render: {str(e).rstrip('.')}. A template may use the "
                        f"record's fields ({', '.join(sorted(fields))}), filters and tests, not Python attributes or "
                        "underscored names.") from None
    except Exception as e:  # noqa: BLE001 - any other Jinja or Python error comes from the user's template
        raise DataError(f"data.template: cannot render with this record's fields {sorted(fields)}: "
                        f"{type(e).__name__}: {e}") from None


def merge_system_into_user(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The system message as the start of the first user turn (how Gemma 3's own template does it), for
    templates without a system role; a conversation without a user turn after it gets one."""
    system, rest = messages[0]["content"], list(messages[1:])
    if rest and rest[0]["role"] == "user":
        return [{**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    # transformers renders chat templates in Jinja's immutable sandbox; a template that reaches outside it
    # (it came with the model) stops here with a message rather than a traceback.
    try:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateError as e:
            # Gemma 2's template raises "System role not supported": the system message goes into the first
            # user turn instead, the same way for training and serving (both render here).
            if not messages or messages[0]["role"] != "system" or "system" not in str(e).lower():
                raise
            return tokenizer.apply_chat_template(merge_system_into_user(messages), tokenize=False,
                                                 add_generation_prompt=generation_prompt)
    except (SecurityError, TemplateError) as e:
        raise DataError(f"the chat template of the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} cannot "
                        f"be used with these messages: {type(e).__name__}: {e}. (A template that reaches for "
                        "Python attributes is refused: use a model whose chat template you trust.)") from None


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
        if i == 0:  # nothing before the reply to render (transformers 5 refuses an empty conversation)
            return _chat_segments_by_search(messages, tokenizer)
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
        prompt = render_user_template(user_template, example)
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
