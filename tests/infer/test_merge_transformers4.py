"""The merged folder reads the same under transformers 4.57 as under 5.x: same tokens, same logits.

transformers 4.x does not know 5.x's `rope_parameters` (it would fall back to RoPE base 10000) nor the
`TokenizersBackend` class; merge writes what both read (infer/merge.make_portable). 4.57 runs in its own
virtual environment: $LORAFORGE_TF4_VENV, else /work/venvs/tf4, made on first use (torch from pip, then
transformers==4.57.*); the test is skipped, saying why, where it cannot be made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraforge.infer.merge import merge_adapter

VENV = Path(os.environ.get("LORAFORGE_TF4_VENV", "/work/venvs/tf4"))
PROMPTS = ["Say apple.", "What is 2 + 3?", "Name a colour."]

# Run by 4.57's python: the same loading and forward pass as `logits_here`, results as JSON.
SCRIPT = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
out = {"version": transformers.__version__, "tokenizer": type(tok).__name__,
       "rope_theta": model.config.rope_theta, "rows": []}
for p in prompts:
    ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(ids).logits[0]
    out["rows"].append({"ids": ids[0].tolist(), "logits": logits.tolist()})
print(json.dumps(out))
"""


def tf4_python() -> Path:
    python = VENV / "bin" / "python"
    if python.is_file():
        return python
    steps = [[sys.executable, "-m", "venv", str(VENV)],
             [str(python), "-m", "pip", "install", "-q", "torch==2.13.0"],
             [str(python), "-m", "pip", "install", "-q", "transformers==4.57.*"]]
    for cmd in steps:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot make a transformers 4.57 environment in {VENV}: {' '.join(cmd)}: {e}")
        if proc.returncode != 0:
            pytest.skip(f"cannot make a transformers 4.57 environment in {VENV}: {' '.join(cmd)} exited "
                        f"{proc.returncode}: {proc.stderr.strip()[-300:]}")
    return python


def logits_here(folder: Path) -> list[dict]:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = []
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            rows.append({"ids": ids[0].tolist(), "logits": model(ids).logits[0]})
    return rows


# A second Python with its own torch and transformers: ~20 s to start and load, minutes to build once.
@pytest.mark.long
def test_merged_folder_gives_the_same_tokens_and_logits_in_transformers_4(lora_run: Path, tmp_path: Path) -> None:
    python = tf4_python()
    merged = merge_adapter(lora_run, tmp_path / "merged", dtype="float32", device="cpu", check=False).path
    proc = subprocess.run([str(python), "-c", SCRIPT, str(merged), json.dumps(PROMPTS)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    assert there["version"].startswith("4.57.")
    assert there["rope_theta"] == 500000.0  # not 4.x's default 10000
    assert there["tokenizer"] == "PreTrainedTokenizerFast"
    for mine, theirs in zip(logits_here(merged), there["rows"], strict=True):
        assert mine["ids"] == theirs["ids"]  # same chat template, same tokens
        other = torch.tensor(theirs["logits"])
        assert torch.equal(mine["logits"].argmax(-1), other.argmax(-1))
        torch.testing.assert_close(mine["logits"], other, atol=1e-4, rtol=1e-4)
