"""Chat templates without a system role (Gemma 2): the system message joins the first user turn, the same
way in training and at generation, instead of the template's exception."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from loraforge.data.templates import chat_segments, prompt_formatter
from loraforge.data.tokenize import encode_segments
from loraforge.errors import DataError

# Gemma 2's shape (turn markers, 'model' for the assistant, an exception for a system message), written here.
GEMMA2_LIKE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' + m['content'] | trim"
    " + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say apple."},
                {"role": "assistant", "content": "apple."}, {"role": "user", "content": "Again?"},
                {"role": "assistant", "content": "apple again."}]


@pytest.fixture
def gemma_like(tokenizer: Any) -> Any:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = GEMMA2_LIKE
    return tok


def test_system_message_joins_the_first_user_turn_in_training_and_serving(gemma_like: Any) -> None:
    segments = chat_segments(CONVERSATION, gemma_like)
    text = "".join(s for s, _ in segments)
    assert "<start_of_turn>user\nBe brief.\n\nSay apple.<end_of_turn>" in text
    assert [s for s, trained in segments if trained] == ["apple.<end_of_turn>", "apple again.<end_of_turn>"]
    # the server's prompt for the first reply is exactly training's text before it
    served = prompt_formatter("chat", gemma_like, system_prompt="Be brief.")(CONVERSATION[1:2])
    assert text.startswith(served) and text[len(served):].startswith("apple.<end_of_turn>")
    enc = encode_segments(segments, gemma_like, 512, add_special_tokens=False)
    assert gemma_like.decode([t for t in enc.labels if t != -100]) == "apple.<end_of_turn>apple again.<end_of_turn>"


def test_a_system_message_alone_becomes_a_user_turn_and_other_template_errors_stay_errors(gemma_like: Any) -> None:
    only = [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "ok."}]
    assert "<start_of_turn>user\nBe brief.<end_of_turn>" in "".join(s for s, _ in chat_segments(only, gemma_like))
    gemma_like.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(DataError, match="cannot be used with these messages"):
        chat_segments(CONVERSATION, gemma_like)
