"""``nn.Module`` forms of the losses of both paths: options in the constructor, tensors
in ``forward``. They hold no parameters and no state.

Every module is a :class:`FusedLoss`: a public loss function (``fn``) plus the options
it was built with. The constructor takes exactly the function's keyword options (its
signature is the function's) and checks them at once, so a bad ``beta`` or ``reduction``
fails where the module is built, not at its first forward. ``forward`` takes the
function's tensors, positionally in the order of ``inputs`` or by name.
"""
from __future__ import annotations

import inspect
from typing import Callable, Tuple

from torch import nn

from minorsft import functional as F
from minorsft import linear as L
from minorsft import losses
from minorsft import validation as V
from minorsft.ops import BACKENDS


def check_call_options(loss: str, options: dict) -> None:
    """Check the options of a loss call without tensors (what a module's constructor can know)."""
    losses.check_options(loss, {k: v for k, v in options.items() if k in losses.OPTIONS})
    if "reduction" in options:
        V.check_reduction(options["reduction"])
    if "temperature" in options:
        V.check_positive("temperature", options["temperature"])
    if "ignore_index" in options and (not isinstance(options["ignore_index"], int)
                                      or isinstance(options["ignore_index"], bool)):
        raise TypeError(f"ignore_index: must be an int, got {type(options['ignore_index']).__name__}")
    if options.get("backend") is not None:
        V.check_choice("backend", options["backend"], BACKENDS)
    if "memory_budget" in options:
        V.check_memory_budget(options["memory_budget"])
    for flag in ("return_metrics", "inplace_backward", "shift"):
        if flag in options:
            V.check_flag(flag, options[flag])


class FusedLoss(nn.Module):
    """Base of every loss module: ``fn`` (a public loss function), ``loss`` (its
    :data:`minorsft.losses.LOSSES` name) and ``inputs`` (the tensor arguments ``forward``
    takes positionally)."""

    fn: Callable = None
    loss: str = None
    inputs: Tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        params = [p for p in inspect.signature(cls.fn).parameters.values()
                  if p.kind is p.KEYWORD_ONLY and p.name not in cls.inputs]
        cls._option_names = tuple(p.name for p in params)

        def __init__(self, **options):
            FusedLoss.__init__(self, **options)

        __init__.__signature__ = inspect.Signature(
            [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + params)
        __init__.__doc__ = f"Options of :func:`{cls.fn.__name__}` (checked here)."
        cls.__init__ = __init__

    def __init__(self, **options):
        super().__init__()
        unknown = sorted(set(options) - set(self._option_names))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected option {unknown[0]!r} "
                            f"(options: {', '.join(self._option_names)})")
        check_call_options(self.loss, options)
        self.options = options

    def forward(self, *tensors, **named):
        if len(tensors) > len(self.inputs):
            raise TypeError(f"{type(self).__name__}.forward takes at most {len(self.inputs)} "
                            f"tensors ({', '.join(self.inputs)}), got {len(tensors)}")
        for name, value in zip(self.inputs, tensors):
            if name in named:
                raise TypeError(f"{type(self).__name__}.forward: {name} given twice")
            named[name] = value
        return type(self).fn(**named, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


_LOGITS = ("logits", "labels")
_LOGITS_REF = _LOGITS + ("ref_logits", "ref_logprobs")
_LINEAR = ("hidden", "weight", "labels", "bias")
_LINEAR_REF = _LINEAR + ("ref_hidden", "ref_weight", "ref_bias", "ref_logprobs")


class SFTLoss(FusedLoss):
    """Token-level cross-entropy (:func:`minorsft.sft_loss`);
    ``forward(logits [B,T,V], labels [B,T], num_items_in_batch=None)``."""

    fn, loss, inputs = staticmethod(F.sft_loss), "sft", _LOGITS + ("num_items_in_batch",)


class MinorSFTLoss(FusedLoss):
    """MinorSFT (:func:`minorsft.minor_sft_loss`);
    ``forward(logits [B,T,V], labels [B,T], ref_logits=None, ref_logprobs=None)``."""

    fn, loss, inputs = staticmethod(F.minor_sft_loss), "minor_sft", _LOGITS_REF


class MinorDPOLoss(FusedLoss):
    """MinorDPO (:func:`minorsft.minor_dpo_loss`); logits ``[2P,T,V]`` chosen then rejected."""

    fn, loss, inputs = staticmethod(F.minor_dpo_loss), "minor_dpo", _LOGITS_REF


class DPOLoss(FusedLoss):
    """DPO family (:func:`minorsft.dpo_loss`); logits ``[2P,T,V]`` chosen then rejected."""

    fn, loss, inputs = staticmethod(F.dpo_loss), "dpo", _LOGITS_REF


class LinearSFTLoss(FusedLoss):
    """Token-level cross-entropy from hidden states (:func:`minorsft.linear_sft_loss`);
    ``forward(hidden [B,T,H], weight [V,H], labels [B,T], bias=None, num_items_in_batch=None)``."""

    fn, loss, inputs = staticmethod(L.linear_sft_loss), "sft", _LINEAR + ("num_items_in_batch",)


class LinearMinorSFTLoss(FusedLoss):
    """MinorSFT from hidden states (:func:`minorsft.linear_minor_sft_loss`); ``forward(hidden,
    weight, labels, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None, ref_logprobs=None)``."""

    fn, loss, inputs = staticmethod(L.linear_minor_sft_loss), "minor_sft", _LINEAR_REF


class LinearMinorDPOLoss(FusedLoss):
    """MinorDPO from hidden states (:func:`minorsft.linear_minor_dpo_loss`); rows chosen then rejected."""

    fn, loss, inputs = staticmethod(L.linear_minor_dpo_loss), "minor_dpo", _LINEAR_REF


class LinearDPOLoss(FusedLoss):
    """DPO family from hidden states (:func:`minorsft.linear_dpo_loss`); rows chosen then rejected."""

    fn, loss, inputs = staticmethod(L.linear_dpo_loss), "dpo", _LINEAR_REF
