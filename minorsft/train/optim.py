"""AdamW and the learning-rate schedule of a training run."""
from __future__ import annotations

import math
from typing import Callable

import torch


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of step ``s`` (0-based): linear warmup over
    ``warmup_steps``, then ``cosine`` (to 0), ``linear`` (to 0) or ``constant``."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def build_optimizer(params, *, lr: float, weight_decay: float, schedule: str, warmup_steps: int,
                    total_steps: int):
    """``(AdamW, LambdaLR)`` for ``params``."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup_steps, total_steps))
    return optimizer, scheduler
