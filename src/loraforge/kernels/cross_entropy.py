"""Causal-LM loss fused with the (frozen) lm_head: the [tokens, vocab] logits never exist at once.

The tokens are cut into chunks whose fp32 logits fit a fixed budget (64 MiB by default, model/memory.py:
512 tokens of a 32K vocabulary, 128 of Llama-3's 128K; never fewer than 128 rows by default). For each
chunk the forward computes the logits in the activation dtype, the fp32 log-sum-exp, the loss, and at once
the gradient with respect to the hidden states, (softmax − onehot)·W / n_valid. Backward only scales that
stored gradient. Since lm_head is frozen there is no dW. Same semantics as transformers' ForCausalLMLoss:
labels shifted left by one, -100 ignored, mean over labelled tokens (or sum / num_items_in_batch).
"""

from __future__ import annotations

import torch

from loraforge.model.memory import LOGITS_CHUNK_BYTES as CHUNK_BYTES
from loraforge.model.memory import LOGITS_CHUNK_MIN_ROWS, logits_chunk_rows

IGNORE = -100


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, denom, chunk_rows, softcap=None):
        # hidden [T, d]; weight [V, d] (frozen); targets [T] int64 with IGNORE; denom: 0-dim tensor.
        need_grad = hidden.requires_grad
        grad = torch.empty_like(hidden) if need_grad else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or float64 in the tests
        total = torch.zeros((), device=hidden.device, dtype=acc)
        w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        inv = 1.0 / denom.to(acc)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows]
            t = targets[start:start + chunk_rows]
            logits = (h @ w.t()).to(acc)  # [c, V]
            if softcap:  # Gemma 2: logits c·tanh(z/c); dz gets the factor 1 - tanh²
                tanh = logits.div_(softcap).tanh_()
                logits = tanh * softcap
            lse = torch.logsumexp(logits, dim=-1)
            valid = t != IGNORE
            tsafe = torch.where(valid, t, 0)
            tgt = logits.gather(1, tsafe[:, None]).squeeze(1)
            total += torch.where(valid, lse - tgt, 0.0).sum()
            if need_grad:
                # softmax - onehot, in place over the fp32 logits, scaled per row (0 where ignored).
                probs = logits.sub_(lse[:, None]).exp_()
                probs.scatter_add_(1, tsafe[:, None], torch.full_like(lse[:, None], -1.0))
                if softcap:
                    probs.mul_(tanh.mul_(tanh).neg_().add_(1.0))
                    del tanh
                probs.mul_((valid.to(acc) * inv)[:, None])
                torch.matmul(probs.to(hidden.dtype), w, out=grad[start:start + chunk_rows])
            del logits
        if need_grad:
            ctx.save_for_backward(grad)
        return total * inv

    @staticmethod
    def backward(ctx, dloss):
        (grad,) = ctx.saved_tensors
        return grad * dloss.to(grad.dtype), None, None, None, None, None


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None,
                   *, shift_labels: torch.Tensor | None = None, num_items_in_batch=None,
                   chunk_bytes: int = CHUNK_BYTES, min_rows: int = LOGITS_CHUNK_MIN_ROWS,
                   softcap: float | None = None) -> torch.Tensor:
    """Loss of hidden [B, S, d] through lm_head weight [V, d] against labels [B, S]; `softcap`: Gemma 2's
    final logit soft-capping (a second fp32 chunk is live then, so chunks are half as long)."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    if num_items_in_batch is None:
        denom = (targets != IGNORE).sum()
    elif torch.is_tensor(num_items_in_batch):
        denom = num_items_in_batch.to(hidden.device)
    else:
        denom = torch.tensor(float(num_items_in_batch), device=hidden.device)
    chunk_rows = logits_chunk_rows(weight.shape[0], chunk_bytes, copies=2 if softcap else 1, min_rows=min_rows)
    return LinearCrossEntropy.apply(h, weight, targets, denom, chunk_rows, softcap)
