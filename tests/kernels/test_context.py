"""Long-context mode: the switches, the chunked loss without the fast path, the
attention-mask hook, the search, and a CPU smoke run of `run_max_context_bench` on the tiny shape."""

import json

import pytest
import torch

from loraforge.config import RunConfig, load_config
from loraforge.kernels.context import Search, long_context_switches

torch.set_num_threads(1)


def test_switches_and_config(tmp_path):
    run = load_config(None, ["training.long_context=true"])
    assert long_context_switches(run.training) == {"offload_activations": True, "chunked_cross_entropy": True,
                                                   "drop_full_attention_mask": True}
    run = load_config(None, ["training.long_context=true", "training.offload_activations=false"])
    assert long_context_switches(run.training)["offload_activations"] is False
    run = load_config(None, ["training.chunked_cross_entropy=true"])
    sw = long_context_switches(run.training)
    assert sw["chunked_cross_entropy"] and not sw["offload_activations"]
    assert not any(long_context_switches(RunConfig().training).values())


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
    from types import SimpleNamespace

    import loraforge.kernels.cross_entropy as ce
    from loraforge.kernels.context import apply_long_context

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
    out = apply_long_context(m, SimpleNamespace(long_context=True, gradient_checkpointing=True), log=logs.append,
                             force_copy=True, min_bytes=0)
    assert out == {"offload_activations": True, "chunked_cross_entropy": True, "drop_full_attention_mask": True}
    # 8 rows per chunk: several chunks for 40 tokens
    monkeypatch.setitem(ce.causal_lm_loss.__kwdefaults__, "chunk_bytes", 8 * m.config.vocab_size * 4)
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
    from loraforge.kernels.context import _drop_full_mask_hook

    ones = torch.ones(1, 9, dtype=torch.long)
    _, kw = _drop_full_mask_hook(None, (), {"attention_mask": ones})
    assert kw["attention_mask"] is None
    padded = ones.clone()
    padded[0, -2:] = 0
    assert _drop_full_mask_hook(None, (), {"attention_mask": padded}) is None
    assert _drop_full_mask_hook(None, (), {"attention_mask": None}) is None


def test_search_matches_stock_maxctx():
    """Doubling from 4096, then bisection to 1,024 (midpoints on 512): the stock tool's sequence."""
    limit = 11800
    s = Search(4096, 262144, 1024)
    lengths = []
    while (n := s.next_length()) is not None:
        lengths.append(n)
        s.record(n, n <= limit)
    assert lengths == [4096, 8192, 16384, 12288, 10240, 11264]
    assert s.good == 11264 and s.bad == 12288
    s2 = Search.from_dict(json.loads(json.dumps(s.to_dict())))
    assert s2.next_length() is None and s2.good == 11264
    s = Search(65536, 300000, 1024)
    while (n := s.next_length()) is not None:
        s.record(n, n <= 250000)
    assert s.good <= 250000 < s.good + 1024 + 1 and s.bad <= 300000 * 2


def test_bench_cpu_smoke(tmp_path):
    """Both sides on the tiny shape on the CPU, lengths above 512 'out of memory' by simulation."""
    pytest.importorskip("bitsandbytes")
    from loraforge.kernels.context import run_max_context_bench

    row = run_max_context_bench(tmp_path / "out", "tiny", device="cpu", stock_start=32, loraforge_start=64,
                                resolution=32, simulate_limit=128, speed_steps=1, budget_s=300,
                                root=str(tmp_path / "ckpt"), log=lambda m: None)
    assert row["stock_max_context"] == 128 and row["loraforge_max_context"] == 128, row
    assert [t["len"] for t in row["stock_trials"]] == [32, 64, 128, 256]
    assert [t["len"] for t in row["loraforge_trials"]] == [64, 128, 256, 192, 160]
    assert row["loraforge_probe_max_context"] == 128 and row["complete"]
    assert row["stock_tokens_per_s"] > 0 and row["loraforge_tokens_per_s"] > 0
    assert row["tokens_per_s_at_length"] == 128
    files = list((tmp_path / "out").glob("context-*-cpu.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    for k in ("case", "device", "stock_max_context", "loraforge_max_context", "stock_tokens_per_s",
              "loraforge_tokens_per_s"):
        assert k in saved
    # a second call resumes from the state file and does no new work
    again = run_max_context_bench(tmp_path / "out", "tiny", device="cpu", root=str(tmp_path / "ckpt"),
                                  log=lambda m: None)
    assert again["loraforge_trials"] == row["loraforge_trials"]
    # the workers report their versions, and the stock side's memory at its maximum is broken down
    assert saved["versions"]["torch"] == torch.__version__
    mem = saved["stock_memory_at_max"]
    assert "measured_peak" in mem and mem["model_peak"] > 0 and mem["peak_phase"] in ("layer", "loss")
    # the report can be rebuilt from the state alone, to the same row
    from loraforge.kernels.context import rebuild_report

    files[0].unlink()
    path = rebuild_report(tmp_path / "out", "tiny", "cpu")
    rebuilt = json.loads(path.read_text())
    assert {k: v for k, v in rebuilt.items() if k != "date"} == {k: v for k, v in saved.items() if k != "date"}


def test_stock_memory_breakdown_adds_up_to_its_peak():
    from loraforge.kernels.context import stock_memory_breakdown

    a, b = stock_memory_breakdown("llama3-8b", 8192), stock_memory_breakdown("llama3-8b", 11264)
    for m in (a, b):
        parts = (m["weights"] + m["lora_grads_and_adam_states"] + m["dequant_workspace"] + m["activation_checkpoints"]
                 + (m["layer_recompute_linear"] + m["attention_tokens_squared"] if m["peak_phase"] == "layer"
                    else m["logits_and_loss"]))
        assert parts == pytest.approx(m["model_peak"], abs=0.05)
    # SDPA's math-kernel attention grows with tokens², the checkpoints linearly; the fixed part not at all
    r = 11264 / 8192
    assert b["attention_tokens_squared"] / a["attention_tokens_squared"] == pytest.approx(r * r, rel=1e-2)
    assert b["activation_checkpoints"] / a["activation_checkpoints"] == pytest.approx(r, rel=1e-2)
    assert a["weights"] == b["weights"]
    # the calibration points of the stock stack's measurements (SPEC.md: 44 GiB at 8,192, 74.5 at 11,264)
    assert a["model_peak"] == pytest.approx(44.0, rel=0.05) and b["model_peak"] == pytest.approx(74.5, rel=0.02)
