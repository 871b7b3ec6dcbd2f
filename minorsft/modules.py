"""``nn.Module`` forms of the logits-path losses: options in the constructor,
tensors in ``forward``. They hold no parameters and no state."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from minorsft import functional as F


class SFTLoss(nn.Module):
    """Token-level cross-entropy; ``forward(logits [B,T,V], labels [B,T], num_items_in_batch=None)``."""

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", temperature: float = 1.0,
                 backend: Optional[str] = None, inplace_backward: bool = False):
        super().__init__()
        self.opts = dict(ignore_index=ignore_index, reduction=reduction, temperature=temperature,
                         backend=backend, inplace_backward=inplace_backward)

    def forward(self, logits: Tensor, labels: Tensor, num_items_in_batch=None) -> Tensor:
        return F.sft_loss(logits, labels, num_items_in_batch=num_items_in_batch, **self.opts)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.opts.items())


class _RefLoss(nn.Module):
    """Shared body: ``forward(logits, labels, ref_logits=None, ref_logprobs=None)``."""

    _fn = None

    def __init__(self, **opts):
        super().__init__()
        self.opts = opts

    def forward(self, logits: Tensor, labels: Tensor, ref_logits: Optional[Tensor] = None,
                ref_logprobs: Optional[Tensor] = None):
        return type(self)._fn(logits, labels, ref_logits=ref_logits, ref_logprobs=ref_logprobs,
                              **self.opts)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.opts.items())


class MinorSFTLoss(_RefLoss):
    """MinorSFT (see :func:`minorsft.minor_sft_loss`); logits ``[B,T,V]``, labels ``[B,T]``."""

    _fn = staticmethod(F.minor_sft_loss)

    def __init__(self, *, beta: float = 0.1, length_norm: str = "outside", ignore_index: int = -100,
                 reduction: str = "mean", temperature: float = 1.0, return_metrics: bool = False,
                 backend: Optional[str] = None, inplace_backward: bool = False):
        super().__init__(beta=beta, length_norm=length_norm, ignore_index=ignore_index,
                         reduction=reduction, temperature=temperature, return_metrics=return_metrics,
                         backend=backend, inplace_backward=inplace_backward)


class MinorDPOLoss(_RefLoss):
    """MinorDPO (see :func:`minorsft.minor_dpo_loss`); logits ``[2P,T,V]`` chosen then rejected."""

    _fn = staticmethod(F.minor_dpo_loss)

    def __init__(self, *, beta: float = 0.1, ignore_index: int = -100, reduction: str = "mean",
                 temperature: float = 1.0, return_metrics: bool = False,
                 backend: Optional[str] = None, inplace_backward: bool = False):
        super().__init__(beta=beta, ignore_index=ignore_index, reduction=reduction,
                         temperature=temperature, return_metrics=return_metrics, backend=backend,
                         inplace_backward=inplace_backward)


class DPOLoss(_RefLoss):
    """DPO family (see :func:`minorsft.dpo_loss`); logits ``[2P,T,V]`` chosen then rejected."""

    _fn = staticmethod(F.dpo_loss)

    def __init__(self, *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean", temperature: float = 1.0,
                 return_metrics: bool = False, backend: Optional[str] = None,
                 inplace_backward: bool = False):
        super().__init__(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                         ignore_index=ignore_index, reduction=reduction, temperature=temperature,
                         return_metrics=return_metrics, backend=backend,
                         inplace_backward=inplace_backward)
