"""The losses: small pure formulas of per-sequence quantities, and the one table of losses.

Nothing here touches vocabulary-sized data: every input is ``[B, T]`` (tokens), ``[B]``
(sequences) or ``[P]`` (pairs, ``P = B / 2``) fp32, and the gradients flow back through
autograd to the per-token log-probs, whose backward kernel turns them into logit
gradients. The per-sequence *gradient coefficient* of each loss is therefore
``dL/dS_i``, written in each docstring; the tests check autograd's value against it.

Notation (SPEC.md section 2): ``S`` policy sequence log-prob sum, ``S_ref`` the
reference's, ``r = S - S_ref``, ``m`` number of unmasked tokens, pair ``k`` = chosen row
``k`` (``_w``) and rejected row ``P + k`` (``_l``).

:data:`LOSSES` is the one place that says which losses exist, which options each takes
(with their defaults and checks), whether it needs a reference or a pair layout, and
which metrics it reports. The functional and linear APIs, the modules, the trainer, the
Hugging Face integration and the CLI all read it. :func:`loss_from_token_logprobs` is the
shared epilogue of both paths: token log-probs in, loss (and metrics) out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from minorsft import validation as V

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
LENGTH_NORMS = ("outside", "inside", "none")
LossOut = Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]


# ----------------------------------------------------------------------- formulas

def _safe_len(m: Tensor, like: Optional[Tensor] = None) -> Tensor:
    """Lengths as floats (``like``'s dtype, else fp32) with 0 replaced by 1 (empty items
    are zeroed by the caller)."""
    return m.clamp(min=1).to(like.dtype if like is not None else torch.float32)


def minor_sft(r: Tensor, m: Tensor, beta: float, length_norm: str = "outside") -> Tensor:
    """Per-sequence MinorSFT loss, ``[B]``.

    - ``outside`` (the paper): ``-(2 / (beta m)) log sigmoid(beta r)``; coefficient
      ``dL/dS = -(2/m) sigmoid(-beta r)``, which is ``-1/m`` (token-mean SFT) at ``r = 0``.
    - ``inside`` (TorchRL): ``-log sigmoid(beta r / m)``; ``dL/dS = -(beta/m) sigmoid(-beta r/m)``.
    - ``none``: ``-log sigmoid(beta r)``; ``dL/dS = -beta sigmoid(-beta r)``.
    """
    ml = _safe_len(m, r)
    if length_norm == "outside":
        return -(2.0 / (beta * ml)) * F.logsigmoid(beta * r)
    if length_norm == "inside":
        return -F.logsigmoid(beta * r / ml)
    if length_norm == "none":
        return -F.logsigmoid(beta * r)
    raise ValueError(f"length_norm: got {length_norm!r}, expected one of {LENGTH_NORMS}")


def dpo(r_w: Tensor, r_l: Tensor, m_w: Tensor, m_l: Tensor, beta: float,
        loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> Tensor:
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
        h = r_w / _safe_len(m_w, r_w) - r_l / _safe_len(m_l, r_l)
        return (h - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * d)
    if loss_type == "robust":
        return (-(1.0 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1.0 - 2.0 * eps)
    raise ValueError(f"loss_type: got {loss_type!r}, expected one of {DPO_LOSS_TYPES}")


def minor_dpo(r_w: Tensor, r_l: Tensor, beta: float) -> Tensor:
    """Per-pair MinorDPO loss ``-log sigmoid(beta r_w - beta max(0, r_l))``, ``[P]``.

    The max has ``torch.clamp(r_l, min=0)`` gradient semantics: the rejected
    coefficient ``dL/dS_l = beta sig(-(beta r_w - beta max(0, r_l)))`` for ``r_l >= 0``
    (a tie at 0 passes gradient) and exactly 0 for ``r_l < 0``.
    """
    return -F.logsigmoid(beta * r_w - beta * torch.clamp(r_l, min=0.0))


def minor_sft_grad(r: Tensor, m: Tensor, beta: float, length_norm: str = "outside") -> Tensor:
    """``dL/dS`` of :func:`minor_sft` per sequence, ``[B]`` (closed form, as its docstring)."""
    ml = _safe_len(m, r)
    if length_norm == "outside":
        return -2.0 * torch.sigmoid(-beta * r) / ml
    if length_norm == "inside":
        return -beta * torch.sigmoid(-beta * r / ml) / ml
    return -beta * torch.sigmoid(-beta * r)


def dpo_grad(r_w: Tensor, r_l: Tensor, m_w: Tensor, m_l: Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """``(dL/dS_w, dL/dS_l)`` of :func:`dpo` per pair (closed forms)."""
    d, eps = r_w - r_l, label_smoothing
    if loss_type == "ipo":
        mw, ml = _safe_len(m_w, r_w), _safe_len(m_l, r_l)
        dh = 2.0 * ((r_w / mw - r_l / ml) - 1.0 / (2.0 * beta))
        return dh / mw, -dh / ml
    if loss_type == "sigmoid":
        dd = -beta * (1.0 - eps) * torch.sigmoid(-beta * d) + beta * eps * torch.sigmoid(beta * d)
    elif loss_type == "hinge":     # relu's gradient at 0 is 0, as torch's
        dd = torch.where(1.0 - beta * d > 0, torch.full_like(d, -beta), torch.zeros_like(d))
    else:                          # robust
        dd = -beta * ((1.0 - eps) * torch.sigmoid(-beta * d) + eps * torch.sigmoid(beta * d)) / (1.0 - 2.0 * eps)
    return dd, -dd


def minor_dpo_grad(r_w: Tensor, r_l: Tensor, beta: float):
    """``(dL/dS_w, dL/dS_l)`` of :func:`minor_dpo` per pair (the clamp passes gradient at 0)."""
    s = torch.sigmoid(-(beta * r_w - beta * torch.clamp(r_l, min=0.0)))
    return -beta * s, torch.where(r_l >= 0, beta * s, torch.zeros_like(s))


def learnability(loss_original: Tensor, loss_finetuned: Tensor) -> Tensor:
    """LoBaSS learnability ``(L0 - L1) / L0`` per sample, ``[B]``.

    ``L0``/``L1`` are per-sample token-mean cross-entropies under the original and
    the fine-tuned model. A sample with ``L0 == 0`` gets learnability 0.
    """
    l0 = loss_original.to(torch.float32)
    l1 = loss_finetuned.to(torch.float32)
    safe = torch.where(l0 != 0, l0, torch.ones_like(l0))
    return torch.where(l0 != 0, (l0 - l1) / safe, torch.zeros_like(l0))


# ----------------------------------------------------------------------- reductions, metrics

def reduce(per_item: Tensor, valid: Tensor, reduction: str) -> Tensor:
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
    raise ValueError(f"reduction: got {reduction!r}, expected one of {V.REDUCTIONS}")


def masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``x`` over ``valid`` entries (0 when none), detached."""
    x = x.detach()
    total = torch.where(valid, x, torch.zeros_like(x)).sum()
    return total / valid.sum().clamp(min=1).to(x.dtype)


@dataclass
class SequenceStats:
    """Per-sequence quantities every reference loss is a function of, ``[B]`` each:
    ``S`` (policy log-prob sum, differentiable), ``S_ref`` (reference, detached), ``m``
    (unmasked tokens) and ``valid`` (``m > 0``)."""

    S: Tensor
    S_ref: Tensor
    m: Tensor
    valid: Tensor

    @property
    def r(self) -> Tensor:
        return self.S - self.S_ref

    def halves(self):
        """``(chosen, rejected)`` :class:`SequenceStats` of a ``[chosen; rejected]`` batch."""
        P = self.S.shape[0] // 2
        cut = lambda x: (x[:P], x[P:])  # noqa: E731
        (Sw, Sl), (Rw, Rl), (mw, ml), (vw, vl) = map(cut, (self.S, self.S_ref, self.m, self.valid))
        return SequenceStats(Sw, Rw, mw, vw), SequenceStats(Sl, Rl, ml, vl)


def minor_sft_metrics(s: SequenceStats) -> Dict[str, Tensor]:
    """``deviation = mean_i r_i / m_i`` (the paper's metric), mean ``logps`` / ``ref_logps``."""
    return {
        "deviation": masked_mean(s.r / _safe_len(s.m), s.valid),
        "logps": masked_mean(s.S, s.valid),
        "ref_logps": masked_mean(s.S_ref, s.valid),
    }


def dpo_metrics(w: SequenceStats, l: SequenceStats, valid: Tensor, beta: float) -> Dict[str, Tensor]:
    """TRL-named DPO metrics, means over valid pairs, detached."""
    rw, rl = beta * w.r.detach(), beta * l.r.detach()
    return {
        "rewards/chosen": masked_mean(rw, valid),
        "rewards/rejected": masked_mean(rl, valid),
        "rewards/accuracies": masked_mean((rw > rl).to(rw.dtype), valid),
        "rewards/margins": masked_mean(rw - rl, valid),
        "logps/chosen": masked_mean(w.S, valid),
        "logps/rejected": masked_mean(l.S, valid),
    }


# ----------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Option:
    """A loss option: its default, its check (value -> normalised value) and its help."""

    default: object
    check: Callable
    help: str


def _check_label_smoothing(eps) -> float:
    eps = V.check_real("label_smoothing", eps)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing: must be in [0, 0.5), got {eps}")
    return eps


OPTIONS: Dict[str, Option] = {
    "beta": Option(0.1, V.check_beta, "strength of the reference term (> 0)"),
    "length_norm": Option("outside", lambda v: V.checked_choice("length_norm", v, LENGTH_NORMS),
                          "MinorSFT length normalisation: outside (the paper), inside (TorchRL), none"),
    "loss_type": Option("sigmoid", lambda v: V.checked_choice("loss_type", v, DPO_LOSS_TYPES),
                        "DPO variant (TRL's names)"),
    "label_smoothing": Option(0.0, _check_label_smoothing,
                              "DPO sigmoid (conservative DPO) / robust label smoothing, in [0, 0.5)"),
}


@dataclass(frozen=True)
class Loss:
    """One row of :data:`LOSSES`.

    ``options``: the names in :data:`OPTIONS` the loss takes; ``reference``: it compares
    the policy with a reference; ``pairs``: batches are ``[chosen; rejected]``;
    ``metrics``: what ``return_metrics=True`` returns; ``progress``: the metrics a
    trainer shows while it runs; ``none_shape``: the shape of ``reduction="none"``.
    """

    name: str
    summary: str
    options: Tuple[str, ...]
    reference: bool
    pairs: bool
    metrics: Tuple[str, ...]
    progress: Tuple[str, ...]
    none_shape: str
    per_item: Optional[Callable] = None    # (SequenceStats, **options) -> ([K] loss, [K] valid)
    metric_fn: Optional[Callable] = None   # (SequenceStats, **options) -> metrics
    item_grad: Optional[Callable] = None   # (SequenceStats, **options) -> [B] dL_item/dS

    @property
    def token_level(self) -> bool:
        """A mean over tokens (``num_items_in_batch`` normalises it), not over sequences."""
        return self.per_item is None


def _minor_sft_items(s: SequenceStats, beta, length_norm):
    return minor_sft(s.r, s.m, beta, length_norm), s.valid


def _minor_sft_item_grad(s: SequenceStats, beta, length_norm):
    return minor_sft_grad(s.r, s.m, beta, length_norm)


def _pairs_valid(s: SequenceStats):
    w, l = s.halves()
    return w, l, w.valid & l.valid


def _dpo_items(s: SequenceStats, beta, loss_type, label_smoothing):
    w, l, valid = _pairs_valid(s)
    return dpo(w.r, l.r, w.m, l.m, beta, loss_type, label_smoothing), valid


def _minor_dpo_items(s: SequenceStats, beta):
    w, l, valid = _pairs_valid(s)
    return minor_dpo(w.r, l.r, beta), valid


def _dpo_item_grad(s: SequenceStats, beta, loss_type, label_smoothing):
    w, l, _ = _pairs_valid(s)
    return torch.cat(dpo_grad(w.r, l.r, w.m, l.m, beta, loss_type, label_smoothing))


def _minor_dpo_item_grad(s: SequenceStats, beta):
    w, l, _ = _pairs_valid(s)
    return torch.cat(minor_dpo_grad(w.r, l.r, beta))


def _dpo_metric_fn(s: SequenceStats, beta, **_):
    w, l, valid = _pairs_valid(s)
    return dpo_metrics(w, l, valid, beta)


_DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")
_SFT_METRICS = ("deviation", "logps", "ref_logps")

LOSSES: Dict[str, Loss] = {
    "sft": Loss("sft", "token-level cross-entropy", (), reference=False, pairs=False,
                metrics=(), progress=(), none_shape="[B, T]"),
    "minor_sft": Loss("minor_sft", "MinorSFT: SFT with a per-sample coefficient against the reference",
                      ("beta", "length_norm"), reference=True, pairs=False, metrics=_SFT_METRICS,
                      progress=("deviation",), none_shape="[B]", per_item=_minor_sft_items,
                      metric_fn=lambda s, **_: minor_sft_metrics(s), item_grad=_minor_sft_item_grad),
    "dpo": Loss("dpo", "DPO family (sigmoid, ipo, hinge, robust)",
                ("beta", "loss_type", "label_smoothing"), reference=True, pairs=True,
                metrics=_DPO_METRICS, progress=("rewards/accuracies", "rewards/margins"),
                none_shape="[P]", per_item=_dpo_items, metric_fn=_dpo_metric_fn,
                item_grad=_dpo_item_grad),
    "minor_dpo": Loss("minor_dpo", "MinorDPO: one-sided rejected penalty", ("beta",),
                      reference=True, pairs=True, metrics=_DPO_METRICS,
                      progress=("rewards/accuracies", "rewards/margins"), none_shape="[P]",
                      per_item=_minor_dpo_items, metric_fn=_dpo_metric_fn,
                      item_grad=_minor_dpo_item_grad),
}
LOSS_NAMES = tuple(LOSSES)


def get_loss(name: str) -> Loss:
    """The :data:`LOSSES` row called ``name`` (``ValueError`` naming ``loss`` otherwise)."""
    return LOSSES[V.checked_choice("loss", name, LOSS_NAMES)]


def check_options(loss: str, options: Mapping[str, object]) -> Dict[str, object]:
    """The options of ``loss``, checked and completed with their defaults.

    ``options`` may only hold names the loss takes; each value goes through its check
    (``ValueError`` / ``TypeError`` naming the option). Cross-option rules live here too:
    label smoothing is for the ``sigmoid`` and ``robust`` DPO types only.
    """
    spec = get_loss(loss)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"{unknown[0]}: not an option of the {loss!r} loss "
                         f"(its options: {list(spec.options) or 'none'})")
    out = {name: OPTIONS[name].check(options.get(name, OPTIONS[name].default))
           for name in spec.options}
    if out.get("label_smoothing") and out["loss_type"] not in ("sigmoid", "robust"):
        raise ValueError(
            f"label_smoothing: only the 'sigmoid' and 'robust' loss types use it, "
            f"got label_smoothing={out['label_smoothing']} with loss_type={out['loss_type']!r}")
    return out


# ----------------------------------------------------------------------- the shared epilogue

def check_num_items(loss: str, num_items_in_batch) -> None:
    """``num_items_in_batch`` is a token count: only token-level losses take one."""
    if num_items_in_batch is not None and not get_loss(loss).token_level:
        raise ValueError(f"num_items_in_batch: only the 'sft' loss takes a token count, got loss={loss!r}")


def reference_sums(mask: Tensor, ref_token_logps: Optional[Tensor],
                   ref_seq_logps: Optional[Tensor]) -> Tensor:
    """The ``[B]`` fp32 reference sums ``S_ref``, detached, from either form of the reference:
    ``[B, T]`` token log-probs summed over the ``[B, T]`` ``mask``, or ``[B]`` sums as given."""
    if ref_token_logps is not None:
        ref = ref_token_logps.detach().float()
        return torch.where(mask, ref, torch.zeros_like(ref)).sum(-1)
    return ref_seq_logps.detach().float()


def sequence_stats(S: Tensor, mask: Tensor, S_ref: Tensor) -> SequenceStats:
    """:class:`SequenceStats` from ``[B]`` sequence sums ``S`` and ``S_ref`` and the ``[B, T]``
    label mask (which gives the token counts)."""
    m = mask.sum(-1)
    return SequenceStats(S=S, S_ref=S_ref, m=m, valid=m > 0)


def _sft(logps: Tensor, mask: Tensor, reduction: str, num_items_in_batch) -> Tensor:
    if reduction == "none":
        return -logps
    total = -logps.sum()
    if reduction == "sum":
        return total
    denom = mask.sum() if num_items_in_batch is None else num_items_in_batch
    if isinstance(denom, Tensor):
        return total / denom.to(device=total.device, dtype=total.dtype).clamp(min=1)
    return total / max(int(denom), 1)


def loss_from_token_logprobs(
    loss: str,
    logps: Tensor,
    mask: Tensor,
    *,
    ref_token_logps: Optional[Tensor] = None,
    ref_seq_logps: Optional[Tensor] = None,
    reduction: str = "mean",
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
    return_metrics: bool = False,
    **options,
) -> LossOut:
    """The shared loss epilogue (logits path and fused linear path).

    Args:
        loss: a name in :data:`LOSSES` ("sft", "minor_sft", "dpo", "minor_dpo").
        logps: ``[B, T]`` fp32 per-token log-probs, 0 where masked, differentiable.
        mask: ``[B, T]`` bool, ``labels != ignore_index``.
        ref_token_logps: ``[B, T]`` reference log-probs (masked entries ignored), or
        ref_seq_logps: ``[B]`` reference per-sequence sums (one of the two, not for sft).
        reduction: "mean" (over sequences / pairs with at least one unmasked token;
            for sft over tokens, or ``num_items_in_batch``), "sum" or "none"
            (sft ``[B, T]``, minor_sft ``[B]``, DPO family ``[B/2]``).
        **options: the loss's options (:data:`OPTIONS`: ``beta``, ``length_norm``, ...).
    Returns:
        the loss, or ``(loss, metrics)`` with ``return_metrics=True`` (detached scalars).
    """
    spec = get_loss(loss)
    opts = check_options(loss, options)
    V.check_reduction(reduction)
    if spec.token_level:
        out = _sft(logps, mask, reduction, num_items_in_batch)
        return (out, {}) if return_metrics else out
    check_num_items(loss, num_items_in_batch)
    if spec.pairs:
        V.check_pairs(logps.shape[0])
    stats = sequence_stats(logps.sum(-1), mask, reference_sums(mask, ref_token_logps, ref_seq_logps))
    per, valid = spec.per_item(stats, **opts)
    out = reduce(per, valid, reduction)
    return (out, spec.metric_fn(stats, **opts)) if return_metrics else out


class Coefficients:
    """A scalar loss's gradient coefficients for part of its batch, for the fused linear
    path, which forms the gradient chunk by chunk in the forward.

    ``coefficients(ids, S) -> (dL/dS [k], loss part [])``: ``ids`` a ``[k]`` device tensor
    of sequence indices (whole pairs for a pair loss), ``S`` their log-prob sums; the parts
    of all chunks sum to the loss, and ``dL/dS`` is the per-sequence coefficient that the
    chunk's gradient needs (the closed forms of :data:`LOSSES` ``item_grad``: this runs
    inside a custom op, where autograd is off; the tests hold them to autograd). The
    reduction's denominator is the whole batch's, computed here once (no host sync). A
    token-level loss (``token_level``) has one coefficient for every scored token:
    ``coefficients(None, sum of log-probs) -> (dL/dlp, loss part)``.

    Args:
        S_ref: ``[B]`` reference per-sequence sums (detached); m: ``[B]`` scored tokens;
        num_items: the token count of a token-level mean (``num_items_in_batch``: a
            tensor, so that nothing here copies from the host) or None.
    """

    def __init__(self, loss: str, options: Mapping[str, object], reduction: str,
                 S_ref: Optional[Tensor], m: Tensor, num_items=None):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction: the coefficients need a scalar loss, got {reduction!r}")
        self.spec, self.opts, self.m = get_loss(loss), dict(options), m
        self.token_level = self.spec.token_level
        self.S_ref, self.valid, self.P = S_ref, m > 0, m.shape[0] // 2
        if self.token_level:
            denom = (m.sum() if num_items is None else num_items).to(device=m.device, dtype=torch.float32)
            # torch.full: a fill on the device (torch.tensor would copy from the host: a sync)
            self.scale = (-1.0 / denom.clamp(min=1) if reduction == "mean"
                          else torch.full((), -1.0, dtype=torch.float32, device=m.device))
            return
        items = (self.valid[: self.P] & self.valid[self.P:]) if self.spec.pairs else self.valid
        self.denom = items.sum().clamp(min=1).to(torch.float32) if reduction == "mean" else 1.0

    def __call__(self, ids: Optional[Tensor], S: Tensor):
        if self.token_level:
            return self.scale, self.scale * S
        # pairs: chosen (k < P) before rejected (P + k), each ascending, so item i pairs
        # chosen i with rejected i; on the device: no host round trip per chunk
        pos = torch.argsort(ids) if self.spec.pairs else torch.arange(ids.shape[0], device=ids.device)
        idx = ids[pos]
        stats = SequenceStats(S.detach().float()[pos], self.S_ref[idx].float(), self.m[idx],
                              self.valid[idx])
        per, ok = self.spec.per_item(stats, **self.opts)
        part = torch.where(ok, per, torch.zeros_like(per)).sum() / self.denom
        ok_seq = ok.repeat(2) if self.spec.pairs else ok   # an item's gradient reaches its sequences
        dS_sorted = torch.where(ok_seq, self.spec.item_grad(stats, **self.opts), 0.0) / self.denom
        dS = torch.empty_like(dS_sorted)
        dS[pos] = dS_sorted
        return dS, part
