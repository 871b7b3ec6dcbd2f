"""The training configuration, declared once.

:class:`TrainConfig` is a dataclass whose fields carry their help text, choices, check,
CLI group and whether a ``--resume`` must match the checkpoint (``metadata``). From it:
:func:`validate_config` (every field's check, then the rules between fields),
:func:`resume_fields` (what a checkpoint records and a resume compares), and the
``minorsft train`` parser (:func:`add_arguments`, :func:`config_from_args`) and its
inverse (:func:`config_to_argv`, the command that resumes a run). A flag is declared in
one place: its field.

Errors are :class:`ConfigError` naming the field (``beta: must be ...``); the CLI
prints the same message with the flag's spelling (``--beta: must be ...``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import minorsft as ms

SCHEDULES = ("cosine", "linear", "constant")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config attributes of models whose logits are not plain `hidden @ W^T (+ b)`.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class ConfigError(ValueError):
    """A configuration value that cannot be used; ``field`` names the config field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


# ------------------------------------------------------------------ value checks
# Each takes the value and raises ValueError with a message that names no field.

def _number(value, integer: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (integer and not float(value).is_integer()):
        raise ValueError(f"must be {'an integer' if integer else 'a finite number'}, got {value!r}")


def positive_int(value) -> None:
    _number(value, True)
    if value <= 0:
        raise ValueError(f"must be a positive integer, got {value!r}")


def nonneg_int(value) -> None:
    _number(value, True)
    if value < 0:
        raise ValueError(f"must be a non-negative integer, got {value!r}")


def positive_float(value) -> None:
    _number(value, False)
    if value <= 0:
        raise ValueError(f"must be a positive number, got {value!r}")


def unit_interval(value) -> None:
    """A fraction or probability in ``(0, 1]``."""
    positive_float(value)
    if value > 1:
        raise ValueError(f"must be in (0, 1], got {value!r}")


def nonneg_float(value) -> None:
    _number(value, False)
    if value < 0:
        raise ValueError(f"must be a non-negative number, got {value!r}")


def existing_path(value) -> None:
    if not os.path.exists(value):
        raise ValueError(f"no such file or directory: {value}")


# A Hugging Face model folder has config.json and one of these (sharded: the index).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def model_path(value) -> None:
    """``"tiny"``, or a local Hugging Face model folder: config.json and weights."""
    if value == "tiny":
        return
    existing_path(value)
    if not os.path.isdir(value):
        raise ValueError(f"{value} is a file; expected a Hugging Face model folder "
                         f"(config.json and weights) or 'tiny'")
    if not os.path.isfile(os.path.join(value, "config.json")):
        raise ValueError(f"{value} holds no model: config.json is missing")
    if not any(os.path.isfile(os.path.join(value, w)) for w in WEIGHT_FILES):
        raise ValueError(f"{value} holds no model weights (none of {', '.join(WEIGHT_FILES)})")


def device_name(value) -> None:
    try:
        dev = torch.device(value)
    except RuntimeError:
        raise ValueError(f"not a device: {value!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{value}: CUDA is not available")


def loss_option(name: str) -> Callable:
    """The library's own check of a loss option (``minorsft.losses.OPTIONS``)."""
    def check(value):
        try:
            ms.losses.OPTIONS[name].check(value)
        except (TypeError, ValueError) as e:
            raise ValueError(str(e).split(": ", 1)[-1]) from None
    return check


def option(default, help: str, *, group: str, check: Optional[Callable] = None, choices=None,
           resume=False, type=None, required=False, positional=False, cli=True):
    """A config field (:class:`TrainConfig`, and the other commands' configs): ``default``
    plus what the parser, the validation and the resume check need (``type``: the CLI value
    type when ``default`` is None). ``resume``: ``True`` when it changes the trajectory (a
    resume must match the checkpoint), ``"extend"`` for the run's length (a resume may
    change it, but not end before the checkpoint's step), ``False`` otherwise.
    ``required``: None is refused (the default stays None so that a missing value is one
    clear error, not a TypeError). ``positional``: a positional CLI argument (``FILE``).
    ``cli=False``: no flag (a field another command sets itself)."""
    return field(default=default, metadata=dict(help=help, group=group, check=check,
                                                 choices=choices, resume=resume, type=type,
                                                 required=required, positional=positional, cli=cli))


def same_as(cls, name: str, **changes):
    """The field ``name`` of the config class ``cls`` (its default, help, checks), declared
    there once and reused by another command's config; ``changes`` replace metadata
    entries (e.g. ``group=``)."""
    f = cls.__dataclass_fields__[name]
    return field(default=f.default, metadata={**f.metadata, **changes})


def _loss_field(name: str, *, choices=None):
    opt = ms.losses.OPTIONS[name]
    return option(opt.default, opt.help, group="loss", check=loss_option(name), choices=choices,
                  resume=True)


@dataclass
class TrainConfig:
    """Everything :func:`minorsft.train.train` needs; one ``minorsft train`` flag per field
    (``grad_accum`` is ``--grad-accum``). See each field's help (``minorsft train --help``)."""

    # loss
    loss: str = option("minor_sft", "the training loss", group="loss", choices=ms.losses.LOSS_NAMES,
                       resume=True)
    loss_type: str = _loss_field("loss_type", choices=ms.losses.DPO_LOSS_TYPES)
    beta: float = _loss_field("beta")
    length_norm: str = _loss_field("length_norm", choices=ms.losses.LENGTH_NORMS)
    label_smoothing: float = _loss_field("label_smoothing")
    temperature: float = option(1.0, "divides the logits (policy and reference)", group="loss",
                                check=positive_float, resume=True)
    backend: Optional[str] = option(None, "loss backend (default: triton on CUDA, torch on CPU)",
                                    group="loss", choices=ms.BACKENDS, resume=True, type=str)
    fused_linear: bool = option(False, "compute the loss from the hidden states and the lm_head "
                                "weight: the logits are never formed", group="loss", resume=True)
    # model and data
    model: Optional[str] = option(None, "local Hugging Face model directory, or 'tiny' (the "
                                  "built-in tiny model, the default)", group="model and data",
                                  check=model_path, resume=True, type=str)
    tiny_seed: int = option(0, "initialisation seed of the built-in tiny model",
                            group="model and data", check=nonneg_int, resume=True)
    data: Optional[str] = option(None, "JSONL file or `datasets` directory (default: the "
                                 "synthetic task set)", group="model and data", check=existing_path,
                                 resume=True, type=str)
    eval_data: Optional[str] = option(None, "held-out data, same formats as --data",
                                      group="model and data", check=existing_path, type=str)
    max_length: int = option(512, "tokens per sequence (responses are cut from the right)",
                             group="model and data", check=positive_int, resume=True)
    skip_bad_rows: bool = option(False, "skip and count bad rows instead of failing",
                                 group="model and data", resume=True)
    # optimisation
    batch_size: int = option(8, "sequences (pairs for the DPO family) per rank and micro-batch",
                             group="optimisation", check=positive_int, resume=True)
    grad_accum: int = option(1, "micro-batches per optimiser step", group="optimisation",
                             check=positive_int, resume=True)
    lr: float = option(1e-5, "peak learning rate (AdamW)", group="optimisation",
                       check=positive_float, resume=True)
    weight_decay: float = option(0.0, "AdamW weight decay", group="optimisation",
                                 check=nonneg_float, resume=True)
    warmup_steps: int = option(0, "linear warmup steps", group="optimisation", check=nonneg_int,
                               resume=True)
    schedule: str = option("cosine", "learning-rate schedule after warmup", group="optimisation",
                           choices=SCHEDULES, resume=True)
    max_steps: Optional[int] = option(None, "optimiser steps (default: --epochs over the data); "
                                      "a resume may extend it", group="optimisation",
                                      check=positive_int, resume="extend", type=int)
    epochs: float = option(1.0, "passes over the data when --max-steps is not given; a resume "
                           "may extend it", group="optimisation", check=positive_float,
                           resume="extend")
    clip_grad: Optional[float] = option(1.0, "gradient-norm clipping (0 or None: off)",
                                        group="optimisation", check=nonneg_float, resume=True,
                                        type=float)
    bf16: bool = option(True, "bf16 autocast on CUDA (ignored on CPU)", group="optimisation",
                        resume=True)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward",
                                          group="optimisation")
    seed: int = option(0, "data order and initialisation seed", group="optimisation",
                       check=nonneg_int, resume=True)
    skip_nonfinite: int = option(0, "skip up to N optimiser steps whose loss or gradient norm is "
                                 "not finite, logged (0: the first one stops the run and nothing "
                                 "of it is saved)", group="optimisation", check=nonneg_int)
    device: Optional[str] = option(None, "device (default: this rank's GPU, else the CPU; the "
                                   "MINORSFT_DEVICE variable sets it too)", group="optimisation",
                                   check=device_name, type=str)
    fsdp: bool = option(False, "shard with FSDP2 (fully_shard) under torchrun instead of DDP",
                        group="optimisation")
    # reference model
    precompute_ref: bool = option(False, "precompute the reference log-probs once and cache them",
                                  group="reference model", resume=True)
    ref_cache_dir: Optional[str] = option(None, "reference cache folder (default: "
                                          "OUT_DIR/ref-cache)", group="reference model", type=str)
    ref_dtype: Optional[str] = option(None, "dtype of the frozen reference model",
                                      group="reference model", choices=tuple(DTYPES), resume=True,
                                      type=str)
    ref_device: Optional[str] = option(None, "device of the frozen reference model",
                                       group="reference model", check=device_name, type=str)
    track_deviation: bool = option(False, "sft: keep a reference to report the deviation metric",
                                   group="reference model", resume=True)
    # logging, eval, checkpoints
    out_dir: str = option("runs/minorsft", "output folder: metrics, checkpoints (one run at a "
                          "time: locked while a run uses it)", group="logging, eval, checkpoints")
    overwrite: bool = option(False, "start afresh in an OUT_DIR that holds a previous run: its "
                             "metrics and checkpoints move to OUT_DIR/previous-<time>/ (nothing "
                             "is deleted)", group="logging, eval, checkpoints")
    run_name: Optional[str] = option(None, "name shown on the progress bar and in the metrics",
                                     group="logging, eval, checkpoints", type=str)
    log_every: int = option(10, "optimiser steps between metric lines",
                            group="logging, eval, checkpoints", check=positive_int)
    eval_every: int = option(0, "steps between evaluations (0: at the end only)",
                             group="logging, eval, checkpoints", check=nonneg_int)
    eval_batch_size: Optional[int] = option(None, "evaluation batch size (default: --batch-size)",
                                            group="logging, eval, checkpoints", check=positive_int,
                                            type=int)
    eval_limit: Optional[int] = option(None, "evaluate the first N held-out rows only",
                                       group="logging, eval, checkpoints", check=positive_int,
                                       type=int)
    eval_generate: bool = option(False, "exact-match accuracy by greedy generation",
                                 group="logging, eval, checkpoints")
    save_every: int = option(0, "steps between checkpoints (0: at the end only)",
                             group="logging, eval, checkpoints", check=nonneg_int)
    save_total_limit: Optional[int] = option(None, "keep only the newest N checkpoints, never the "
                                             "one OUT_DIR/latest names (default: keep all)",
                                             group="logging, eval, checkpoints",
                                             check=positive_int, type=int)
    resume: Optional[str] = option(None, "a checkpoint folder, or 'latest' (the newest checkpoint "
                                   "of OUT_DIR that verifies)", group="logging, eval, checkpoints",
                                   type=str)
    progress: bool = option(True, "tqdm progress bar", group="logging, eval, checkpoints")
    print_steps: bool = option(False, "print a line per logged step",
                               group="logging, eval, checkpoints")
    dump_grads: Optional[str] = option(None, "debug: write the first step's gradients "
                                       "(safetensors)", group="logging, eval, checkpoints",
                                       type=str)

    def uses_reference(self) -> bool:
        return ms.LOSSES[self.loss].reference or self.track_deviation

    def loss_options(self) -> dict:
        """The options of ``loss`` (``beta``, ``length_norm``, ...) as the library takes them."""
        return {name: getattr(self, name) for name in ms.LOSSES[self.loss].options}


def resume_fields() -> tuple:
    """Fields that must match when resuming (``resume=True``: they change the trajectory;
    the run's length, ``resume="extend"``, may change)."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resume"] is True)


def check_fields(cfg, pending=()) -> None:
    """Every field's own check (choices, check function, required) on any config
    dataclass; :class:`ConfigError` naming the first field that fails. ``pending``: fields
    whose values another step produces before they are used (a recipe's earlier stage):
    their value checks are skipped."""
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if f.name in pending:
            continue
        if value is None:
            if meta["required"]:
                raise ConfigError(f.name, "is required")
            continue
        try:
            if meta["choices"] is not None and value not in meta["choices"]:
                raise ValueError(f"{value!r} is not one of {list(meta['choices'])}")
            if meta["check"] is not None:
                meta["check"](value)
        except ValueError as e:
            raise ConfigError(f.name, str(e)) from None


def validate_config(cfg: TrainConfig, pending=()) -> None:
    """Refuse a bad configuration before any work starts (:class:`ConfigError`).
    ``pending``: as for :func:`check_fields`."""
    check_fields(cfg, pending)
    if cfg.max_length < 2:
        raise ConfigError("max_length", f"must be >= 2, got {cfg.max_length}")
    spec = ms.LOSSES[cfg.loss]
    for name, opt in ms.losses.OPTIONS.items():
        if name not in spec.options and getattr(cfg, name) != opt.default:
            raise ConfigError(name, f"{getattr(cfg, name)!r}: not an option of the {cfg.loss!r} "
                              f"loss (its options: {', '.join(spec.options) or 'none'})")
    try:
        ms.losses.check_options(cfg.loss, cfg.loss_options())
    except ValueError as e:
        name, _, message = str(e).partition(": ")
        raise ConfigError(name, message) from None
    if cfg.precompute_ref and not cfg.uses_reference():
        raise ConfigError("precompute_ref", "the 'sft' loss uses no reference (unless "
                          "track_deviation is set)")
    _check_combinations(cfg)


def _check_combinations(cfg: TrainConfig) -> None:
    """Flags that would be silently ignored, or would silently mean something else."""
    if cfg.data is not None and cfg.eval_data is None:   # no --data: the synthetic eval set
        for name in ("eval_every", "eval_generate"):
            if getattr(cfg, name):
                raise ConfigError(name, "needs --eval-data (held-out data to evaluate on)")
    if "loss_type" in ms.LOSSES[cfg.loss].options and cfg.loss_type == "robust" \
            and cfg.label_smoothing == 0:
        raise ConfigError("loss_type", "robust needs --label-smoothing > 0 (with 0 it is the "
                                       "sigmoid loss: use --loss-type sigmoid)")


# ------------------------------------------------------------------ the CLI parser

def flag(name: str) -> str:
    """The CLI spelling of a field: ``grad_accum`` -> ``--grad-accum``."""
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One flag per field of ``cls`` (``cli=False`` fields: none; ``positional`` ones: a
    positional argument), in its CLI group, with its default (or "required") and help."""
    groups = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta["cli"]:
            continue
        group = groups.get(meta["group"]) or groups.setdefault(
            meta["group"], parser.add_argument_group(meta["group"]))
        note = "required" if meta["required"] else "default: %(default)s"
        kw = dict(default=f.default, help=f"{meta['help']} ({note})")
        if isinstance(f.default, bool):
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, dest=f.name, **kw)
            continue
        kw["type"] = meta["type"] or type(f.default)
        if meta["choices"] is not None:
            kw["choices"] = meta["choices"]
        if meta["positional"]:
            group.add_argument(f.name, metavar=f.name.upper(), **kw)
        else:
            group.add_argument(flag(f.name), dest=f.name, **kw)


def config_to_argv(cfg) -> list:
    """The flags that give ``cfg`` back through the parser: one per field that differs from
    its default (``--clip-grad 0`` for no clipping)."""
    argv = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == f.default:
            continue
        if isinstance(f.default, bool):
            argv.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
        else:   # None where the default is not: the CLI spells "off" as 0
            argv += [flag(f.name), "0" if value is None else str(value)]
    return argv


def config_from_args(args: argparse.Namespace, cls=TrainConfig):
    """The ``cls`` instance for parsed arguments (``--clip-grad 0`` is no clipping)."""
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: v for k, v in vars(args).items() if k in names})
    if getattr(cfg, "clip_grad", None) == 0:
        cfg.clip_grad = None
    return cfg
