"""Trained models published once complete: the unit of work of the multi-step commands
(``select --probe-steps``, each ``spin`` round, each ``train`` stage of a recipe).

:func:`train_to_model` runs :func:`~minorsft.train.loop.train` in ``FOLDER/train`` and
publishes the final checkpoint's model to ``FOLDER/model``: its Hugging Face files
(config, safetensors weights, generation config) and tokenizer, without the optimiser
state, plus the run's ``metrics.jsonl`` and an ``info.json``; ``manifest.json`` (size and
SHA-256 of every file) is written last, into a temporary folder that is then renamed into
place. So a ``FOLDER/model`` whose manifest verifies is finished (:func:`finished_model`),
and running the command again skips it. A run interrupted before that continues from the
newest checkpoint of ``FOLDER/train`` that verifies (``resume="latest"``); one cut before
its first checkpoint starts afresh, the cut attempt moved aside (``overwrite``: nothing
is deleted).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

from minorsft.train.checkpoint import (atomic_write, check_resume_config, fsync_tree, move_into_place,
                                       resolved_paths)
from minorsft.train.config import ConfigError, TrainConfig, resume_fields
from minorsft.train.loop import train
from minorsft.train.manifest import MANIFEST, VerifyError, sha256_file, verify_manifest, write_manifest
from minorsft.train.outdir import METRICS, previous_run
from minorsft.train.preempt import Preempted

MODEL, RUN, INFO = "model", "train", "info.json"
# A checkpoint's files that belong to the training run, not to the model.
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json", MANIFEST)


# What a finished model records of its training (info.json) and is compared on: the
# fields that change the trajectory, the run's length, and the training data's bytes.
LENGTH_FIELDS = ("max_steps", "epochs")


def _data_digest(path) -> str | None:
    return sha256_file(path) if path is not None and os.path.isfile(path) else None


def training_record(cfg: TrainConfig) -> dict:
    """What ``info.json`` records of the training of a published model: ``config`` (the
    fields that change the trajectory and the run's length), ``resolved`` (the model and
    data paths, resolved) and ``data_sha256``."""
    config = {k: getattr(cfg, k) for k in (*resume_fields(), *LENGTH_FIELDS)}
    return {"config": config, "resolved": resolved_paths(config), "data_sha256": _data_digest(cfg.data)}


def check_same_training(cfg: TrainConfig, model: str, field_name: str) -> None:
    """:class:`ConfigError` (``field_name``) when the finished ``model`` was trained with
    another configuration than ``cfg`` (another loss, length, learning rate, ...), from
    another model or from other training data (its bytes)."""
    try:
        with open(os.path.join(model, INFO), encoding="utf-8") as f:
            info = json.load(f)
        saved = info["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(field_name, f"{model} records no training configuration ({e}): remove "
                                      f"it to train again") from None
    now = {k: getattr(cfg, k) for k in (*resume_fields(), *LENGTH_FIELDS)}
    diffs = []
    try:
        check_resume_config({"config": saved, "resolved": info.get("resolved")}, now, 1)
    except ConfigError as e:
        diffs.append(e.message.split(": ", 1)[-1])   # the length fields included (in `now`)
    if info.get("data_sha256") != _data_digest(cfg.data):
        diffs.append(f"data: the bytes of {cfg.data} changed")
    if diffs:
        folder = os.path.dirname(model)
        raise ConfigError(field_name, f"{model} was trained with another configuration "
                                      f"({'; '.join(diffs)}): remove {folder} to train it again, "
                                      f"or choose another folder")


def finished_model(folder: str, log=None):
    """``FOLDER/model`` when it is finished (its manifest verifies), else None; ``log``
    (when given) says why a ``FOLDER/model`` that exists is not."""
    path = os.path.join(folder, MODEL)
    if not os.path.isdir(path):
        return None
    try:
        verify_manifest(path)
    except VerifyError as e:
        if log is not None:
            log(f"{path} is not a finished model ({e}): making it again")
        return None
    return path


def resume_mode(run_dir: str) -> dict:
    """``resume`` / ``overwrite`` for a training run into ``run_dir``: ``resume="latest"``
    when it holds a checkpoint; ``overwrite=True`` when it holds an earlier attempt without
    one (its metrics move to ``run_dir/previous-<time>/``); neither for a new folder."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    if any(n.startswith(("checkpoint-", ".old-checkpoint-")) for n in names):
        return {"resume": "latest", "overwrite": False}
    return {"resume": None, "overwrite": previous_run(run_dir) is not None}


def publish_model(checkpoint: str, dest: str, *, metrics: str | None = None,
                  info: dict | None = None) -> str:
    """Publish the model of ``checkpoint`` (a ``checkpoint-N`` folder) to ``dest``: its
    files but the training state (:data:`TRAINING_STATE`), ``metrics`` (a path, copied as
    ``metrics.jsonl``) and ``info`` (written as ``info.json``), ``manifest.json`` last, in
    a temporary folder renamed into place (a ``dest`` that exists is swapped out)."""
    parent, name = os.path.split(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    for stale in os.listdir(parent):   # an interrupted publish (the caller owns the folder)
        if stale.startswith(f".tmp-{name}-"):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    tmp = os.path.join(parent, f".tmp-{name}-{os.getpid()}")
    os.makedirs(tmp)
    for entry in sorted(os.listdir(checkpoint)):
        src = os.path.join(checkpoint, entry)
        if entry in TRAINING_STATE:
            continue
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(tmp, entry))
        else:
            shutil.copy2(src, os.path.join(tmp, entry))
    if metrics is not None and os.path.isfile(metrics):
        shutil.copy2(metrics, os.path.join(tmp, METRICS))
    if info is not None:
        atomic_write(os.path.join(tmp, INFO), json.dumps(info, indent=1) + "\n")
    write_manifest(tmp)
    fsync_tree(tmp)
    move_into_place(tmp, dest)
    return dest


def train_to_model(cfg: TrainConfig, folder: str, *, info: dict | None = None, log=print,
                   field_name: str = "out_dir") -> dict:
    """Train ``cfg`` in ``FOLDER/train`` (its ``out_dir``, ``resume`` and ``overwrite`` are
    set here) and publish the final model to ``FOLDER/model`` with ``info`` (plus the run's
    step, final evaluation and checkpoint) in its ``info.json``.

    A finished ``FOLDER/model`` is not trained again; one trained with another
    configuration (:func:`check_same_training`) is a :class:`ConfigError` naming
    ``field_name``, and so is a refusal about the run's folder. Returns ``{"model",
    "skipped", "result"}`` (``result``: :func:`~minorsft.train.loop.train`'s, None when
    skipped).
    Raises :class:`~minorsft.train.preempt.Preempted` when a signal stopped the run (its
    checkpoint is written; running again resumes it); the exceptions of ``train``
    otherwise."""
    done = finished_model(folder, log)
    if done is not None:
        check_same_training(cfg, done, field_name)
        log(f"{done}: finished earlier, not trained again")
        return {"model": done, "skipped": True, "result": None}
    run_dir = os.path.join(folder, RUN)
    if cfg.resume is not None or cfg.overwrite:
        raise ConfigError("resume" if cfg.resume is not None else "overwrite",
                          f"set by the command itself for {run_dir}")
    mode = resume_mode(run_dir)
    if mode["resume"]:
        log(f"{run_dir}: an earlier attempt left checkpoints: resuming the newest that verifies")
    try:
        result = train(dataclasses.replace(cfg, out_dir=run_dir, **mode))
    except ConfigError as e:   # about the folder this function chose: name the caller's option
        if e.field not in ("out_dir", "resume", "overwrite"):
            raise
        raise ConfigError(field_name, f"{run_dir}: {e.message}") from None
    if result["preempted"]:
        raise Preempted(result["preempted"])
    info = {**(info or {}), "step": result["step"], "final_eval": result["final_eval"],
            "checkpoint": os.path.abspath(result["checkpoint"]), **training_record(cfg)}
    path = publish_model(result["checkpoint"], os.path.join(folder, MODEL),
                         metrics=os.path.join(run_dir, METRICS), info=info)
    log(f"model written: {path}")
    return {"model": path, "skipped": False, "result": result}
