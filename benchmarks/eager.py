"""The losses as users write them in eager PyTorch: the ``eager`` and ``compile`` providers.

Each function upcasts the whole ``[B, T, V]`` logits to fp32, takes ``log_softmax``
and gathers the label column, then reduces to the loss. That is the code in most
training scripts (TRL's ``selective_log_softmax`` fallback, Liger's and torchtune's
reference losses) and what our kernels replace. Per token, in bytes, the forward
writes and re-reads an fp32 ``[N, V]`` copy and an fp32 ``[N, V]`` log-softmax, and the
backward materialises an fp32 ``[N, V]`` gradient before casting it to the logits'
dtype: see NOTES.md for the count.

Shapes: ``logits`` and ``ref_logits`` ``[B, T, V]``; ``labels`` ``[B, T]`` int64 with
``ignore_index`` for masked positions; ``ref_logprobs`` ``[B, T]`` fp32 per-token
reference log-probs. DPO-family batches hold the chosen rows first (``[0, B/2)``)
and the rejected rows second (``[B/2, B)``).

These functions are benchmark providers only. The tests have their own float64
reference; nothing here is imported by the package.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs ``[B, T]`` fp32 (0 where masked) and the mask ``[B, T]`` bool."""
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = torch.gather(logp, -1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, tok, torch.zeros_like(tok)), mask


def _ref_sums(labels: torch.Tensor, mask: torch.Tensor, ref_logits: Optional[torch.Tensor],
              ref_logprobs: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    """Reference per-sequence sums ``[B]`` (no gradient) from logits or token log-probs."""
    with torch.no_grad():
        if ref_logits is not None:
            ref_tok, _ = token_logprobs(ref_logits, labels, ignore_index)
        else:
            ref_tok = torch.where(mask, ref_logprobs.float(), torch.zeros_like(ref_logprobs, dtype=torch.float32))
        return ref_tok.sum(-1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Token-mean cross-entropy, a scalar: ``-sum M l / sum M``."""
    tok, mask = token_logprobs(logits, labels, ignore_index)
    return -tok.sum() / mask.sum().clamp(min=1)


def minor_sft_loss(logits: torch.Tensor, labels: torch.Tensor, ref_logits: Optional[torch.Tensor] = None,
                   ref_logprobs: Optional[torch.Tensor] = None, beta: float = 0.1,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """MinorSFT (length norm outside, the paper): mean over sequences of ``-(2/(beta m)) logsig(beta r)``."""
    tok, mask = token_logprobs(logits, labels, ignore_index)
    m = mask.sum(-1)
    r = tok.sum(-1) - _ref_sums(labels, mask, ref_logits, ref_logprobs, ignore_index)
    per_seq = -(2.0 / (beta * m.clamp(min=1).float())) * F.logsigmoid(beta * r)
    valid = m > 0
    return torch.where(valid, per_seq, torch.zeros_like(per_seq)).sum() / valid.sum().clamp(min=1)


def _pair_log_ratios(logits, labels, ref_logits, ref_logprobs, ignore_index):
    tok, mask = token_logprobs(logits, labels, ignore_index)
    r = tok.sum(-1) - _ref_sums(labels, mask, ref_logits, ref_logprobs, ignore_index)
    half = r.shape[0] // 2
    return r[:half], r[half:]


def dpo_loss(logits: torch.Tensor, labels: torch.Tensor, ref_logits: Optional[torch.Tensor] = None,
             ref_logprobs: Optional[torch.Tensor] = None, beta: float = 0.1,
             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """DPO sigmoid loss, mean over pairs: ``-logsig(beta (r_w - r_l))``."""
    r_w, r_l = _pair_log_ratios(logits, labels, ref_logits, ref_logprobs, ignore_index)
    return -F.logsigmoid(beta * (r_w - r_l)).mean()


def minor_dpo_loss(logits: torch.Tensor, labels: torch.Tensor, ref_logits: Optional[torch.Tensor] = None,
                   ref_logprobs: Optional[torch.Tensor] = None, beta: float = 0.1,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """MinorDPO loss, mean over pairs: ``-logsig(beta r_w - beta max(0, r_l))``."""
    r_w, r_l = _pair_log_ratios(logits, labels, ref_logits, ref_logprobs, ignore_index)
    return -F.logsigmoid(beta * r_w - beta * torch.clamp(r_l, min=0.0)).mean()


def loss_from_token_logprobs(case: str, tok: torch.Tensor, mask: torch.Tensor,
                             ref_tok: Optional[torch.Tensor], beta: float = 0.1) -> torch.Tensor:
    """The loss of ``case`` from per-token log-probs ``[B, T]`` (for providers that only
    compute token log-probs, such as TRL's kernel): same formulas as above."""
    if case == "token_logprobs":
        return tok
    if case == "sft":
        return -tok.sum() / mask.sum().clamp(min=1)
    m = mask.sum(-1)
    r = tok.sum(-1) - torch.where(mask, ref_tok, torch.zeros_like(ref_tok)).sum(-1)
    if case == "minor_sft":
        per_seq = -(2.0 / (beta * m.clamp(min=1).float())) * F.logsigmoid(beta * r)
        valid = m > 0
        return torch.where(valid, per_seq, torch.zeros_like(per_seq)).sum() / valid.sum().clamp(min=1)
    half = r.shape[0] // 2
    r_w, r_l = r[:half], r[half:]
    if case == "dpo":
        return -F.logsigmoid(beta * (r_w - r_l)).mean()
    if case == "minor_dpo":
        return -F.logsigmoid(beta * r_w - beta * torch.clamp(r_l, min=0.0)).mean()
    raise ValueError(f"case: unknown {case!r}")


LOSSES = {
    "sft": sft_loss,
    "minor_sft": minor_sft_loss,
    "minor_dpo": minor_dpo_loss,
    "dpo": dpo_loss,
}
