"""The server renders a prompt token for token as training did, and a reply ends at the trained end of turn.

Real run folders (one chat run with a system prompt, one Alpaca run) are trained for a step; the training
side is the trainer's own tokenized example, the serving side the Engine loaded from the run folder
(its adapter's formatter and `encode`, what the OpenAI routes call).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.config import DataConfig, EvalConfig, LoRAConfig, ModelConfig, TrainingConfig
from loraforge.serve.engine import Engine, Request
from loraforge.train.trainer import LLAMATrainer

CHAT = {"messages": [{"role": "user", "content": "Say apple."}, {"role": "assistant", "content": "apple apple."}]}
ALPACA = {"instruction": "Repeat the word river.", "input": "", "output": "river river"}
SYSTEM = "You answer in two words."


def _run(tmp: Path, name: str, record: dict, model_dir: Path, **data) -> tuple[Path, dict[str, list[int]]]:
    """Train one step on copies of `record`; the run folder and the trainer's tokenized example."""
    file = tmp / f"{name}.jsonl"
    file.write_text("".join(json.dumps(record) + "\n" for _ in range(8)))
    trainer = LLAMATrainer(ModelConfig(model_name=str(model_dir), use_4bit=False, device="cpu"),
                           LoRAConfig(r=4, target_modules="all-linear"),
                           DataConfig(dataset=str(file), max_length=96, validation_split=0.0, **data),
                           TrainingConfig(output_dir=str(tmp / name), max_steps=1, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=1, logging_steps=1, save_steps=0),
                           EvalConfig(num_generation_samples=0), log=lambda m: None)
    trainer.train()
    return tmp / name, dict(trainer.data.train[0])


def _prompt_and_end(example: dict[str, list[int]]) -> tuple[list[int], list[int], int]:
    """Training's prompt (tokens before the first label), the labelled reply, and its last token."""
    labels = example["labels"]
    first = next(i for i, v in enumerate(labels) if v != -100)
    last = max(i for i, v in enumerate(labels) if v != -100)
    return example["input_ids"][:first], example["input_ids"][first:last + 1], example["input_ids"][last]


def _reply(engine: Engine, tokens: list[int]) -> tuple[str, str]:
    """The text the engine sends for `tokens` generated one by one, and why it finished."""
    req = Request(adapter="x", input_ids=[1], max_tokens=10**6)
    req.loop, req.events, req.outbox = object(), object(), []  # with an outbox, post() only collects events
    for tok in tokens:
        if req.finish_reason is not None:
            break
        engine._advance(req, tok)
    if req.finish_reason is None:
        engine._finish(req, "length")
    return "".join(e[1] for _, e in req.outbox if e[0] == "text"), req.finish_reason


# Long: two 1-step training runs and two engine loads (~20-40 s on 2 shared cores).
@pytest.mark.long
@pytest.mark.parametrize("kind", ["chat", "alpaca"])
def test_served_prompt_equals_training_and_the_reply_stops_at_the_trained_end(kind, tmp_path, tiny_model_dir):
    record = CHAT if kind == "chat" else ALPACA
    data = {"system_prompt": SYSTEM} if kind == "chat" else {}
    run, example = _run(tmp_path, kind, record, tiny_model_dir, **data)
    prompt, reply, end = _prompt_and_end(example)

    engine = Engine([run], device="cpu", fast_decode=False)
    try:
        (adapter,) = engine.adapters.values()
        assert adapter.data_kind == kind
        # what /v1/chat/completions renders: the conversation before the reply, system prompt added by the run
        served = engine.encode(adapter.formatter(record["messages"][:1] if kind == "chat" else ALPACA["instruction"]))
        assert served == prompt, (engine.tokenizer.decode(served), engine.tokenizer.decode(prompt))
        # The trained reply ends with the end-of-turn token (<|im_end|> for this chat template, EOS for Alpaca),
        # which is one of the server's stop tokens: the reply stops there, and what follows is never sent.
        assert end in engine.eos_ids
        text, why = _reply(engine, reply + engine.encode(" more words after the end")[1:])
        want = record["messages"][1]["content"] if kind == "chat" else ALPACA["output"]
        assert why == "stop" and text.strip() == want
    finally:
        engine.close()
