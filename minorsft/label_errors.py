"""Labels that are no token, found without a host synchronisation.

A label outside ``[0, V)`` that is not ``ignore_index`` is never used as an address: the
kernels give it a NaN log-prob, and every forward also adds it to a per-device flag, an
int64 ``[2]`` tensor (how many such labels, and one of their values) written by the
kernel itself, so the loss path never waits for the device. A training loop reads the
flag where it synchronises anyway (its logging), with :func:`take_label_errors` after
each step (device-side, no sync) and :func:`raise_label_errors` when it reads the
values; :func:`check_label_errors` does both at once.

The eager label check (``check_labels``, :func:`minorsft.validation.check_labels_range`)
stays the default on the CPU, where reading the labels costs nothing.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch

_FLAGS: Dict[torch.device, torch.Tensor] = {}


def _device(device) -> torch.device:
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def label_flag(device) -> torch.Tensor:
    """The int64 ``[2]`` flag of ``device`` (bad-label count, one bad value) that the
    forward ops add to; created (zero) on first use."""
    device = _device(device)
    flag = _FLAGS.get(device)
    if flag is None:
        flag = _FLAGS[device] = torch.zeros(2, dtype=torch.int64, device=device)
    return flag


def take_label_errors(device=None) -> torch.Tensor:
    """The flag's current value (a new int64 ``[2]`` tensor on ``device``: count, one bad
    value) and reset it to 0; device-side only, no host synchronisation."""
    flag = label_flag(device)
    taken = flag.clone()
    flag.zero_()
    return taken


def raise_label_errors(errors: Union[torch.Tensor, list], where: str = "",
                       vocab: Optional[int] = None) -> None:
    """``ValueError`` if ``errors`` (as :func:`take_label_errors` returns, or its values)
    counts a bad label; ``where`` (e.g. "step 12") and ``vocab`` go into the message.
    Reading a device tensor here is one host synchronisation."""
    count, value = (int(x) for x in (errors.tolist() if torch.is_tensor(errors) else errors))
    if count:
        rng = f"[0, V={vocab})" if vocab is not None else "[0, V)"
        at = f" at {where}" if where else ""
        raise ValueError(f"labels: {count} label(s) outside {rng} that are not ignore_index{at} "
                         f"(e.g. {value}); their log-probs are NaN")


def record_bad_labels(labels: torch.Tensor, vocab: int, ignore_index: int,
                      flag: Optional[torch.Tensor]) -> None:
    """Add the labels outside ``[0, vocab)`` (not ``ignore_index``) to the int64 ``[2]``
    ``flag`` (count, one bad value), with tensor ops only: no host synchronisation."""
    if flag is None or labels.numel() == 0:
        return
    bad = ((labels != ignore_index) & ((labels < 0) | (labels >= vocab))).flatten()
    flag[0] += bad.sum()
    first = labels.flatten()[torch.argmax(bad.to(torch.int32))].long()
    flag[1] = torch.where(bad.any(), first, flag[1])


def check_label_errors(device=None, where: str = "", vocab: Optional[int] = None) -> None:
    """:func:`take_label_errors` then :func:`raise_label_errors`: call it where your loop
    already synchronises (e.g. when it logs)."""
    raise_label_errors(take_label_errors(device), where, vocab)
