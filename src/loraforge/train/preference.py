"""Preference objectives on the one training loop: DPO and ORPO.

A batch of B pairs is one padded batch of 2B rows (data/preference.py's PairCollator: chosen rows first),
so chosen and rejected share one forward. A side's score is its summed log-probability of the answer
tokens; only those tokens go through lm_head, in chunks, and a chunk's [tokens, vocab] logits are
recomputed in backward rather than kept (`LinearLogProbs`): full logits for both sides never exist.

DPO's reference model is the same model with the adapter switched off (peft's `disable_adapter`), run
without gradients: no second copy of the weights. Per pair, with policy scores pc, pr and reference
scores rc, rr: h = beta * ((pc - rc) - (pr - rr)), loss = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)
(eps = label_smoothing, conservative DPO). ORPO needs no reference: with mean token log-probs lc, lr,
loss = -lc + lambda * -log sigmoid(log odds(lc) - log odds(lr)), log odds(l) = l - log(1 - e^l).

A step's loss is the sum of its pairs' losses over the step's pair count (summed over processes), so
gradient accumulation 1x8 and 8x1 give the same update, as the SFT step does with tokens.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from loraforge.config import TrainingConfig
from loraforge.model.memory import logits_chunk_rows
from loraforge.train.distributed import gradient_sync, loss_scale, sum_over_processes
from loraforge.train.optim import finish_step

IGNORE = -100
METRICS = ("loss", "reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected")


class LinearLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] per row, chunked over rows; backward recomputes each chunk's
    logits (one extra matmul) instead of storing [rows, vocab] from forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        # hidden [N, d]; weight [V, d]; targets [N] (all valid). Returns fp32 (float64 in the tests) [N].
        acc = torch.promote_types(hidden.dtype, torch.float32)
        w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        out = torch.empty(hidden.shape[0], device=hidden.device, dtype=acc)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], chunk_rows):
            logits = (hidden[s:s + chunk_rows] @ w.t()).to(acc)
            lse[s:s + chunk_rows] = torch.logsumexp(logits, dim=-1)
            out[s:s + chunk_rows] = logits.gather(1, targets[s:s + chunk_rows, None]).squeeze(1) - lse[s:s + chunk_rows]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=lse.dtype) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], ctx.chunk_rows):
            h, g = hidden[s:s + ctx.chunk_rows], grad_out[s:s + ctx.chunk_rows].to(lse.dtype)
            # d logp / d logits = onehot - softmax, scaled per row by the incoming gradient.
            d = (h @ w.t()).to(lse.dtype).sub_(lse[s:s + ctx.chunk_rows, None]).exp_().mul_(-g[:, None])
            d.scatter_add_(1, targets[s:s + ctx.chunk_rows, None], g[:, None])
            if grad_h is not None:
                grad_h[s:s + ctx.chunk_rows] = d.to(hidden.dtype) @ w
            if grad_w is not None:
                grad_w += d.t() @ h.to(d.dtype)
        return grad_h, grad_w.to(weight.dtype) if grad_w is not None else None, None, None


def _causal_lm(model: Any) -> Any:
    """The transformers CausalLM inside Accelerate's / DDP's and peft's wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "peft_config"):
        model = model.base_model
        model = getattr(model, "model", model)
    return model


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's labelled tokens, their count), both [rows].

    The model runs through its wrappers (so DDP/FSDP and the fast path see a normal forward) with
    `logits_to_keep=1`; the final hidden states are taken from the decoder by a hook.
    """
    lm = _causal_lm(model)
    captured: list[torch.Tensor] = []
    hook = lm.model.register_forward_hook(lambda _m, _i, out: captured.append(out.last_hidden_state))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False,
              logits_to_keep=1)
    finally:
        hook.remove()
    hidden = captured[-1][:, :-1]
    targets = batch["labels"][:, 1:].to(hidden.device)
    mask = targets != IGNORE
    rows = mask.nonzero()[:, 0]
    head = lm.get_output_embeddings()
    h, t = hidden[mask], targets[mask]
    if isinstance(head, torch.nn.Linear) and head.bias is None:
        chunk_rows = logits_chunk_rows(head.weight.shape[0])
        logp = LinearLogProbs.apply(h, head.weight, t, chunk_rows)
    else:  # a wrapped or biased head (e.g. lm_head in modules_to_save): the labelled rows' logits at once
        logp = torch.log_softmax(head(h).float(), dim=-1).gather(1, t[:, None]).squeeze(1)
    sums = torch.zeros(targets.shape[0], device=hidden.device, dtype=logp.dtype).index_add(0, rows, logp)
    return sums, mask.sum(1)


def _adapter_off(model: Any) -> contextlib.AbstractContextManager:
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    return inner.disable_adapter() if hasattr(inner, "disable_adapter") else contextlib.nullcontext()


def reference_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` of the base model: the adapter disabled, no gradients."""
    with torch.no_grad(), _adapter_off(model):
        return sequence_logps(model, batch)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0; x is clamped just below 0 (a mean log-prob of exactly 0 has no odds)."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-6)))


def pair_losses(policy: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None,
                tcfg: TrainingConfig) -> dict[str, torch.Tensor]:
    """Per-pair loss and what users watch, from [2B] row scores (chosen rows first).

    Rewards: DPO's implicit reward beta * (policy - reference) of each side; ORPO's is the side's mean
    token log-prob. Reward accuracy counts a tie as half (at the start of DPO every pair is a tie).
    """
    b = policy.shape[0] // 2
    pc, pr = policy[:b], policy[b:]
    if tcfg.objective == "dpo":
        rc, rr = tcfg.beta * (pc - reference[:b]), tcfg.beta * (pr - reference[b:])
        h = rc - rr
        eps = tcfg.label_smoothing
        loss = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    elif tcfg.objective == "orpo":
        rc, rr = pc / counts[:b].clamp(min=1), pr / counts[b:].clamp(min=1)
        log_odds = (rc - rr) - (_log1mexp(rc) - _log1mexp(rr))
        loss = -rc - tcfg.orpo_lambda * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"pair_losses: objective {tcfg.objective!r} is not a preference objective")
    margin = (rc - rr).detach()
    return {"loss": loss, "reward_accuracy": (margin > 0).float() + 0.5 * (margin == 0).float(),
            "reward_margin": margin, "logps_chosen": pc.detach(), "logps_rejected": pr.detach()}


def pair_forward(model: Any, batch: dict[str, torch.Tensor], tcfg: TrainingConfig) -> dict[str, torch.Tensor]:
    """One micro-batch of pairs: reference pass (DPO), policy pass, per-pair losses and metrics."""
    reference = reference_logps(model, batch)[0] if tcfg.objective == "dpo" else None
    policy, counts = sequence_logps(model, batch)
    return pair_losses(policy, counts, reference, tcfg)


@dataclass
class PreferenceStep:
    """One optimizer step over pairs; the fields the loop reads from an SFT step, with pairs for tokens."""

    nll: float  # summed per-pair loss; not finite = the step was dropped
    tokens: int  # pairs: the loop's logged loss, nll / tokens, is the mean loss per pair
    seen: int  # real (non-padding) tokens fed, both sides
    lr: float
    grad_norm: torch.Tensor | None
    stop_requested: bool
    sums: dict[str, float] = field(default_factory=dict)  # METRICS summed over the step's pairs


def optimizer_step(acc: Any, run: Any, micro: list[dict[str, torch.Tensor]], tcfg: TrainingConfig,
                   signalled: bool) -> PreferenceStep:
    """The preference twin of LLAMATrainer._optimizer_step: count the step's pairs over all processes,
    forward/backward each micro-batch with its summed pair loss over that count, clip, step. A step
    whose loss is not finite is dropped (no update) but still advances the schedule."""
    model = run.model
    counts = sum_over_processes(acc, torch.tensor(
        [sum(b["input_ids"].shape[0] // 2 for b in micro), sum(int(b["attention_mask"].sum()) for b in micro),
         int(signalled)], device=acc.device))
    n_pairs, seen, stop_requested = counts[0], int(counts[1]), bool(counts[2])
    scale = loss_scale(acc, tcfg.gradient_accumulation_steps)
    sums = torch.zeros(len(METRICS), device=acc.device, dtype=torch.float64)
    for k, batch in enumerate(micro):
        batch = {key: v.to(acc.device) for key, v in batch.items()}
        with gradient_sync(acc, model, sync=k == len(micro) - 1):
            out = pair_forward(model, batch, tcfg)
            loss = out["loss"].sum() / n_pairs
            sums += torch.stack([out[m].detach().sum().double() for m in METRICS])
            # As in the SFT step: a non-finite loss still goes through backward (as 0) to keep ranks matched.
            acc.backward(torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * scale)
    totals = sum_over_processes(acc, sums).tolist()  # the step's one host sync
    outcome = PreferenceStep(nll=totals[0], tokens=int(n_pairs), seen=seen, lr=run.scheduler.get_last_lr()[0],
                             grad_norm=None, stop_requested=stop_requested,
                             sums=dict(zip(METRICS, totals, strict=True)))
    return finish_step(acc, run, model, tcfg.max_grad_norm, outcome)


def add_to_window(window: dict[str, float], step: Any) -> None:
    """Sum a step's metrics into the log window (an SFT step has none)."""
    for name, value in getattr(step, "sums", {}).items():
        if name != "loss":
            window[name] = window.get(name, 0.0) + value


def evaluate(model: Any, loader: Any, tcfg: TrainingConfig) -> dict[str, float]:
    """Held-out pairs: the objective's loss, reward accuracy and margin, the chosen answers' perplexity, and
    the win rate (the model gives the chosen answer a higher mean token log-prob than the rejected one)
    of the fine-tuned model and of the base (adapter off, the same pass DPO's reference takes)."""
    device = next(p for p in model.parameters()).device
    totals: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                reference, counts = reference_logps(model, batch)
                policy, _ = sequence_logps(model, batch)
                out = pair_losses(policy, counts, reference, tcfg)
                b = counts.shape[0] // 2
                n = counts.clamp(min=1).to(policy.dtype)
                extra = {"pairs": torch.tensor(float(b)), "chosen_tokens": counts[:b].sum(),
                         "chosen_nll": -policy[:b].sum(), "base_chosen_nll": -reference[:b].sum(),
                         "win_rate": _wins(policy / n, b), "base_win_rate": _wins(reference / n, b)}
                for name, value in [*((m, out[m].sum()) for m in METRICS), *extra.items()]:
                    totals[name] = totals.get(name, 0.0) + float(value)
    finally:
        model.train(was_training)
    pairs, tokens = max(totals.pop("pairs", 0.0), 1.0), max(totals.pop("chosen_tokens", 0.0), 1.0)
    result = {f"eval_{m}": totals.get(m, 0.0) / pairs for m in (*METRICS, "win_rate", "base_win_rate")}
    result["eval_perplexity"] = math.exp(min(totals.get("chosen_nll", 0.0) / tokens, 700.0))
    result["eval_base_perplexity"] = math.exp(min(totals.get("base_chosen_nll", 0.0) / tokens, 700.0))
    return result


def _wins(mean_logps: torch.Tensor, b: int) -> torch.Tensor:
    """Pairs whose chosen side has the higher mean token log-prob (a tie counts half)."""
    c, r = mean_logps[:b], mean_logps[b:]
    return ((c > r).float() + 0.5 * (c == r).float()).sum()
