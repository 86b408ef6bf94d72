"""The convergence harness's wiring: arms, configs, the path checks, the comparison and the plot (no training)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from loraforge.bench import convergence as conv
from loraforge.errors import ConfigError, ResourceError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_every_arm_is_a_valid_run_config_that_differs_only_in_its_switches(tmp_path: Path):
    configs = {name: conv.arm_config(arm, 7, tmp_path) for name, arm in conv.ARMS.items()}
    for name, cfg in configs.items():
        assert cfg.training.max_steps == 7 and cfg.training.seed == 42 and cfg.model.device == conv.ARMS[name].device
        assert cfg.training.output_dir == str(tmp_path / name)
    stock, fast, graphs = configs["stock"], configs["fast"], configs["fast-graphs"]
    assert (stock.model.fast_kernels, fast.model.fast_kernels, fast.model.cuda_graphs, graphs.model.cuda_graphs) \
        == (False, True, False, True)
    assert all(c.model.use_4bit for c in (stock, fast, graphs, configs["nf4-qlora"], configs["cpu-nf4-qlora"]))
    assert not configs["bf16-lora"].model.use_4bit and configs["bf16-lora"].model.dtype == "bfloat16"
    assert configs["long-context"].training.long_context and configs["packing"].data.packing
    # Same data, batches and optimizer within a device: only the arm's own switches differ.
    for device in ("cpu", "cuda"):
        same = {(c.data.max_length, c.data.max_samples, c.data.max_eval_samples, c.training.learning_rate,
                 c.training.per_device_train_batch_size, c.training.gradient_accumulation_steps)
                for n, c in configs.items() if conv.ARMS[n].device == device}
        assert len(same) == 1


def test_arm_selection():
    assert [a.name for a in conv.arms_for("cpu", ["all"])] == ["cpu-fp32-lora", "cpu-nf4-qlora"]
    assert "cpu-fp32-lora" not in [a.name for a in conv.arms_for("cuda", ["all"])]
    with pytest.raises(ConfigError, match="unknown arm"):
        conv.arms_for("cuda", ["fastest"])
    with pytest.raises(ConfigError, match="not on --device cuda"):
        conv.arms_for("cuda", ["cpu-fp32-lora"])


def test_cuda_without_a_gpu_refuses_before_running_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ResourceError, match="no CUDA GPU"):
        conv.run_convergence("cuda", ["all"], 5, tmp_path / "out", tmp_path / "work")
    assert not (tmp_path / "out").exists()


def _trainer(patched: bool, graphs: object = None) -> SimpleNamespace:
    return SimpleNamespace(fast_path=SimpleNamespace(report={"patched": patched, "reason": "because"},
                                                     graphs=graphs, line="fast path: ..."))


def test_an_arm_that_did_not_get_its_path_fails_loudly():
    switches = {"offload_activations": True, "chunked_cross_entropy": True, "drop_full_attention_mask": True}
    conv._require_path(conv.ARMS["fast"], _trainer(True), switches)
    conv._require_path(conv.ARMS["stock"], _trainer(False), switches)
    conv._require_path(conv.ARMS["fast-graphs"], _trainer(True, graphs=object()), switches)
    with pytest.raises(conv.ConvergenceError, match="fused kernels are off"):
        conv._require_path(conv.ARMS["fast"], _trainer(False), switches)
    with pytest.raises(conv.ConvergenceError, match="fused kernels are on"):
        conv._require_path(conv.ARMS["stock"], _trainer(True), switches)
    with pytest.raises(conv.ConvergenceError, match="CUDA graphs did not turn on"):
        conv._require_path(conv.ARMS["fast-graphs"], _trainer(True), switches)
    with pytest.raises(conv.ConvergenceError, match="long-context"):
        conv._require_path(conv.ARMS["long-context"], _trainer(True), {**switches, "offload_activations": False})


def test_comparisons_and_plot(tmp_path: Path):
    curve = [[1, 3.0], [2, 2.5], [3, 2.2]]
    records = [{"arm": "stock", "held_out_ppl": 20.0, "loss_curve": curve},
               {"arm": "fast", "held_out_ppl": 20.1, "loss_curve": curve},
               {"arm": "fast-graphs", "held_out_ppl": 21.0, "loss_curve": curve},
               {"arm": "packing", "error": "exit 1: boom"}]
    found = {(c["arm"], c["reference"]): c for c in conv.compare_arms(records)}
    assert found[("fast", "stock")]["within"] and not found[("fast-graphs", "stock")]["within"]
    assert found[("fast", "stock")]["relative_difference"] == pytest.approx(0.005)
    assert "MISSED" in found[("fast-graphs", "stock")]["line"] and ("packing", "fast") not in found
    png = conv.plot_curves(records, tmp_path / "c.png", title="t")
    assert png is not None and png.read_bytes().startswith(PNG_MAGIC)


def test_comparisons_show_the_step0_gap_the_base_models_alone_make():
    records = [{"arm": "cpu-fp32-lora", "held_out_ppl": 20.0, "step0_held_out_ppl": 30.0},
               {"arm": "cpu-nf4-qlora", "held_out_ppl": 21.0, "step0_held_out_ppl": 33.0}]
    (c,) = conv.compare_arms(records)
    assert c["step0_relative_difference"] == pytest.approx(0.1) and not c["within"]
    assert "at step 0 33.0000 vs 30.0000, +10.00%" in c["line"]


def test_the_results_are_written_after_every_arm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A run cut short (a device call's time limit) keeps the arms it finished, marked incomplete."""
    def child(arm, steps, workdir, log, threads=None, extra=()):
        if arm.name == "cpu-nf4-qlora":
            raise KeyboardInterrupt  # the call's limit kills the run during the second arm
        return {"arm": arm.name, "held_out_ppl": 33.5, "step0_held_out_ppl": 76.7, "device": "cpu", "loss_curve": []}

    monkeypatch.setattr(conv, "_run_child", child)
    with pytest.raises(KeyboardInterrupt):
        conv.run_convergence("cpu", ["cpu-fp32-lora", "cpu-nf4-qlora"], 2, tmp_path, tmp_path / "work",
                             log=lambda m: None)
    [path] = tmp_path.glob("convergence-cpu-*.json")
    written = json.loads(path.read_text())
    assert [r["arm"] for r in written["arms"]] == ["cpu-fp32-lora"]
    assert written["complete"] is False


def test_parallel_arms_run_at_once_and_keep_their_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """--parallel 2 starts both arms before either ends (each waits for the other), records stay in arm
    order, and the results say the timings are not speeds."""
    import threading

    both_started = threading.Barrier(2, timeout=10)

    def child(arm, steps, workdir, log, threads=None, extra=()):
        both_started.wait()  # raises BrokenBarrierError if the arms ran one after the other
        ppl = 30.0 if arm.name == "cpu-fp32-lora" else 30.3
        return {"arm": arm.name, "held_out_ppl": ppl, "step0_held_out_ppl": 70.0, "device": "cpu", "loss_curve": []}

    monkeypatch.setattr(conv, "_run_child", child)
    path, records = conv.run_convergence("cpu", ["cpu-fp32-lora", "cpu-nf4-qlora"], 2, tmp_path,
                                         tmp_path / "work", log=lambda m: None, parallel=2)
    written = json.loads(path.read_text())
    assert [r["arm"] for r in records] == [r["arm"] for r in written["arms"]] == ["cpu-fp32-lora", "cpu-nf4-qlora"]
    assert written["complete"] is True and written["parallel"] == 2 and "not speed" in written["timing_note"]
    (c,) = written["comparisons"]
    assert c["within"] and c["relative_difference"] == pytest.approx(0.01)


def test_set_overrides_every_arm_but_not_what_an_arm_names(tmp_path: Path):
    extra = ["data.max_samples=null", "model.use_4bit=false"]
    fast, bf16 = (conv.arm_config(conv.ARMS[n], 7, tmp_path, extra) for n in ("fast", "bf16-lora"))
    assert fast.data.max_samples is None and bf16.data.max_samples is None
    assert fast.model.use_4bit and not bf16.model.use_4bit  # the arm's own switch wins over --set


def test_a_bad_set_fails_before_any_arm_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    started = []
    monkeypatch.setattr(conv, "_run_child", lambda *a, **k: started.append(a))
    with pytest.raises(ConfigError, match="max_smaples"):
        conv.run_convergence("cpu", ["cpu-fp32-lora"], 2, tmp_path, tmp_path / "work", log=lambda m: None,
                             extra=["data.max_smaples=10"])
    assert started == []


def test_diagnostic_arms_run_by_name_only():
    assert "bf16-lora-nf4-base" not in [a.name for a in conv.arms_for("cuda", ["all"])]
    assert [a.name for a in conv.arms_for("cpu", ["cpu-fp32-lora-nf4-base"])] == ["cpu-fp32-lora-nf4-base"]
    relations = {(a, b) for a, b, *_ in conv.RELATIONS}
    assert {("nf4-qlora", "bf16-lora-nf4-base"), ("cpu-nf4-qlora", "cpu-fp32-lora-nf4-base")} <= relations


def test_the_nf4_rounded_base_computes_what_the_4bit_load_computes(tiny_model_dir: Path):
    """The diagnostic arms' base must hold exactly the values a 4-bit load dequantizes to: same logits as the
    QLoRA model (to fp32 rounding), and not the dense model's."""
    import torch

    from loraforge.config import ModelConfig
    from loraforge.model.load import load_base

    def logits(model):
        ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits.float()

    dense_cfg = ModelConfig(model_name=str(tiny_model_dir), use_4bit=False, dtype="float32", device="cpu")
    nf4_cfg = ModelConfig(model_name=str(tiny_model_dir), use_4bit=True, dtype="float32",
                          bnb_4bit_compute_dtype="float32", device="cpu")
    dense, _ = load_base(dense_cfg)
    before = logits(dense)
    with conv._nf4_rounded_loads(nf4_cfg):
        from loraforge.model import load

        rounded, _ = load.load_base(dense_cfg)
    assert load.load_base is load_base  # put back
    with pytest.raises(conv.ConvergenceError, match="nothing was rounded"):
        with conv._nf4_rounded_loads(nf4_cfg):
            load_base(dense_cfg)  # imported before the swap: what a set-up importing it at module level would do
    quantized, _ = load_base(nf4_cfg)  # for training: never packed for the bf16 CPU kernel
    want = logits(quantized)
    got = logits(rounded)
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
    assert (before - want).abs().max().item() > 100 * (got - want).abs().max().item()


def test_the_independent_perplexity_agrees_with_the_evaluator(tiny_model_dir: Path):
    """labels_loss_perplexity (transformers' own loss, one conversation at a time) is the evaluator check's
    reference: on padded batches of uneven conversations, eval/perplexity.py must agree with it."""
    import torch

    from loraforge.config import ModelConfig
    from loraforge.data.collate import PadCollator
    from loraforge.eval.perplexity import PerplexityEvaluator
    from loraforge.model.load import load_base

    model, _ = load_base(ModelConfig(model_name=str(tiny_model_dir), use_4bit=False, dtype="float32", device="cpu"),
                         for_training=False)
    g = torch.Generator().manual_seed(0)
    convs = []
    for n in (5, 9, 14):
        ids = torch.randint(3, 1000, (n,), generator=g).tolist()
        convs.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    ours = PerplexityEvaluator(model).evaluate([PadCollator(0)(convs)])["perplexity"]
    reference = conv.labels_loss_perplexity(model, convs, "cpu")
    assert abs(ours / reference - 1) < 1e-5
    assert abs(conv.labels_loss_perplexity(model, convs[:1], "cpu") / reference - 1) > 1e-3  # depends on the data
