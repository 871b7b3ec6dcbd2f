"""The per-step loss plumbing: a batch in, the fused loss (and its metrics) out.

The policy (and, without precomputed reference log-probs, the frozen reference) run on
the batch; their logits, or with ``fused_linear`` their final hidden states and lm_head,
go to the library's loss named in the :class:`LossSetup` (``ms.fused_loss`` /
``ms.linear_fused_loss``: one call for any loss of ``ms.LOSSES``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

import minorsft as ms
from minorsft.train import data as D
from minorsft.train.config import LOGIT_TRANSFORMS


@dataclass(frozen=True)
class LossSetup:
    """What a step needs to know about the loss: its name and options, the temperature,
    the backend, the path (logits or fused linear; with the model's logit transform) and
    whether SFT tracks the deviation."""

    loss: str
    options: dict = field(default_factory=dict)
    temperature: float = 1.0
    backend: Optional[str] = None
    fused_linear: bool = False
    track_deviation: bool = False
    transform: dict = field(default_factory=dict)   # softcap / logit_scale (fused linear)

    @classmethod
    def from_config(cls, cfg, model=None) -> "LossSetup":
        """From a :class:`~minorsft.train.config.TrainConfig` (and, for the fused linear
        path, the model whose logit transform to apply)."""
        transform = logit_transform(model) if cfg.fused_linear and model is not None else {}
        return cls(cfg.loss, cfg.loss_options(), cfg.temperature, cfg.backend, cfg.fused_linear,
                   cfg.track_deviation, transform)

    @property
    def spec(self):
        return ms.LOSSES[self.loss]


def logit_transform(model) -> dict:
    """``{"softcap", "logit_scale"}`` for the fused linear path, read from the model's
    config: Gemma's ``final_logit_softcapping``, Cohere's ``logit_scale`` (logits times it),
    Granite's ``logits_scaling`` (logits divided by it). Any other logit transform in
    :data:`~minorsft.train.config.LOGIT_TRANSFORMS` is refused (``ValueError``)."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    values = {name: getattr(cfg, name, None) for name in LOGIT_TRANSFORMS}
    set_ = {k: v for k, v in values.items() if v not in (None, 1, 1.0)}
    unknown = sorted(set(set_) - {"final_logit_softcapping", "logit_scale", "logits_scaling"})
    if unknown:
        raise ValueError(f"fused_linear: the model's config sets {unknown[0]}={set_[unknown[0]]!r}, a "
                         "logit transform the fused linear loss does not apply")
    scale = float(values["logit_scale"] or 1.0) / float(values["logits_scaling"] or 1.0)
    return {"softcap": values["final_logit_softcapping"] or None, "logit_scale": scale}


def hidden_states(model, unwrapped, fwd: dict) -> torch.Tensor:
    """Final (normed) hidden states ``[B, T, H]`` from the decoder, captured by a forward
    hook while the (possibly DDP-wrapped) model runs with ``logits_to_keep=1``, so the
    full logits are never formed."""
    captured = {}

    def hook(_module, _inputs, output):
        captured["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = unwrapped.get_decoder().register_forward_hook(hook)
    try:
        model(**fwd, logits_to_keep=1)
    finally:
        handle.remove()
    return captured["h"]


def _device(module) -> torch.device:
    return next(module.parameters()).device


def _head(model, dtype, device):
    """``(weight, bias)`` of the lm_head on ``device``; an FSDP2-sharded weight is gathered
    (``full_tensor``, differentiable). An fp32 head with ``dtype`` activations (autocast)
    stays fp32: the fused linear path computes in the activations' dtype itself and
    returns the fp32 gradient; any other mismatch is cast to ``dtype``."""
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    target = weight.dtype if weight.dtype in (dtype, torch.float32) else dtype
    if weight.dtype != target or weight.device != device:
        weight = weight.to(device, target)
        bias = bias.to(device, target) if bias is not None else None
    return weight, bias


def policy_and_reference(setup: LossSetup, model, unwrapped, ref_model, fwd: dict):
    """``(call, tensors, ref_tensors)``: the library loss to call (``ms.fused_loss`` or
    ``ms.linear_fused_loss``), the policy's full-length tensors for it (the call takes
    ``shift=True``: no vocabulary-sized slice) and the reference's keyword tensors (empty
    without a live reference model; ``ref_model`` lives on the policy's device, see
    :func:`reference_sums_elsewhere` for one that does not)."""
    ref_kw = {}
    if not setup.fused_linear:
        logits = model(**fwd).logits
        if ref_model is not None:
            with torch.no_grad():
                ref_kw["ref_logits"] = ref_model(**fwd).logits   # any float dtype: no cast
        return ms.fused_loss, (logits,), ref_kw
    hidden = hidden_states(model, unwrapped, fwd)
    weight, bias = _head(unwrapped, hidden.dtype, hidden.device)
    if ref_model is not None:
        with torch.no_grad():
            rh = hidden_states(ref_model, ref_model, fwd).to(dtype=hidden.dtype)
            rw, rb = _head(ref_model, rh.dtype, rh.device)
        ref_kw = {"ref_hidden": rh, "ref_weight": rw, "ref_bias": rb}
    return ms.linear_fused_loss, (hidden, weight), {"bias": bias, **ref_kw}


def reference_sums_elsewhere(setup: LossSetup, ref_model, fwd: dict, labels) -> torch.Tensor:
    """``[B]`` reference sums of a reference model on another device than the policy,
    computed on its own device: only ``B`` floats cross, not its ``[B, T, V]`` logits (or
    its hidden states and lm_head on the fused linear path) at every micro-step."""
    dev = _device(ref_model)
    fwd, ref_labels = {k: v.to(dev) for k, v in fwd.items()}, labels.to(dev)
    with torch.no_grad():
        if setup.fused_linear:
            h = hidden_states(ref_model, ref_model, fwd)
            w, b = _head(ref_model, h.dtype, h.device)
            lp = ms.linear_token_logprobs(h, w, ref_labels, bias=b, **_common(setup))
        else:
            lp = ms.token_logprobs(ref_model(**fwd).logits, ref_labels, **_common(setup))
    return lp.sum(-1).to(labels.device)


def _token_fn(setup: LossSetup):
    return ms.linear_token_logprobs if setup.fused_linear else ms.token_logprobs


def _common(setup: LossSetup) -> dict:
    """Options of every library call of a step: Hugging Face labels (``shift``), no eager
    label check (a host sync: the loop reads the label flag when it logs), and on the
    fused linear path the model's logit transform."""
    return dict(backend=setup.backend, temperature=setup.temperature, check_labels=False,
                shift=True, **setup.transform)


def _deviation(setup: LossSetup, ref_kw: dict, labels, lp_policy, ref_logps):
    """The MinorSFT deviation metric of an SFT step (detached, no gradient)."""
    common = _common(setup)
    with torch.no_grad():
        if ref_kw:
            if "ref_logits" in ref_kw:
                rargs, rkw = (ref_kw["ref_logits"],), {}
            else:
                rargs, rkw = (ref_kw["ref_hidden"], ref_kw["ref_weight"]), {"bias": ref_kw["ref_bias"]}
            ref_logps = _token_fn(setup)(*rargs, labels, **rkw, **common).sum(-1)
        stats = ms.losses.sequence_stats(lp_policy.detach().sum(-1), labels[:, 1:] != D.IGNORE_INDEX,
                                         ref_logps.float())
    return ms.losses.minor_sft_metrics(stats)["deviation"]


def compute_loss(setup: LossSetup, model, batch: dict, *, ref_model=None, ref_logps=None,
                 denom=None, num_items=None, unwrapped=None):
    """Forward the policy (and the reference) on ``batch`` and return ``(loss, metrics)``.

    ``batch``: ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` on the device
    (for pairs ``B = 2P``, chosen rows first), Hugging Face labels: position ``t``
    predicts ``labels[:, t + 1]`` (the library's ``shift=True``). ``ref_logps``: ``[B]`` precomputed per-sequence
    reference sums (or None with ``ref_model``). ``sft`` divides by ``num_items`` (global
    label tokens); the others sum over sequences (pairs) and divide by ``denom``.
    ``unwrapped``: the model under a DDP wrapper (for the fused linear path).
    Metrics are detached tensors (no host sync): the loss's metrics (for ``sft`` with a
    reference, the deviation).
    """
    labels = batch["labels"]
    fwd = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    live_ref = ref_model if (setup.spec.reference or setup.track_deviation) and ref_logps is None else None
    if live_ref is not None and _device(live_ref) != labels.device:
        ref_logps, live_ref = reference_sums_elsewhere(setup, live_ref, fwd, labels), None
    call, tensors, kw = policy_and_reference(setup, model, unwrapped or model, live_ref, fwd)
    common = _common(setup)
    if setup.spec.token_level:
        ref_kw = {k: v for k, v in kw.items() if k.startswith("ref_")}
        kw = {k: v for k, v in kw.items() if not k.startswith("ref_")}
        sft = dict(reduction="mean", num_items_in_batch=num_items)
        if not ref_kw and ref_logps is None:
            # the library's own call: on the fused linear path its gradient-in-forward plan
            return call(setup.loss, *tensors, labels, **sft, **kw, **common), {}
        # the deviation metric needs the per-token log-probs themselves
        lp = _token_fn(setup)(*tensors, labels, **kw, **common)
        loss = ms.loss_from_token_logprobs(setup.loss, lp, labels[:, 1:] != D.IGNORE_INDEX, **sft)
        return loss, {"deviation": _deviation(setup, ref_kw, labels, lp, ref_logps)}
    loss, m = call(setup.loss, *tensors, labels, ref_logprobs=ref_logps, reduction="sum",
                   return_metrics=True, **kw, **setup.options, **common)
    if denom is not None:
        loss = loss / denom
    return loss, m
