"""Long-context mode (train/long_context.py): the switches, the chunked loss without the fast path, the
attention-mask hook, and all of them together against plain training."""

import torch

from loraforge.config import RunConfig, TrainingConfig, load_config
from loraforge.train.long_context import _drop_full_mask_hook, apply_long_context


def test_switches_and_config(tmp_path):
    run = load_config(None, ["training.long_context=true"])
    assert run.training.long_context_switches() == {"offload_activations": True, "chunked_cross_entropy": True,
                                                   "drop_full_attention_mask": True}
    run = load_config(None, ["training.long_context=true", "training.offload_activations=false"])
    assert run.training.long_context_switches()["offload_activations"] is False
    run = load_config(None, ["training.chunked_cross_entropy=true"])
    sw = run.training.long_context_switches()
    assert sw["chunked_cross_entropy"] and not sw["offload_activations"]
    assert not any(RunConfig().training.long_context_switches().values())
    # a run on one GPU offloads its checkpoints unless told not to; nothing else of long context turns on
    assert RunConfig().training.long_context_switches(one_gpu=True) == {
        "offload_activations": True, "chunked_cross_entropy": False, "drop_full_attention_mask": False}
    run = load_config(None, ["training.offload_activations=false"])
    assert not run.training.long_context_switches(one_gpu=True)["offload_activations"]


def _peft(model_dir, dtype=torch.float64):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    for p in m.parameters():
        p.requires_grad_(False)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                     target_modules=["q_proj", "v_proj", "up_proj"]))
    m.train()
    return m


def _grads(m, batch):
    loss = m(**batch).loss
    loss.backward()
    g = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad(set_to_none=True)
    return loss.detach(), g


def test_long_context_mode_equals_plain_training_on_cpu(tiny_model_dir, monkeypatch):
    """Chunked CE (small chunks), offload and the mask hook together: same loss and grads in float64."""
    import loraforge.kernels.cross_entropy as ce

    ref = _peft(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ref.config.vocab_size, (1, 40), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    # reference: full float64 logits and a float64 CE (transformers' own loss casts logits to fp32)
    logits = ref(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    l_ref = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    l_ref.backward()
    g_ref = {n: p.grad.clone() for n, p in ref.named_parameters() if p.requires_grad}
    m = _peft(tiny_model_dir)
    logs = []
    out = apply_long_context(m, TrainingConfig(long_context=True, gradient_checkpointing=True), log=logs.append,
                             force_copy=True, min_bytes=0)
    assert out == {"offload_activations": True, "chunked_cross_entropy": True, "drop_full_attention_mask": True}
    # 8 rows per chunk: several chunks for 40 tokens
    monkeypatch.setitem(ce.causal_lm_loss.__kwdefaults__, "chunk_bytes", 8 * m.config.vocab_size * 4)
    monkeypatch.setitem(ce.causal_lm_loss.__kwdefaults__, "min_rows", 1)
    seen = {}
    orig = ce.LinearCrossEntropy.apply
    monkeypatch.setattr(ce.LinearCrossEntropy, "apply", lambda *a: seen.setdefault("rows", a[4]) and orig(*a))
    l_lc, g_lc = _grads(m, batch)
    assert seen["rows"] == 8
    assert torch.allclose(l_lc, l_ref.detach(), rtol=1e-12, atol=0)
    for n in g_ref:
        assert torch.allclose(g_lc[n], g_ref[n], rtol=1e-8, atol=1e-12), n
    assert m.base_model.model._loraforge_mask_hook is not None
    # the model's own loss is back when grad is off (evaluation wants logits)
    with torch.no_grad():
        assert m(**batch).logits is not None


def test_mask_hook_drops_only_all_ones_masks():
    ones = torch.ones(1, 9, dtype=torch.long)
    _, kw = _drop_full_mask_hook(None, (), {"attention_mask": ones})
    assert kw["attention_mask"] is None
    padded = ones.clone()
    padded[0, -2:] = 0
    assert _drop_full_mask_hook(None, (), {"attention_mask": padded}) is None
    assert _drop_full_mask_hook(None, (), {"attention_mask": None}) is None


def test_a_run_on_one_gpu_offloads_by_default_within_half_the_host_memory(tiny_model_dir, monkeypatch):
    """The default (offload_activations: null) on one CUDA GPU, with the device check stood in for on the CPU."""
    import loraforge.train.long_context as lc

    monkeypatch.setattr(lc, "_on_cuda", lambda model: True)
    logs = []
    m = _peft(tiny_model_dir)
    out = apply_long_context(m, TrainingConfig(gradient_checkpointing=True), log=logs.append)
    assert out == {"offload_activations": True} and len(logs) == 1 and "pinned host memory" in logs[0]
    off = m._loraforge_offloader
    assert 0 < off._host_limit <= 0.5 * lc.psutil.virtual_memory().total
    for training, processes in ((TrainingConfig(gradient_checkpointing=True, offload_activations=False), 1),
                                (TrainingConfig(gradient_checkpointing=True), 2),  # DDP: not by default
                                (TrainingConfig(gradient_checkpointing=False), 1)):
        m, logs = _peft(tiny_model_dir), []
        assert apply_long_context(m, training, log=logs.append, processes=processes) == {}
        assert getattr(m, "_loraforge_offloader", None) is None and not logs
