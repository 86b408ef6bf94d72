"""Does llama.cpp run loraforge's GGUF export as loraforge runs the merged folder? Prints one JSON record.

The embedded SmolLM2-135M-Instruct gets a fresh LoRA adapter (r=8, all linear layers, B drawn at random so the
merge changes the model), `merge_adapter` merges it in float32 and writes model-f32.gguf, and then:
- loraforge loads the merged folder (`infer.load.load`), formats each chat prompt as it would, encodes it
  (`generation.encode`) and decodes greedily (`generation.generate_batch` for the text, the same
  `generate_kwargs` for the token ids);
- llama.cpp (llama-cpp-python, run by a Python that has it: it is no loraforge dependency, and it needs no
  torch) tokenizes the same prompt text from the GGUF's own tokenizer metadata, and takes the argmax token
  32 times, stopping at the EOS its metadata names.
The prompt ids must be equal (that checks the tokenizer metadata: vocabulary, merges, pre-tokenizer, special
tokens, BOS) and so must the answers. Where they part, the record says at which token and how far apart
loraforge's top two logits were there: both sides compute in float32 (the KV cache too), so only a near tie
may go either way.

    python scripts/llamacpp_compare.py [--python /work/venvs/llamacpp/bin/python] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

NEW_TOKENS = 32
CHATS = [[{"role": "user", "content": "Say hello in one short sentence."}],
         [{"role": "system", "content": "You answer with numbers."}, {"role": "user", "content": "What is 12 + 30?"}],
         [{"role": "user", "content": "Name three colours, please."}]]
NEAR_TIE = 1e-2  # largest top-two logit margin that float32 on both sides may resolve differently
PYTHONS = ("/work/venvs/llamacpp/bin/python",)  # tried after $LORAFORGE_LLAMACPP_PYTHON, before this Python

# Run by the Python that has llama_cpp. The KV cache in f32 (GGML type 0; llama.cpp's default is f16), so that
# nothing on this side is rounded below float32. logits_all=True: without it llama-cpp-python 0.3.x leaves
# `scores` at zero after eval (every argmax is token 0); 512 positions × 49,152 floats is 100 MB.
WORKER = """
import json, sys
import numpy as np
import llama_cpp
path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0)
eos = llm.token_eos()
rows = []
for text in prompts:
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    llm.reset()
    llm.eval(ids)
    tokens = []
    while len(tokens) < n:
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if tokens[-1] == eos:
            break
        llm.eval(tokens[-1:])
    text_out = llm.detokenize([t for t in tokens if t != eos]).decode("utf-8", errors="replace")
    rows.append({"ids": ids, "tokens": tokens, "text": text_out.strip()})
print(json.dumps({"version": llama_cpp.__version__, "eos": eos, "rows": rows}))
"""


def llamacpp_python() -> str | None:
    """A Python interpreter that imports llama_cpp, or None."""
    for python in filter(None, [os.environ.get("LORAFORGE_LLAMACPP_PYTHON"), *PYTHONS, sys.executable]):
        if Path(python).is_file() and subprocess.run([python, "-c", "import llama_cpp"],
                                                     capture_output=True).returncode == 0:
            return python
    return None


def merged_demo_model(work: Path, adapter: Path | None = None) -> Any:
    """The embedded model with `adapter` (a trained run's, e.g. `make demo`'s runs/demo/adapter) or else a
    visible random LoRA adapter, merged in float32 with a GGUF file."""
    from loraforge.infer.merge import merge_adapter

    if adapter is not None:
        return merge_adapter(adapter, work / "merged", dtype="float32", gguf=True, device="cpu")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraforge.model.card import name_base
    from loraforge.model.embedded import resolve_embedded

    base = AutoModelForCausalLM.from_pretrained(resolve_embedded("smollm2-135m-instruct"), dtype=torch.float32)
    adapter = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)
    for name, p in adapter.named_parameters():
        if "lora_B" in name:  # zero B (peft's init) would merge to the base itself
            p.data = torch.randn(p.shape, generator=gen) * 0.01
    adapter.save_pretrained(work / "adapter")
    name_base(work / "adapter", "smollm2-135m-instruct")
    return merge_adapter(work / "adapter", work / "merged", dtype="float32", gguf=True, device="cpu")


def loraforge_answers(folder: Path) -> tuple[Any, Any, list[dict[str, Any]]]:
    """(model, tokenizer, per chat: formatted text, prompt ids, greedy tokens and text), loraforge's way."""
    from loraforge.infer.generation import Decoding, encode, generate_batch, generate_kwargs
    from loraforge.infer.load import load

    loaded = load(folder, quantize="none", device="cpu", dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    greedy = Decoding.named("greedy", max_new_tokens=NEW_TOKENS)
    rows = []
    for chat in CHATS:
        text = loaded.formatter(chat)
        ids = encode(tok, text)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 **generate_kwargs(model, tok, greedy))
        tokens = out[0, len(ids):].tolist()
        answer = generate_batch(model, tok, [ids], greedy, batch_size=1)[0]
        rows.append({"prompt": text, "ids": ids, "tokens": tokens, "text": answer})
    return model, tok, rows


def top_two_margin(model: Any, ids: list[int], prefix: list[int]) -> float:
    """loraforge's top-two logit margin for the token after `ids` + `prefix`."""
    with torch.no_grad():
        top2 = model(torch.tensor([ids + prefix])).logits[0, -1].float().topk(2).values
    return float(top2[0] - top2[1])


def compare(work: Path, python: str, adapter: Path | None = None) -> dict[str, Any]:
    """Merge, export, decode on both sides; the JSON record (see the module docstring)."""
    import transformers

    import loraforge

    result = merged_demo_model(work, adapter)
    model, tok, ours = loraforge_answers(result.path)
    proc = subprocess.run([python, "-c", WORKER, str(result.gguf_file), json.dumps([r["prompt"] for r in ours]),
                           str(NEW_TOKENS)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"the llama.cpp side failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    prompts = []
    for mine, other in zip(ours, theirs["rows"], strict=True):
        # loraforge stops after a stop token, llama.cpp after its EOS: both lists end with it when it came.
        row = {"prompt": mine["prompt"], "ids_equal": mine["ids"] == other["ids"],
               "loraforge": {"ids": mine["ids"], "tokens": mine["tokens"], "text": mine["text"]},
               "llama_cpp": {"ids": other["ids"], "tokens": other["tokens"], "text": other["text"]},
               "equal": mine["tokens"] == other["tokens"] and mine["text"] == other["text"]}
        if not row["equal"] and row["ids_equal"]:
            pairs = zip(mine["tokens"], other["tokens"], strict=False)  # one may stop earlier
            k = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(mine["tokens"]), len(other["tokens"])))
            margin = top_two_margin(model, mine["ids"], mine["tokens"][:k])
            row["first_difference"] = {"token": k, "loraforge_top_two_margin": margin, "near_tie": margin <= NEAR_TIE}
        prompts.append(row)
    what = f"adapter {adapter}" if adapter else "random LoRA r=8 all-linear"
    return {"model": f"smollm2-135m-instruct (embedded) + {what}, merged in float32",
            "gguf": result.gguf_file.name, "new_tokens": NEW_TOKENS, "near_tie": NEAR_TIE,
            "eos_equal": theirs["eos"] == tok.eos_token_id, "parity": result.parity.line() if result.parity else None,
            "equal": all(r["equal"] for r in prompts) and theirs["eos"] == tok.eos_token_id,
            "versions": {"loraforge": loraforge.__version__, "llama_cpp_python": theirs["version"],
                         "torch": torch.__version__, "transformers": transformers.__version__},
            "prompts": prompts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", help="a Python with llama-cpp-python (default: the first one found)")
    parser.add_argument("--out", type=Path, help="also write the record to this file")
    parser.add_argument("--adapter", type=Path, help="a trained adapter folder (default: a random LoRA)")
    args = parser.parse_args(argv)
    python = args.python or llamacpp_python()
    if python is None:
        print("no Python with llama-cpp-python found: pass --python or set LORAFORGE_LLAMACPP_PYTHON",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="llamacpp-compare-") as work:
        record = compare(Path(work), python, args.adapter)
    text = json.dumps(record, indent=1, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0 if record["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
