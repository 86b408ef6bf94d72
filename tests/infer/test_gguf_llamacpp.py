"""llama.cpp runs the exported GGUF like loraforge runs the merged folder: same prompt tokens, same greedy tokens.

llama-cpp-python is not a loraforge dependency (it builds llama.cpp from source, ~20 min on 2 cores), so it
runs in whichever Python has it: $LORAFORGE_LLAMACPP_PYTHON, else /work/venvs/llamacpp/bin/python, else
this one; the test is skipped where none does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraforge.infer.merge import merge_adapter
from loraforge.model.card import name_base

NEW_TOKENS = 32
CHATS = [[{"role": "user", "content": "Say hello in one short sentence."}],
         [{"role": "system", "content": "You answer with numbers."}, {"role": "user", "content": "What is 12 + 30?"}],
         [{"role": "user", "content": "Name three colours, please."}]]

# Run by the Python that has llama_cpp: tokenize (special tokens parsed, as chat prompts need), then argmax.
WORKER = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False)
rows = []
for text in prompts:
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    tokens = []
    for _ in range(n):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(tokens[-1:])
    rows.append({"ids": ids, "tokens": tokens})
print(json.dumps(rows))
"""


def llamacpp_python() -> str:
    candidates = [os.environ.get("LORAFORGE_LLAMACPP_PYTHON"), "/work/venvs/llamacpp/bin/python", sys.executable]
    for python in filter(None, candidates):
        if Path(python).is_file() and subprocess.run([python, "-c", "import llama_cpp"],
                                                     capture_output=True).returncode == 0:
            return python
    pytest.skip("llama-cpp-python is not installed in $LORAFORGE_LLAMACPP_PYTHON, /work/venvs/llamacpp or here")


def greedy(model, ids: list[int]) -> tuple[list[int], list[float]]:
    """Argmax tokens (no stop at EOS, like the worker) and the top-two margin of each choice."""
    seq, tokens, margins = torch.tensor([ids]), [], []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            top2 = model(seq).logits[0, -1].topk(2)
            tokens.append(int(top2.indices[0]))
            margins.append(float(top2.values[0] - top2.values[1]))
            seq = torch.cat([seq, top2.indices[:1].view(1, 1)], dim=1)
    return tokens, margins


# The embedded 135M model merged in float32 and written as a 540 MB GGUF, then 3 x 32 tokens on both sides.
@pytest.mark.long
def test_llama_cpp_decodes_like_loraforge(embedded_model_dir: Path, tmp_path: Path) -> None:
    python = llamacpp_python()
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32)
    adapter = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)
    for name, p in adapter.named_parameters():
        if "lora_B" in name:  # a visible adapter (zero B would merge to the base itself)
            p.data = torch.randn(p.shape, generator=gen) * 0.01
    adapter.save_pretrained(tmp_path / "adapter")
    name_base(tmp_path / "adapter", "smollm2-135m-instruct")
    result = merge_adapter(tmp_path / "adapter", tmp_path / "merged", dtype="float32", gguf=True, device="cpu")
    assert result.parity is not None and result.parity.ok, result.parity

    tok = AutoTokenizer.from_pretrained(result.path)
    model = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32).eval()
    prompts = [tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in CHATS]
    proc = subprocess.run([python, "-c", WORKER, str(result.gguf_file), json.dumps(prompts), str(NEW_TOKENS)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    for prompt, row in zip(prompts, theirs, strict=True):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert row["ids"] == ids, prompt  # chat markers kept whole: CONTROL tokens, the smollm pre-tokenizer
        tokens, margins = greedy(model, ids)
        if row["tokens"] != tokens:
            k = next(i for i, (a, b) in enumerate(zip(row["tokens"], tokens, strict=True)) if a != b)
            # float32 on both sides: only a tie to within summation order may go either way.
            assert margins[k] < 1e-3, (prompt, k, row["tokens"], tokens)
