"""`loraforge generate`, the terminal chat, and the pipeline API, on a real tiny run folder."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
import torch

from loraforge.errors import DataError
from loraforge.infer.chat import ChatSession, chat_loop
from loraforge.infer.generate import generate_cli, generate_texts, read_prompts, render
from loraforge.infer.load import load


@pytest.fixture(scope="module")
def loaded(lora_run: Path):
    return load(lora_run, device="cpu", dtype="float32")


def test_generate_cli_writes_jsonl_in_prompt_order_and_batching_does_not_change_greedy(lora_run: Path,
                                                                                       loaded, tmp_path: Path) -> None:
    file = tmp_path / "prompts.jsonl"
    file.write_text(json.dumps({"prompt": "Say river."}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "Say cloud."},
                                               {"role": "assistant", "content": "cloud cloud"}]}) + "\n"
                    + json.dumps("Say stone.") + "\n")
    out = tmp_path / "out.jsonl"
    records = generate_cli(lora_run, prompts=["Say apple.", "Hello there, how are you today?"], file=file, out=out,
                           max_new_tokens=6, batch_size=3)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines == records and len(lines) == 5
    assert lines[3]["prompt"] == [{"role": "user", "content": "Say cloud."}]  # reference answer dropped
    one_by_one = generate_texts(loaded, [r["prompt"] for r in lines], max_new_tokens=6, batch_size=1)
    assert [r["output"] for r in lines] == one_by_one
    assert all(o for o in one_by_one)


def test_fast_decoder_answers_what_generate_answers(loaded) -> None:
    """`loraforge generate` on a GPU decodes through FastDecoder; on the CPU its pieces run eagerly and must
    give generate()'s greedy answers, batched with left padding, each row ending at its own EOS."""
    prompts = ["Say apple.", "Hello there, how are you today? Tell me about rivers.", "Hi", "Say stone."]
    for batch in (1, 3):
        slow = generate_texts(loaded, prompts, max_new_tokens=40, batch_size=batch, fast=False)
        assert generate_texts(loaded, prompts, max_new_tokens=40, batch_size=batch, fast=True) == slow
    assert generate_texts(loaded, prompts[:1], max_new_tokens=40, fast=None) == slow[:1]  # CPU: the plain path
    # Rows end at EOS as generate's do: make a token this model emits early the EOS, for both paths.
    from loraforge.eval.qualitative import QualitativeEvaluator

    ids = QualitativeEvaluator(loaded.model, loaded.tokenizer, template=lambda t: t).encode_prompt(
        render(loaded, prompts[1]))
    with torch.no_grad():
        new = loaded.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):]
    gc = loaded.model.generation_config
    saved, free = gc.eos_token_id, slow
    gc.eos_token_id = int(new[3])
    try:
        stopped = generate_texts(loaded, prompts, max_new_tokens=40, batch_size=4, fast=False)
        assert generate_texts(loaded, prompts, max_new_tokens=40, batch_size=4, fast=True) == stopped
        assert len(stopped[1]) < len(free[1])  # row 1 did end early
    finally:
        gc.eos_token_id = saved


def test_read_prompts_names_the_bad_line(tmp_path: Path) -> None:
    file = tmp_path / "p.jsonl"
    file.write_text('{"prompt": "ok"}\n{"oops": 1}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2"):
        read_prompts(file)
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    assert read_prompts(txt) == ["one", "two"]


def test_chat_streams_keeps_history_and_resets(loaded) -> None:
    session = ChatSession(loaded, max_new_tokens=5, temperature=0)
    pieces: list[str] = []
    answer = session.reply("Say apple.", on_text=pieces.append)
    assert answer and "".join(pieces).strip() == answer and len(pieces) > 1  # streamed, not one block
    assert session.history == [{"role": "user", "content": "Say apple."}, {"role": "assistant", "content": answer}]
    # the second turn is rendered with the first in it (the training template over the whole conversation)
    assert "Say apple." in session.prompt_text("Again?") and answer in session.prompt_text("Again?")
    # greedy streaming gives what non-streamed greedy generation gives for the same rendered prompt
    assert answer == generate_texts(loaded, ["Say apple."], max_new_tokens=5)[0]
    session.reset()
    assert session.history == []


def test_ctrl_c_while_streaming_stops_the_reply_and_joins_the_generator(loaded) -> None:
    session = ChatSession(loaded, max_new_tokens=500, temperature=0)
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            raise KeyboardInterrupt  # what SIGINT raises in the main thread while it reads the stream

    before = threading.active_count()
    answer = session.reply("Tell me a story.", on_text=on_text)
    assert session.last_interrupted and answer == "".join(pieces).strip()
    assert threading.active_count() == before  # the generating thread ended: nothing left inside torch
    assert session.history[-1] == {"role": "assistant", "content": answer}  # what was shown stays in the history
    session.max_new_tokens = 2
    session.reply("Hi")
    assert not session.last_interrupted


def test_chat_loop_commands(lora_run: Path) -> None:
    lines = iter(["Say apple.", "/reset", "Say river.", "/exit", "never read"])
    out = io.StringIO()
    session = chat_loop(lora_run, max_new_tokens=3, temperature=0, system="Be brief.",
                        input_fn=lambda _prompt: next(lines), out=out)
    text = out.getvalue()
    assert text.count("bot> ") == 2 and "(history cleared)" in text
    assert [m["role"] for m in session.history] == ["system", "user", "assistant"]
    assert session.history[1]["content"] == "Say river."


def test_pipeline_generates_with_the_adapter(lora_run: Path, loaded) -> None:
    import loraforge

    pipe = loraforge.pipeline(lora_run, device="cpu", dtype="float32")
    text = loaded.formatter("Say apple.")
    out = pipe(text, max_new_tokens=5, do_sample=False, return_full_text=False)
    assert out[0]["generated_text"].strip() == generate_texts(loaded, ["Say apple."], max_new_tokens=5)[0]


def test_generate_beam_search_is_as_wide_as_the_runs_eval_num_beams(loaded, monkeypatch) -> None:
    import dataclasses

    from loraforge.infer import generate

    seen = []
    monkeypatch.setattr(generate, "generate_batch", lambda model, tok, prompts, decoding, **kw: seen.append(decoding))
    run = dataclasses.replace(loaded.run, eval=dataclasses.replace(loaded.run.eval, num_beams=2))
    generate_texts(dataclasses.replace(loaded, run=run), ["Hi"], decoding="beam")
    generate_texts(dataclasses.replace(loaded, run=None), ["Hi"], decoding="beam")
    assert [d.num_beams for d in seen] == [2, 4]
