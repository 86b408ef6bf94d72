"""Merged export: stock transformers loads it and it reproduces base+adapter; the adapter stays stock-peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gguf_files import read_gguf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraforge import progress
from loraforge.errors import ConfigError, ModelLoadError
from loraforge.infer import merge as merge_module
from loraforge.infer.load import load
from loraforge.infer.merge import MergeResult, merge_adapter

PROMPT = "<|im_start|>user\nSay apple.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def merge_run(lora_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[MergeResult, list[progress.Task]]:
    """The merge, and the progress passes it reported."""
    with progress.recorded() as bars:
        result = merge_adapter(lora_run, tmp_path_factory.mktemp("merge") / "merged", dtype="float32", gguf=True,
                               device="cpu")
    return result, bars


@pytest.fixture(scope="module")
def merge_result(merge_run: tuple[MergeResult, list[progress.Task]]) -> MergeResult:
    return merge_run[0]


@pytest.fixture(scope="module")
def merged(merge_result: MergeResult) -> Path:
    return merge_result.path


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


# long: a full f16 GGUF write and reload through transformers (~16 s); test_gguf_export.py checks the
# written metadata and tensors in make test
@pytest.mark.long
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


def test_merge_checks_the_merged_folder_against_base_plus_adapter(merge_result: MergeResult) -> None:
    parity = merge_result.parity
    assert parity is not None and parity.ok, parity
    assert parity.identical == parity.prompts == 3
    assert parity.max_logit_diff <= 1e-3  # float32: exact up to summation order
    assert "passed" in parity.line() and "3/3" in parity.line()
    record = json.loads((merge_result.path / "loraforge_merge.json").read_text())
    assert record["parity"]["ok"] is True and record["gguf"] == "model-f32.gguf"


def test_merge_parity_check_and_gguf_export_each_report_progress_to_their_total(
        merge_run: tuple[MergeResult, list[progress.Task]], lora_run: Path) -> None:
    result, bars = merge_run
    counts = {b.description: (b.done, b.total) for b in bars}
    lora_layers = sum(1 for k in load_file(str(lora_run / "adapter" / "adapter_model.safetensors")) if "lora_A" in k)
    written = sum(1 for name in read_gguf(result.gguf_file)[1] if name != "rope_freqs.weight")
    assert counts == {"parity check: base + adapter": (3, 3), "merging the adapter": (lora_layers, lora_layers),
                      "parity check: merged model": (3, 3), "writing model-f32.gguf": (written, written)}


def test_a_failed_parity_check_writes_nothing(lora_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = merge_module.make_portable

    def lose_the_rope_base(folder: Path) -> None:  # what transformers 4.x did with a 5.x folder
        real(folder)
        config = json.loads((folder / "config.json").read_text())
        config["rope_theta"] = config["rope_parameters"]["rope_theta"] = 10.0
        (folder / "config.json").write_text(json.dumps(config))

    monkeypatch.setattr(merge_module, "make_portable", lose_the_rope_base)
    with pytest.raises(ModelLoadError, match="does not answer like base \\+ adapter.*--no-check"):
        merge_adapter(lora_run, tmp_path / "out", dtype="float32", device="cpu")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


def test_no_check_and_q8_0(lora_run: Path, tmp_path: Path) -> None:
    import gguf

    result = merge_adapter(lora_run, tmp_path / "q8", dtype="float32", quant="q8_0", check=False, device="cpu")
    assert result.parity is None
    assert result.gguf_file == tmp_path / "q8" / "model-q8_0.gguf"
    assert sorted(p.name for p in result.path.glob("*.gguf")) == ["model-q8_0.gguf"]
    meta, tensors = read_gguf(result.gguf_file)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert meta["general.name"] == lora_run.name  # the run's name, not a temporary folder's
    types = {name: t.type for name, t in tensors.items()}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == types["rope_freqs.weight"] == gguf.GGMLQuantizationType.F32


def test_q4_k_m_without_llama_quantize_is_a_clear_error(lora_run: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-quantize anywhere
    with pytest.raises(ConfigError, match="llama-quantize is not on PATH.*--quant q8_0") as err:
        merge_adapter(lora_run, tmp_path / "q4", quant="q4_k_m", device="cpu")
    assert err.value.exit_code == 2
    assert not (tmp_path / "q4").exists()
    with pytest.raises(ConfigError, match="q8_0, q4_k_m"):
        merge_adapter(lora_run, tmp_path / "q3", quant="q3_k_s", device="cpu")


def test_merged_folder_reads_the_same_in_transformers_4_and_5(merged: Path) -> None:
    """The files say the RoPE base and the tokenizer class in words both majors read (see make_portable);
    tests/infer/test_merge_transformers4.py loads them in a real 4.57."""
    config = json.loads((merged / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 500000.0
    assert config["rope_scaling"]["rope_type"] == "llama3" and "rope_theta" not in config["rope_scaling"]
    assert config["torch_dtype"] == config["dtype"] == "float32"
    tok = json.loads((merged / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok["chat_template"] == (merged / "chat_template.jinja").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(merged).config
    assert reloaded.rope_parameters["rope_theta"] == 500000.0 and reloaded.rope_parameters["rope_type"] == "llama3"


def test_a_run_adapter_names_its_base_and_has_a_card(lora_run: Path, tiny_model_dir: Path) -> None:
    saved = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tiny_model_dir)  # the model_name the run was given
    card = (lora_run / "adapter" / "README.md").read_text()
    assert "# LoRA adapter" in card and f"`{tiny_model_dir}`" in card
    assert "More Information Needed" not in card  # peft's template card is replaced
