"""The patched model computes what the stock peft model computes (CPU, bitsandbytes 4-bit, tiny Llama).

On the CPU the fast path is the same math in PyTorch (no Triton): this checks the patching itself
(which modules, which parameters, the loss semantics) without a GPU. tests/gpu checks it on CUDA.
"""

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from tinymodels import lm_batch  # noqa: E402

from loraforge.bench.models import build_model, compare, lora_params, make_checkpoint, sync_lora  # noqa: E402
from loraforge.kernels import is_supported, patch_model  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("tiny", root=str(tmp_path_factory.mktemp("ckpt")), device="cpu")


def _batch(vocab, pad=False):
    return lm_batch(vocab, 2, 24, pad_from=18 if pad else None, unlabeled_prefix=5 if pad else 0)


@pytest.mark.parametrize("r,targets,pad", [(8, "all", False), (4, "qv", True)])
def test_patched_matches_stock_on_cpu(ckpt, r, targets, pad):
    stock = build_model(ckpt, r, targets, stock=True, device="cpu")
    fast = build_model(ckpt, r, targets, stock=False, device="cpu")
    assert is_supported(fast)[0] is False  # CPU is not a fast-path device...
    summary = patch_model(fast, allow_cpu=True)  # ...but the math runs there for this test
    assert summary["patched"] and summary["attention"] == 2 and summary["mlp"] == 2
    assert summary["norms"] == 5 and summary["cross_entropy"] and not summary["skipped"]
    sync_lora(stock, fast)
    res = compare(stock, fast, _batch(stock.config.vocab_size, pad))
    assert res["loss_rel_diff"] < 1e-2, res
    assert res["max_rel_grad_diff"] < 5e-2, res
    # the LoRA parameters are still peft's own
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in lora_params(fast))


def test_unsupported_models_fall_back(ckpt):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj"],
                                     task_type="CAUSAL_LM"))
    s = patch_model(m)  # on the CPU without allow_cpu: refused, with the setting that would help
    assert not s["patched"] and "cpu" in s["reason"] and "model.device" in s["hint"]
    s = patch_model(m, allow_cpu=True)  # LoRA dropout runs inside the fused nodes (test_dropout_cpu.py)
    assert s["patched"] and s["lora_dropout"] == 0.1
    m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True,
                                     target_modules=["q_proj"], task_type="CAUSAL_LM"))
    s = patch_model(m, allow_cpu=True)  # DoRA without dropout: on the fast path (test_patch_models_cpu.py)
    assert s["patched"] and s["dora"]
