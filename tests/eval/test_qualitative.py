from __future__ import annotations

import pytest
from eval_components import PAIRS, alpaca, build_llama, build_tokenizer

from loraforge.eval import QualitativeEvaluator, bleu

GREEDY = {"do_sample": False, "num_beams": 1}
# Prompts of different lengths, so the batch really needs padding.
PROMPTS = ["Say hello.", "What is the capital of France?", "Where did the cat sit on the mat?", "LoRA"]


def test_prompt_formatting_order(tokenizer):
    model = build_llama(len(tokenizer))
    assert QualitativeEvaluator(model, tokenizer, template=alpaca).format_prompt("Hi") == alpaca("Hi")
    assert QualitativeEvaluator(model, tokenizer).format_prompt("Hi") == "<s>user: Hi\nassistant:"
    no_chat = build_tokenizer(chat_template=None)
    assert QualitativeEvaluator(model, no_chat).format_prompt("Hi") == "Hi"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert QualitativeEvaluator(model, tokenizer, template=alpaca).format_prompt(messages) == (
        "<s>system: Be brief.\nuser: Hi\nassistant:")
    with pytest.raises(ValueError, match="chat template"):
        QualitativeEvaluator(model, no_chat).format_prompt(messages)


def test_no_double_bos_when_the_chat_template_writes_it(tokenizer):
    evaluator = QualitativeEvaluator(build_llama(len(tokenizer)), tokenizer)
    ids = evaluator.encode_prompt("Hi")
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id


def test_batched_left_padded_greedy_equals_one_by_one(tokenizer):
    evaluator = QualitativeEvaluator(build_llama(len(tokenizer)), tokenizer)
    one_by_one = [evaluator.generate_response(p, max_length=12, **GREEDY) for p in PROMPTS]
    batched = evaluator.generate_batch(PROMPTS, max_length=12, batch_size=len(PROMPTS), **GREEDY)
    assert batched == one_by_one
    assert all(batched) and len(set(batched)) > 1  # real, distinct continuations, not all empty
    assert tokenizer.padding_side == "right"  # restored for the data pipeline


def test_only_new_tokens_are_returned_and_bounded(tokenizer):
    evaluator = QualitativeEvaluator(build_llama(len(tokenizer)), tokenizer, template=alpaca)
    answers = evaluator.generate_batch(PROMPTS, max_length=3, **GREEDY)
    for answer in answers:
        assert "Instruction" not in answer and "Response" not in answer
        assert 0 < len(tokenizer(answer, add_special_tokens=False)["input_ids"]) <= 3


def test_default_beam_search_and_sampling_run(tokenizer):
    evaluator = QualitativeEvaluator(build_llama(len(tokenizer)), tokenizer)
    beam = evaluator.generate_response("Say hello.", max_length=6)  # spec defaults: 4 beams, no sampling
    assert isinstance(beam, str)
    sampled = evaluator.generate_batch(PROMPTS[:2], max_length=6, do_sample=True, num_beams=1)
    assert len(sampled) == 2
    with pytest.raises(ValueError, match="temperature"):
        evaluator.generate_response("Hi", do_sample=True, temperature=0.0)


def test_tokenizer_without_pad_token_uses_eos_and_is_restored():
    tokenizer = build_tokenizer(pad=False)
    evaluator = QualitativeEvaluator(build_llama(len(tokenizer)), tokenizer)
    with_pad = QualitativeEvaluator(build_llama(len(tokenizer)), build_tokenizer())
    assert evaluator.generate_batch(PROMPTS, max_length=8, **GREEDY) == with_pad.generate_batch(
        PROMPTS, max_length=8, **GREEDY)
    assert tokenizer.pad_token is None


def test_evaluate_scores_generations_against_references(tokenizer):
    evaluator = QualitativeEvaluator(build_llama(len(tokenizer)), tokenizer, template=alpaca)
    prompts, references = [p for p, _ in PAIRS], [a for _, a in PAIRS]
    result = evaluator.evaluate(prompts, references, max_length=8, **GREEDY)
    assert len(result["generations"]) == len(PAIRS)
    assert result["bleu"] == pytest.approx(bleu(references, result["generations"]))
    assert set(result) >= {"bleu", "rouge1", "rouge2", "rougeL", "exact_match"}
    with pytest.raises(ValueError, match="5 prompt.*4 reference"):
        evaluator.evaluate(prompts, references[:4])
