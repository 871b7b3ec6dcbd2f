"""The training app: config, loop, data, checkpoints, distributed setup, the reference
model and its cache, the tiny built-in model. It reaches the loss library only through
its public functions (``import minorsft as ms``)."""
from minorsft.train.loop import TrainConfig, check_config, train, validate_config

__all__ = ["TrainConfig", "train", "check_config", "validate_config"]
