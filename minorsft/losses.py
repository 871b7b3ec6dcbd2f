"""Loss formulas as small pure functions of per-sequence quantities.

Nothing here touches vocabulary-sized data: every input is ``[B]`` (sequences) or
``[P]`` (pairs, ``P = B / 2``) fp32, and the gradients flow back through autograd to
the per-token log-probs, whose backward kernel turns them into logit gradients. The
per-sequence *gradient coefficient* of each loss is therefore ``dL/dS_i``, written in
each docstring; the tests check autograd's value against it.

Notation (SPEC.md section 2): ``S`` policy sequence log-prob sum, ``S_ref`` the
reference's, ``r = S - S_ref``, ``m`` number of unmasked tokens, pair ``k`` = chosen row
``k`` (``_w``) and rejected row ``P + k`` (``_l``).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
LENGTH_NORMS = ("outside", "inside", "none")


def _safe_len(m: torch.Tensor) -> torch.Tensor:
    """Lengths as fp32 with 0 replaced by 1 (empty items are zeroed by the caller)."""
    return m.clamp(min=1).to(torch.float32)


def minor_sft(r: torch.Tensor, m: torch.Tensor, beta: float, length_norm: str = "outside") -> torch.Tensor:
    """Per-sequence MinorSFT loss, ``[B]``.

    - ``outside`` (the paper): ``-(2 / (beta m)) log sigmoid(beta r)``; coefficient
      ``dL/dS = -(2/m) sigmoid(-beta r)``, which is ``-1/m`` (token-mean SFT) at ``r = 0``.
    - ``inside`` (TorchRL): ``-log sigmoid(beta r / m)``; ``dL/dS = -(beta/m) sigmoid(-beta r/m)``.
    - ``none``: ``-log sigmoid(beta r)``; ``dL/dS = -beta sigmoid(-beta r)``.
    """
    ml = _safe_len(m)
    if length_norm == "outside":
        return -(2.0 / (beta * ml)) * F.logsigmoid(beta * r)
    if length_norm == "inside":
        return -F.logsigmoid(beta * r / ml)
    if length_norm == "none":
        return -F.logsigmoid(beta * r)
    raise ValueError(f"length_norm: got {length_norm!r}, expected one of {LENGTH_NORMS}")


def dpo(r_w: torch.Tensor, r_l: torch.Tensor, m_w: torch.Tensor, m_l: torch.Tensor,
        beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO-family loss, ``[P]``, with TRL's loss-type names.

    With ``d = r_w - r_l`` and ``eps = label_smoothing``:
    - ``sigmoid``: ``-(1-eps) log sig(beta d) - eps log sig(-beta d)``
    - ``ipo``: ``((r_w/m_w - r_l/m_l) - 1/(2 beta))^2`` (length-averaged log-ratios)
    - ``hinge``: ``relu(1 - beta d)``
    - ``robust``: ``(-(1-eps) log sig(beta d) + eps log sig(-beta d)) / (1 - 2 eps)``
    For ``sigmoid`` the chosen coefficient is ``dL/dS_w = -beta[(1-eps) sig(-beta d) - eps sig(beta d)]``
    and the rejected one its negative.
    """
    d = r_w - r_l
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -(1.0 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
    if loss_type == "ipo":
        h = r_w / _safe_len(m_w) - r_l / _safe_len(m_l)
        return (h - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * d)
    if loss_type == "robust":
        return (-(1.0 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1.0 - 2.0 * eps)
    raise ValueError(f"loss_type: got {loss_type!r}, expected one of {DPO_LOSS_TYPES}")


def minor_dpo(r_w: torch.Tensor, r_l: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair MinorDPO loss ``-log sigmoid(beta r_w - beta max(0, r_l))``, ``[P]``.

    The max has ``torch.clamp(r_l, min=0)`` gradient semantics: the rejected
    coefficient ``dL/dS_l = beta sig(-(beta r_w - beta max(0, r_l)))`` for ``r_l >= 0``
    (a tie at 0 passes gradient) and exactly 0 for ``r_l < 0``.
    """
    return -F.logsigmoid(beta * r_w - beta * torch.clamp(r_l, min=0.0))


def reduce(per_item: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce ``[K]`` per-item losses; items with ``valid == False`` count as 0.

    ``mean`` divides by the number of valid items (at least 1), so an all-masked batch
    gives 0 with a zero gradient and no host synchronisation.
    """
    per_item = torch.where(valid, per_item, torch.zeros_like(per_item))
    if reduction == "none":
        return per_item
    if reduction == "sum":
        return per_item.sum()
    if reduction == "mean":
        return per_item.sum() / valid.sum().clamp(min=1).to(per_item.dtype)
    raise ValueError(f"reduction: got {reduction!r}, expected one of ('mean', 'sum', 'none')")


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``valid`` entries (0 when none), detached."""
    x = x.detach()
    total = torch.where(valid, x, torch.zeros_like(x)).sum()
    return total / valid.sum().clamp(min=1).to(x.dtype)


def minor_sft_metrics(S: torch.Tensor, S_ref: torch.Tensor, m: torch.Tensor,
                      valid: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``deviation = mean_i r_i / m_i`` (the paper's metric), mean ``logps`` / ``ref_logps``."""
    r = S - S_ref
    return {
        "deviation": masked_mean(r / _safe_len(m), valid),
        "logps": masked_mean(S, valid),
        "ref_logps": masked_mean(S_ref, valid),
    }


def dpo_metrics(S_w, S_l, r_w, r_l, beta: float, valid: torch.Tensor) -> Dict[str, torch.Tensor]:
    """TRL-named DPO metrics, means over valid pairs, detached."""
    rw, rl = beta * r_w.detach(), beta * r_l.detach()
    return {
        "rewards/chosen": masked_mean(rw, valid),
        "rewards/rejected": masked_mean(rl, valid),
        "rewards/accuracies": masked_mean((rw > rl).to(rw.dtype), valid),
        "rewards/margins": masked_mean(rw - rl, valid),
        "logps/chosen": masked_mean(S_w, valid),
        "logps/rejected": masked_mean(S_l, valid),
    }


def learnability(loss_original: torch.Tensor, loss_finetuned: torch.Tensor) -> torch.Tensor:
    """LoBaSS learnability ``(L0 - L1) / L0`` per sample, ``[B]``.

    ``L0``/``L1`` are per-sample token-mean cross-entropies under the original and
    the fine-tuned model. A sample with ``L0 == 0`` gets learnability 0.
    """
    l0 = loss_original.to(torch.float32)
    l1 = loss_finetuned.to(torch.float32)
    safe = torch.where(l0 != 0, l0, torch.ones_like(l0))
    return torch.where(l0 != 0, (l0 - l1) / safe, torch.zeros_like(l0))
