"""Every source format, on small files written by the tests: rendering, masking, counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import full_text, trained_text
from tinymodels import alpaca_records, chat_records, write_jsonl

from loraforge.config import DataConfig
from loraforge.data.pipeline import build_datasets
from loraforge.data.templates import FALLBACK_CHAT_TEMPLATE

EOS = "<|im_end|>"


def build(tokenizer, dataset, **kw):
    kw.setdefault("validation_split", 0.0)
    return build_datasets(DataConfig(dataset=str(dataset), **kw), tokenizer, 4)


def test_alpaca_exact_rendering_and_masking(tmp_path: Path, tokenizer) -> None:
    recs = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "Hi there!"}]
    data = build(tokenizer, write_jsonl(tmp_path / "a.jsonl", recs), validation_split=0.0)
    by_text = {full_text(e, tokenizer): e for e in data.train}
    with_input = ("### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5" + EOS)
    no_input = "### Instruction:\nSay hi.\n\n### Response:\nHi there!" + EOS
    assert set(by_text) == {with_input, no_input}
    assert trained_text(by_text[with_input], tokenizer) == "5" + EOS
    assert trained_text(by_text[no_input], tokenizer) == "Hi there!" + EOS
    assert data.kind == "alpaca" and data.stats["train"].used == 2


def test_train_on_inputs_labels_everything(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_records(2))
    data = build(tokenizer, path, train_on_inputs=True)
    for e in data.train:
        assert e["labels"] == e["input_ids"]


def test_alpaca_json_array_jsonl_hf_folder_and_parquet_agree(tmp_path: Path, tokenizer) -> None:
    import datasets

    recs = alpaca_records(6)
    (tmp_path / "a.json").write_text(json.dumps(recs, indent=1))
    write_jsonl(tmp_path / "a.jsonl", recs)
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_list(recs).to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    names = ("a.json", "a.jsonl", "saved", "pq")
    results = [sorted(map(str, build(tokenizer, tmp_path / name).train)) for name in names]
    assert all(r == results[0] for r in results) and len(results[0]) == 6


def test_chat_messages_every_assistant_turn_trained(tmp_path: Path, tokenizer) -> None:
    recs = chat_records(2)
    recs[1] = {"conversations": [{"from": "human", "value": m["content"]} if m["role"] == "user"
                                 else {"from": "gpt", "value": m["content"]} for m in recs[1]["messages"]]}
    data = build(tokenizer, write_jsonl(tmp_path / "c.jsonl", recs))
    got = sorted(trained_text(e, tokenizer) for e in data.train)
    want = sorted(f"{w} {w} {w}.{EOS}Yes, {w}.{EOS}" for w in ("apple", "river"))
    assert got == want
    assert data.kind == "chat"


def test_dialogue_hf_daily_dialog_layout(tmp_path: Path, tokenizer) -> None:
    import datasets

    rows = [{"dialog": ["Hello, how are you?", "Fine, thanks.", "Great!", "See you."], "act": [1, 2, 3, 4],
             "emotion": [0, 0, 0, 0]}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    data = build(tokenizer, tmp_path / "dd")
    text = full_text(data.train[0], tokenizer)
    assert "<|im_start|>user\nHello, how are you?" in text and "<|im_start|>assistant\nFine, thanks." in text
    assert trained_text(data.train[0], tokenizer) == f"Fine, thanks.{EOS}See you.{EOS}"


def test_oasst_tree_follows_best_ranked_replies(tmp_path: Path, tokenizer) -> None:
    rows = [
        {"message_id": "r", "parent_id": None, "role": "prompter", "text": "What is 2+2?", "rank": None, "lang": "en"},
        {"message_id": "a1", "parent_id": "r", "role": "assistant", "text": "Five.", "rank": 1, "lang": "en"},
        {"message_id": "a0", "parent_id": "r", "role": "assistant", "text": "Four.", "rank": 0, "lang": "en"},
        {"message_id": "p", "parent_id": "a0", "role": "prompter", "text": "Sure?", "rank": 0, "lang": "en"},
        {"message_id": "b", "parent_id": "p", "role": "assistant", "text": "Yes, four.", "rank": 0, "lang": "en"},
        {"message_id": "q", "parent_id": None, "role": "prompter", "text": "Unanswered", "rank": None, "lang": "en"},
    ]
    data = build(tokenizer, write_jsonl(tmp_path / "oasst.jsonl", rows))
    assert len(data.train) == 1
    assert trained_text(data.train[0], tokenizer) == f"Four.{EOS}Yes, four.{EOS}"
    assert "Five." not in full_text(data.train[0], tokenizer)
    assert any("6 message rows → 1 conversations" in n for n in data.stats["train"].notes)


def test_raw_text_is_chunked_not_truncated(tmp_path: Path, tokenizer) -> None:
    words = " ".join(f"word{i}" for i in range(400))
    (tmp_path / "corpus.txt").write_text(words + "\n\nA second short document.\n")
    data = build(tokenizer, tmp_path / "corpus.txt", max_length=64)
    assert data.stats["train"].read == 2 and data.stats["train"].truncated == 0
    assert all(len(e["input_ids"]) <= 64 for e in data.train)
    # blocks overlap by one token: joined, they give back the whole document's tokens
    ids = tokenizer(words)["input_ids"] + [tokenizer.eos_token_id]
    blocks = [e["input_ids"] for e in data.train if len(e["input_ids"]) > 10]
    joined = blocks[0] + [t for b in blocks[1:] for t in b[1:]]
    assert sorted(map(tuple, [joined])) == [tuple(ids)] or joined == ids


def test_csv_with_column_mapping(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "qa.csv").write_text("question,answer\nWhat is red?,A colour.\n\"Why, then?\",Because.\n")
    data = build(tokenizer, tmp_path / "qa.csv", column_mapping={"question": "instruction", "answer": "output"})
    assert sorted(trained_text(e, tokenizer) for e in data.train) == ["A colour." + EOS, "Because." + EOS]


def test_user_jinja_template(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "input": "", "output": "Yo"}])
    data = build(tokenizer, path, template="Q: {{ instruction }}\nA: ")
    assert full_text(data.train[0], tokenizer) == "Q: Hi\nA: Yo" + EOS
    # "A: Yo": the BPE token " Yo" straddles prompt and answer; it is trained on, since it carries the answer
    assert trained_text(data.train[0], tokenizer) == " Yo" + EOS


def test_fallback_chat_template_for_tokenizer_without_one(tmp_path: Path, tokenizer) -> None:
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    data = build(tok, write_jsonl(tmp_path / "c.jsonl", chat_records(1)))
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE
    assert "### User:\nSay apple." in full_text(data.train[0], tok)
    assert trained_text(data.train[0], tok) == f"apple apple apple.{EOS}Yes, apple.{EOS}"


def test_truncation_and_right_padding(tmp_path: Path, tokenizer) -> None:
    from loraforge.data.collate import PadCollator

    recs = [{"instruction": "word " * 100, "input": "", "output": "end"}, *alpaca_records(1)]
    data = build(tokenizer, write_jsonl(tmp_path / "a.jsonl", recs), max_length=32)
    s = data.stats["train"]
    assert (s.read, s.truncated, s.dropped_no_labels, s.used) == (2, 1, 1, 1)  # the long one lost its answer
    long = build(tokenizer, write_jsonl(tmp_path / "b.jsonl", recs[:1] + recs), max_length=512)
    batch = PadCollator(tokenizer.pad_token_id)(list(long.train))
    short = int(batch["attention_mask"].sum(1).min())
    row = int(batch["attention_mask"].sum(1).argmin())
    assert (batch["input_ids"][row, short:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][row, short:] == -100).all()


@pytest.mark.parametrize("how", ["function", "subclass"])
def test_custom_loaders(tmp_path: Path, tokenizer, how: str) -> None:
    from loraforge import CustomDatasetLoader, register_loader

    @register_loader("tests_data_tickets")
    def tickets():
        return ({"instruction": f"Ticket {i}?", "input": "", "output": f"Answer {i}."} for i in range(5))

    if how == "function":
        data = build_datasets(DataConfig(dataset="custom:tests_data_tickets", validation_split=0.2), tokenizer)
        assert data.stats["train"].used + data.stats["validation"].used == 5
        assert all(trained_text(e, tokenizer).startswith("Answer ") for e in data.train)
    else:
        class Tickets(CustomDatasetLoader):
            def records(self):
                return tickets()

        dd = Tickets(tokenizer, max_length=64).load()
        assert set(dd) == {"train", "validation"} and len(dd["train"]) + len(dd["validation"]) == 5
        assert trained_text(dd["train"][0], tokenizer).startswith("Answer ")


def test_unregistered_custom_loader_is_a_clear_error(tokenizer) -> None:
    from loraforge.errors import DataError

    with pytest.raises(DataError, match="no loader registered as 'custom:nope'"):
        build_datasets(DataConfig(dataset="custom:nope"), tokenizer)


def test_jsonl_is_one_record_a_line_even_when_a_line_is_an_array(tmp_path: Path, tokenizer) -> None:
    # Found by the fuzz suite: a .jsonl holding `["0", null]` was read as a JSON array of two records.
    path = tmp_path / "a.jsonl"
    path.write_text('["0", null]\n' + json.dumps(alpaca_records(1)[0]) + "\n")
    s = build(tokenizer, path, skip_invalid=True).stats["train"]
    assert (s.read, s.used, s.skipped_invalid) == (2, 1, 1)
    assert "line 1" in s.first_errors[0] and "got list" in s.first_errors[0]


def test_a_pretty_printed_array_named_jsonl_is_told_to_be_json(tmp_path: Path, tokenizer) -> None:
    from loraforge.errors import DataError

    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(alpaca_records(2), indent=2))
    with pytest.raises(DataError, match=r"a\.jsonl: .*looks like one JSON array.*Rename it to \.json"):
        build(tokenizer, path)
