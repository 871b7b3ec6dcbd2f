"""The training app: config, loop, per-step loss plumbing, evaluation, metrics, data,
checkpoints, distributed setup, the reference model and its cache, the tiny built-in
model; and the commands built on the loop: LoBaSS data selection (:func:`select`), SPIN
self-play rounds (:func:`spin`) and multi-stage recipes (:func:`run_recipe`). It reaches
the loss library only through its public names (``import minorsft as ms``); nothing in
the library imports it.

``from minorsft.train import TrainConfig, train`` is the Python entry point of
``minorsft train``; ``SelectConfig`` / ``select``, ``SpinConfig`` / ``spin`` and
``run_recipe`` those of ``minorsft select``, ``spin`` and ``recipe``.
"""
from minorsft.train.config import ConfigError, TrainConfig, validate_config
from minorsft.train.loop import check_config, train
from minorsft.train.lobass import SelectConfig, select
from minorsft.train.recipe import RecipeConfig, RecipeError, load_recipe, plan_recipe, run_recipe
from minorsft.train.selfplay import SpinConfig, spin

__all__ = ["TrainConfig", "ConfigError", "train", "check_config", "validate_config",
           "SelectConfig", "select", "SpinConfig", "spin", "RecipeConfig", "RecipeError",
           "load_recipe", "plan_recipe", "run_recipe"]
