"""The embedded conversation data: the `chitchat-dataset` package (BYU PCC lab, MIT, 7,168 conversations).

Each conversation is a list of turns, each turn a list of messages by one sender. The first sender
becomes the user and the other the assistant; consecutive turns by the same sender are merged, since
several messages in a row by one person are one turn of the conversation. 3,150 of the 7,168
conversations have a single speaker (the partner never answered); with no reply to learn from they are
left out, leaving 4,018.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

from loraforge.errors import DataError

NAME = "chitchat"


def chitchat_path() -> Path:
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded data 'chitchat' needs the PyPI package chitchat-dataset: "
                        "pip install --no-deps chitchat-dataset")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset.json"


def conversation_to_messages(conv: dict[str, Any]) -> list[dict[str, str]]:
    turns: list[tuple[str, str]] = []  # (sender, text)
    for turn in conv.get("messages", []):
        if not turn:
            continue
        sender = turn[0].get("sender", "")
        text = "\n".join(u["text"].strip() for u in turn if u.get("text", "").strip())
        if not text:
            continue
        if turns and turns[-1][0] == sender:
            turns[-1] = (sender, turns[-1][1] + "\n" + text)
        else:
            turns.append((sender, text))
    if not turns:
        return []
    first = turns[0][0]
    return [{"role": "user" if s == first else "assistant", "content": t} for s, t in turns]


_TOTAL: dict[str, int] = {}


def load_chitchat() -> list[tuple[str, list[dict[str, str]]]]:
    """All conversations with a reply as (conversation id, messages), in the file's order. Those where
    only one person wrote are left out (nothing to train on); `coverage_note` says how many."""
    return list(_conversations(str(chitchat_path())))


@functools.lru_cache(maxsize=1)
def _conversations(path: str) -> tuple[tuple[str, list[dict[str, str]]], ...]:
    # Parsed once per process (~1 s): a preview reads the source twice, to tell its format and to sample
    # it. Readers build new records from these messages and never change them.
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    out = []
    for conv_id, conv in data.items():
        messages = conversation_to_messages(conv)
        if any(m["role"] == "assistant" for m in messages):
            out.append((conv_id, messages))
    _TOTAL["all"], _TOTAL["with_reply"] = len(data), len(out)
    return tuple(out)


def coverage_note() -> str:
    if not _TOTAL:
        load_chitchat()
    return (f"chitchat: {_TOTAL['with_reply']} of {_TOTAL['all']} conversations have a reply; "
            f"{_TOTAL['all'] - _TOTAL['with_reply']} written by one person only are not used")
