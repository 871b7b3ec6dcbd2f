"""The training app: config, loop, per-step loss plumbing, evaluation, metrics, data,
checkpoints, distributed setup, the reference model and its cache, the tiny built-in
model. It reaches the loss library only through its public names (``import minorsft as
ms``); nothing in the library imports it.

``from minorsft.train import TrainConfig, train`` is the Python entry point of
``minorsft train``.
"""
from minorsft.train.config import ConfigError, TrainConfig, validate_config
from minorsft.train.loop import check_config, train

__all__ = ["TrainConfig", "ConfigError", "train", "check_config", "validate_config"]
