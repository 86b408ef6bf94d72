"""Merged export: stock transformers loads it and it reproduces base+adapter; the adapter stays stock-peft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraforge.errors import ModelLoadError
from loraforge.infer.load import load
from loraforge.infer.merge import merge_adapter

PROMPT = "<|im_start|>user\nSay apple.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def merged(lora_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return merge_adapter(lora_run, tmp_path_factory.mktemp("merge") / "merged", dtype="float32", gguf=True,
                         device="cpu")


def greedy(model, ids: torch.Tensor, n: int = 12) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)[0, ids.shape[1]:]


def test_merged_folder_loads_in_stock_transformers_and_matches_base_plus_adapter(merged: Path, lora_run: Path,
                                                                                 tiny_model_dir: Path) -> None:
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (merged / name).is_file(), name
    stock = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.chat_template, "the merged folder must carry the chat template used in training"
    assert not any("lora" in k for k in stock.state_dict())

    adapted = load(lora_run, device="cpu", dtype="float32").model
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want, got, plain = (m(ids).logits for m in (adapted, stock, base))
    assert (want - plain).abs().max() > 1e-2, "the adapter must change the logits, or this test proves nothing"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(greedy(stock, ids), greedy(adapted, ids))
    assert not torch.equal(greedy(base, ids), greedy(adapted, ids))


def test_adapter_folder_loads_with_stock_peft(lora_run: Path, tiny_model_dir: Path) -> None:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    stock = PeftModel.from_pretrained(base, str(lora_run / "adapter")).eval()
    ours = load(lora_run, device="cpu", dtype="float32").model
    ids = torch.tensor([[1, 42, 17, 99, 5]])
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, ours(ids).logits)


def test_gguf_round_trips_through_gguf_reader_and_transformers(merged: Path) -> None:
    import gguf

    path = merged / "model-f32.gguf"
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.attn_q.weight",
            "blk.1.ffn_down.weight", "rope_freqs.weight"} <= names  # llama3 rope scaling travels as rope_freqs
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    assert int(reader.fields["llama.attention.head_count_kv"].parts[-1][0]) == 2
    tok = AutoTokenizer.from_pretrained(merged)
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == len(tok)
    # transformers' GGUF reader undoes the Q/K permutation: every weight must come back bit-exact.
    back = AutoModelForCausalLM.from_pretrained(merged, gguf_file=path.name, dtype=torch.float32).state_dict()
    ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).state_dict()
    assert set(back) == set(ref)
    for name, value in ref.items():
        assert torch.equal(back[name], value), name


def test_merge_refuses_a_non_empty_folder_and_a_plain_model(lora_run: Path, tiny_model_dir: Path,
                                                             tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(ModelLoadError, match="not empty"):
        merge_adapter(lora_run, tmp_path / "x")
    with pytest.raises(ModelLoadError, match="no adapter"):
        merge_adapter(tiny_model_dir, tmp_path / "y")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
