"""A step's loss read a step late: with an optimizer that drops a non-finite step on the device (torch's fused
AdamW), the host never waits for the loss, and the run is the same run as when it does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainhelpers import losses, nan_losses, read_metrics, stop_on_nonfinite

from loraforge.train import trainer as trainer_mod
from loraforge.train.optim import drops_steps_on_device, param_groups
from loraforge.train.trainer import LLAMATrainer


def _fused_adamw(monkeypatch, lagged: bool) -> None:
    """torch's fused AdamW (it runs on the CPU too); `lagged=False` keeps the host check for comparison."""
    def build(model, cfg, device, lora=None, notice=print):
        return torch.optim.AdamW(param_groups(model, cfg, lora), lr=cfg.learning_rate, fused=True)

    monkeypatch.setattr(trainer_mod, "build_optimizer", build)
    if not lagged:
        monkeypatch.setattr(trainer_mod, "drops_steps_on_device", lambda optimizer: False)


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_fused_adamw_drops_a_step_on_the_device():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    assert drops_steps_on_device(opt) and not drops_steps_on_device(torch.optim.AdamW([p], lr=0.1))
    p.grad = torch.ones(3)
    opt.found_inf = torch.ones(())
    opt.step()
    assert torch.equal(p.data, torch.ones(3)) and float(opt.state[p]["step"]) == 0


def _run(make_config, monkeypatch, lagged: bool) -> tuple[Path, object, list[tuple[int, int]]]:
    """A 3-step run whose step 2 is not finite; returns its folder, result, and for each read of a device
    value (a step's loss, a logged grad norm) from its host copy, the optimizer step that queued the copy
    and the one running at the read (4: after the run)."""
    reads: list[tuple[int, int]] = []
    at = {"step": 0, "inside": False}
    orig_step, orig_init, orig_read = (LLAMATrainer._optimizer_step, trainer_mod._HostCopy.__init__,
                                       trainer_mod._HostCopy.read)

    def step(self, *a):
        at["step"], at["inside"] = at["step"] + 1, True
        try:
            return orig_step(self, *a)
        finally:
            at["inside"] = False

    def init(self, value):
        orig_init(self, value)
        self.queued_in = at["step"]

    def read(self):
        reads.append((self.queued_in, at["step"] if at["inside"] else at["step"] + 1))
        return orig_read(self)

    with monkeypatch.context() as m:
        _fused_adamw(m, lagged)
        m.setattr(LLAMATrainer, "_micro_step_loss", nan_losses({2}, accum=2))
        m.setattr(LLAMATrainer, "_optimizer_step", step)
        m.setattr(trainer_mod._HostCopy, "__init__", init)
        m.setattr(trainer_mod._HostCopy, "read", read)
        cfg = make_config(f"lagged-{lagged}", max_steps=3, save_steps=0, eval_steps=0, max_grad_norm=1.0)
        trainer = LLAMATrainer.from_config(cfg, log=lambda msg: None)
        result = trainer.train()
        assert trainer._lagged is lagged
    return Path(cfg.training.output_dir), result, reads


def test_a_lagged_run_is_the_same_run(make_config, monkeypatch):
    """Same losses, records, counts and adapter as the host-checked run, a dropped step included; and each
    step's loss and grad norm are read while the next step runs, never in the step that queued them (a read
    there would wait for the GPU to finish that step)."""
    runs = {lagged: _run(make_config, monkeypatch, lagged) for lagged in (False, True)}
    (sync_dir, sync, sync_reads), (lag_dir, lag, lag_reads) = runs[False], runs[True]
    # steps 1 and 3: loss and grad norm; step 2 (dropped): its loss only. Step 3's: read after the run.
    assert sync_reads == [] and sorted(lag_reads) == [(1, 2), (1, 2), (2, 3), (3, 4), (3, 4)]
    assert losses(lag_dir) == losses(sync_dir) and sorted(losses(lag_dir)) == [1, 3]
    last = [[r for r in read_metrics(d) if "loss" in r][-1] for d in (sync_dir, lag_dir)]
    assert last[0]["nonfinite_steps"] == last[1]["nonfinite_steps"] == 1
    grad_norms = [[r["grad_norm"] for r in read_metrics(d) if "loss" in r] for d in (sync_dir, lag_dir)]
    assert grad_norms[0] == grad_norms[1] and all(isinstance(g, float) and g > 0 for g in grad_norms[1])
    assert lag.train_loss == sync.train_loss
    a, b = _adapter(sync_dir), _adapter(lag_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Long: five optimizer steps and a checkpoint on the tiny model (~4 s on 2 shared cores).
@pytest.mark.long
def test_a_lagged_run_stops_after_too_many_dropped_steps(make_config, monkeypatch):
    """The count ends a step back, so the stop comes a step later, with every step counted and saved."""
    _fused_adamw(monkeypatch, lagged=True)
    monkeypatch.setattr(LLAMATrainer, "_micro_step_loss", nan_losses({2, 3, 4, 5, 6}, accum=2))
    cfg = make_config(max_steps=8, max_nonfinite_steps=3)
    name, state = stop_on_nonfinite(cfg, "4 non-finite losses in a row at step 5")
    assert name == "step-5" and state["nonfinite_total"] == 4 and state["nonfinite_in_a_row"] == 4
