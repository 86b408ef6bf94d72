"""Preference pairs: the three layouts, SFT's templates, answer-only labels, and errors naming file/record/field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tinymodels import write_jsonl

from loraforge.config import DataConfig
from loraforge.data.examples import encode_record
from loraforge.data.preference import PairCollator, build_preference_datasets, encode_pair, normalize_pair
from loraforge.errors import ConfigError, DataError

PROMPT = [{"role": "user", "content": "Say apple."}]


def _labelled_text(side: dict[str, list[int]], tokenizer: Any) -> str:
    return tokenizer.decode([t for t in side["labels"] if t != -100])


def _pair(record: dict[str, Any], tokenizer: Any, **cfg: Any):
    data = DataConfig(dataset="x.jsonl", **cfg)
    norm = normalize_pair(record, "x.jsonl, line 1", data.template)
    return norm, encode_pair(norm, data, tokenizer, None, "x.jsonl, line 1")[0]


def test_string_pair_is_sft_example_with_answer_only_labels(tokenizer):
    norm, pair = _pair({"prompt": "Say apple.", "chosen": "apple apple.", "rejected": "No."}, tokenizer)
    assert norm["messages"] == PROMPT
    # The chosen side is exactly the SFT example of the same one-turn conversation (prompt format included).
    sft, _ = encode_record({"messages": PROMPT + [{"role": "assistant", "content": "apple apple."}]},
                           DataConfig(), tokenizer, None)
    assert pair["chosen"] == sft[0]
    assert _labelled_text(pair["chosen"], tokenizer) == "apple apple.<|im_end|>"
    assert _labelled_text(pair["rejected"], tokenizer) == "No.<|im_end|>"
    # Both sides share the unlabelled prompt tokens.
    n = pair["chosen"]["labels"].index(next(t for t in pair["chosen"]["labels"] if t != -100))
    assert pair["chosen"]["input_ids"][:n] == pair["rejected"]["input_ids"][:n]


def test_chat_lists_sharing_a_prefix_label_only_the_last_reply(tokenizer):
    shared = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
              {"role": "user", "content": "Say apple."}]
    record = {"chosen": shared + [{"role": "assistant", "content": "apple"}],
              "rejected": shared + [{"role": "assistant", "content": "pear"}]}
    norm, pair = _pair(record, tokenizer)
    assert norm["messages"] == shared and (norm["chosen"], norm["rejected"]) == ("apple", "pear")
    assert _labelled_text(pair["chosen"], tokenizer) == "apple<|im_end|>"
    assert _labelled_text(pair["rejected"], tokenizer) == "pear<|im_end|>"


def test_prompt_as_a_message_list_with_string_answers(tokenizer):
    """docs/preference.md's layout: `prompt` a message list (system + user, no assistant turn yet)."""
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say apple."}]
    norm, pair = _pair({"prompt": prompt, "chosen": "apple", "rejected": "pear"}, tokenizer)
    assert norm["messages"] == prompt and (norm["chosen"], norm["rejected"]) == ("apple", "pear")
    assert _labelled_text(pair["chosen"], tokenizer) == "apple<|im_end|>"
    assert "Be brief." in tokenizer.decode(pair["rejected"]["input_ids"])


def test_alpaca_pair_uses_the_alpaca_template(tokenizer):
    record = {"instruction": "Repeat apple.", "input": "twice", "chosen": "apple apple", "rejected": "pear"}
    _, pair = _pair(record, tokenizer)
    sft, _ = encode_record({"instruction": "Repeat apple.", "input": "twice", "output": "apple apple"},
                           DataConfig(), tokenizer, None)
    assert pair["chosen"] == sft[0]
    assert "### Response:" in tokenizer.decode(pair["rejected"]["input_ids"])
    assert _labelled_text(pair["rejected"], tokenizer) == "pear" + tokenizer.eos_token
    # A string prompt follows data.template too.
    _, pair = _pair({"prompt": "Repeat apple.", "chosen": "apple", "rejected": "pear"}, tokenizer, template="alpaca")
    assert tokenizer.decode(pair["chosen"]["input_ids"]).startswith("### Instruction:\nRepeat apple.")


def test_collator_puts_chosen_rows_first(tokenizer):
    _, a = _pair({"prompt": "Say apple.", "chosen": "apple apple apple.", "rejected": "No."}, tokenizer)
    _, b = _pair({"prompt": "Say pear.", "chosen": "pear.", "rejected": "I will not."}, tokenizer)
    batch = PairCollator(tokenizer.pad_token_id)([a, b])
    assert batch["input_ids"].shape[0] == 4
    for row, side in enumerate([a["chosen"], b["chosen"], a["rejected"], b["rejected"]]):
        k = len(side["input_ids"])
        assert batch["input_ids"][row, :k].tolist() == side["input_ids"]
        assert batch["labels"][row, :k].tolist() == side["labels"]
        assert int(batch["attention_mask"][row].sum()) == k
        assert (batch["labels"][row, k:] == -100).all()


@pytest.mark.parametrize(("record", "field"), [
    ({"prompt": "Say apple.", "chosen": "apple", "rejected": "apple"}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "Say apple.", "chosen": "apple"}, "missing field 'rejected'"),
    ({"prompt": "Say apple.", "chosen": "apple", "rejected": ""}, "field 'rejected' is empty"),
    ({"chosen": "apple", "rejected": "pear"}, "missing field 'prompt'"),
    ({"prompt": "word " * 200, "chosen": "apple", "rejected": "pear"}, "field 'prompt' is"),
])
def test_malformed_pairs_name_file_record_and_field(tmp_path, tokenizer, record, field):
    good = {"prompt": "Say pear.", "chosen": "pear", "rejected": "apple"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, good, record])
    cfg = DataConfig(dataset=str(path), max_length=64, validation_split=0.0)
    with pytest.raises(DataError) as e:
        build_preference_datasets(cfg, tokenizer)
    assert f"{path}, line 3" in str(e.value) and field in str(e.value)
    # skip_invalid counts it instead of stopping.
    data = build_preference_datasets(DataConfig(dataset=str(path), max_length=64, validation_split=0.0,
                                                skip_invalid=True), tokenizer)
    assert len(data.train) == 2 and data.stats["train"].skipped_invalid == 1


def test_split_and_refusals(tmp_path, tokenizer):
    records = [{"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": "no"} for i in range(20)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    data = build_preference_datasets(DataConfig(dataset=str(path), validation_split=0.2), tokenizer)
    assert (len(data.train), len(data.validation)) == (16, 4)
    assert len(data.train.lengths) == 16 and data.kind == "chat"
    with pytest.raises(ConfigError, match="data.packing"):
        build_preference_datasets(DataConfig(dataset=str(path), packing=True), tokenizer)
    with pytest.raises(DataError, match="demo --dpo"):
        build_preference_datasets(DataConfig(dataset="chitchat"), tokenizer)


def test_column_mapping_renames_output_columns(tmp_path: Path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"instruction": "Repeat apple.", "output_chosen": "apple",
                                                   "output_rejected": "pear"}] * 2)
    cfg = DataConfig(dataset=str(path), validation_split=0.0,
                     column_mapping={"output_chosen": "chosen", "output_rejected": "rejected"})
    data = build_preference_datasets(cfg, tokenizer)
    assert _labelled_text(data.train[0]["chosen"], tokenizer) == "apple" + tokenizer.eos_token
