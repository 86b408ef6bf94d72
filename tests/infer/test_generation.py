"""The one mapping from decoding settings to `generate` keyword arguments, and the stop/pad token rule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from loraforge.config import EvalConfig
from loraforge.errors import DataError
from loraforge.infer.generation import Decoding, generate_kwargs, pad_id, stop_ids


def test_beam_width_is_eval_config_num_beams_everywhere() -> None:
    assert Decoding.named("beam").num_beams == EvalConfig().num_beams
    assert Decoding.from_eval(EvalConfig(decoding="beam", num_beams=2)).as_kwargs()["num_beams"] == 2
    assert Decoding.from_eval(EvalConfig(decoding="greedy", num_beams=6)).num_beams == 1
    assert Decoding.named("sample", num_beams=6).num_beams == 1
    with pytest.raises(DataError, match="greedy, beam or sample"):
        Decoding.named("nucleus")


def test_sampling_is_temperature_and_top_p_only_and_greedy_clears_them() -> None:
    sample = Decoding.from_eval(EvalConfig(decoding="sample", temperature=0.5, top_p=0.8, max_new_tokens=7))
    assert sample.as_kwargs() == {"max_new_tokens": 7, "num_beams": 1, "do_sample": True, "temperature": 0.5,
                                  "top_p": 0.8, "top_k": 0}
    greedy = Decoding.from_temperature(0.0, 1.0, 5).as_kwargs()
    assert greedy["do_sample"] is False and greedy["temperature"] is greedy["top_k"] is None
    assert Decoding.from_temperature(0.7, 0.9, 5).do_sample
    assert Decoding.from_eval(EvalConfig(repetition_penalty=1.2)).as_kwargs()["repetition_penalty"] == 1.2
    assert not Decoding.from_eval(EvalConfig(repetition_penalty=1.2, decoding="greedy")).fast_ok
    with pytest.raises(ValueError, match="temperature"):
        Decoding(do_sample=True, temperature=0.0)


def test_stop_tokens_are_the_models_and_the_tokenizers_eos() -> None:
    tok = SimpleNamespace(eos_token_id=2, pad_token_id=None)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 9]))
    assert stop_ids(model, tok) == {2, 7, 9}
    assert pad_id(tok, {2, 7, 9}) == 2  # no pad token: the tokenizer's EOS
    kwargs = generate_kwargs(model, tok, Decoding())
    assert kwargs["eos_token_id"] == [2, 7, 9] and kwargs["pad_token_id"] == 2
    bare = SimpleNamespace(eos_token_id=None, pad_token_id=None)
    assert stop_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None)), bare) == set()
    with pytest.raises(ValueError, match="neither a pad nor an EOS"):
        pad_id(bare, set())
