"""The lm-evaluation-harness bridge, offline: a local YAML task over a local JSONL, on a tiny random model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from loraforge.errors import ConfigError, LoraforgeError
from loraforge.eval import harness

DOCS = [{"context": "The sky is", "continuation": " blue"}, {"context": "Water is", "continuation": " wet"},
        {"context": "Fire is", "continuation": " hot"}, {"context": "Snow is", "continuation": " cold"}]
TASK = """task: lf_tiny_loglik
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
  - metric: acc
"""


def _adapter(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A LoRA adapter with random B (not peft's zero init), so fine-tuned and base score differently."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.mark.long  # imports lm-eval (~15 s) and evaluates two models: ~30 s on 2 cores
def test_local_task_on_base_and_adapter(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install 'loraforge[eval]'")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "lf_tiny_loglik.yaml").write_text(TASK.format(data=data))
    adapter = _adapter(tmp_path, tiny_model_dir)

    found = harness.run_harness(adapter, ["lf_tiny_loglik"], include_path=tasks, device="cpu", dtype="float32",
                                batch_size=2, out_dir=tmp_path / "out", log=lambda m: None)

    base, tuned = found["base"]["lf_tiny_loglik"], found["fine_tuned"]["lf_tiny_loglik"]
    assert {"perplexity,none", "acc,none"} <= set(base) and set(base) == set(tuned)
    assert base["perplexity,none"] > 1 and tuned["perplexity,none"] > 1
    assert base["perplexity,none"] != pytest.approx(tuned["perplexity,none"], rel=1e-6)  # the adapter was applied
    assert found["meta"]["adapter"] == str(adapter) and found["meta"]["base"] == str(tiny_model_dir)
    assert json.loads((tmp_path / "out" / "lm_eval_results.json").read_text())["base"] == found["base"]
    assert ("lf_tiny_loglik", "perplexity,none", base["perplexity,none"], tuned["perplexity,none"]) \
        in harness.table(found)
    with pytest.raises(ConfigError, match="no task"):
        harness.task_manager(["lf_tiny_loglik", "no_such_task_xyz"], tasks)


def test_missing_lm_eval_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(LoraforgeError, match=r"pip install 'loraforge\[eval\]'"):
        harness.run_harness(tmp_path, ["arc_easy"])


def test_a_folder_without_adapter_is_refused(tmp_path: Path, tiny_model_dir: Path):
    with pytest.raises(LoraforgeError, match="no adapter"):
        harness.locate_models(tiny_model_dir)
