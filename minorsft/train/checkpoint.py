"""Training checkpoints: save, find, check and load them.

A checkpoint (``out_dir/checkpoint-{step}``) holds the model in Hugging Face format
(safetensors) + tokenizer, ``optimizer.pt`` / ``scheduler.pt`` / ``rng.pt`` (loaded
with ``torch.load(weights_only=True)``, so loading never unpickles code) and
``trainer_state.json``. It is written into a temporary directory, every file and the
directory are fsynced, and only then is it renamed into place and ``out_dir/latest``
rewritten to name it: after a crash or a power loss ``latest`` names a complete
checkpoint, and the debris of an interrupted save is cleaned up by
:func:`repair_checkpoint_debris`.

The functions take the values they need (the output folder, the configuration as a
dict); ``dist`` is any object with ``main``, ``world`` and ``barrier()`` (a
:class:`~minorsft.train.distributed.Dist`).
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from typing import Optional

import torch

from minorsft.train.config import ConfigError

# ---------------------------------------------------------------- durable writes

def fsync_dir(path: str) -> None:
    """Flush a directory's entries (names created, renamed or removed in it) to disk.

    File systems that cannot sync a directory (``EINVAL``) are tolerated."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file under ``root``, then every directory, ``root`` last."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def atomic_write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` durably: a temporary file, fsynced, renamed over
    ``path``, then the parent directory fsynced (readers see the old or the new text)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


# ---------------------------------------------------------------- RNG state

def _py_rng_to_list(state):
    return [state[0], list(state[1]), state[2]]


def rng_state() -> dict:
    """The torch, Python (as lists: loadable with ``weights_only=True``) and CUDA RNG states."""
    rng = {"torch": torch.get_rng_state(), "python": _py_rng_to_list(random.getstate())}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: dict) -> None:
    """Restore the states saved by :func:`rng_state` (CUDA only where available)."""
    torch.set_rng_state(rng["torch"])
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ---------------------------------------------------------------- resume

def resolve_resume(resume: Optional[str], out_dir: str) -> Optional[str]:
    """The checkpoint directory ``resume`` names (``"latest"``: the one ``out_dir/latest``
    names), or None when ``resume`` is None; :class:`ConfigError` (field ``resume``) when
    it is not a complete checkpoint."""
    if resume is None:
        return None
    path = resume
    if path == "latest":
        pointer = os.path.join(out_dir, "latest")
        if not os.path.exists(pointer):
            raise ConfigError("resume", f"latest: no {pointer} (no complete checkpoint in out_dir)")
        with open(pointer, encoding="utf-8") as f:
            path = os.path.join(out_dir, f.read().strip())
    if not os.path.exists(os.path.join(path, "trainer_state.json")):
        raise ConfigError("resume", f"{path} is not a complete checkpoint (no trainer_state.json)")
    return path


def read_trainer_state(path: str) -> dict:
    """The checkpoint's ``trainer_state.json``: ``step``, ``position``, ``world_size``, ``config``."""
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)


def check_resume_config(state: dict, config: dict, world: int) -> None:
    """:class:`ConfigError` listing every field of ``config`` (the fields that must match,
    with their values now) and the world size where the checkpoint's ``state`` differs."""
    saved = state["config"]
    diffs = [f"{k}: checkpoint {saved.get(k)!r} != now {v!r}" for k, v in config.items()
             if saved.get(k) != v]
    if state.get("world_size", 1) != world:
        diffs.append(f"world_size: checkpoint {state.get('world_size')} != now {world}")
    if diffs:
        raise ConfigError("resume", "incompatible configuration: " + "; ".join(diffs))


def check_resume_data(state: dict, data_fingerprint: str) -> None:
    """``ValueError`` if the tokenised training data differs from the checkpoint's
    (same ``--data`` path, regenerated or edited file, other tokenizer or max length)."""
    saved = state.get("data_fingerprint")
    if saved and saved != data_fingerprint:
        raise ConfigError("resume", f"the tokenised training data changed since the checkpoint "
                         f"(fingerprint {saved[:12]} != now {data_fingerprint[:12]})")


# ---------------------------------------------------------------- save / load

def save_checkpoint(out_dir: str, dist, unwrapped, tokenizer, optimizer, scheduler, *, step: int,
                    position: int, config: dict, data_fingerprint: str = "") -> str:
    """Write ``out_dir/checkpoint-{step}`` (full state dicts gathered on every rank,
    written by rank 0) and point ``out_dir/latest`` at it; returns its path.
    ``position``: examples consumed; ``config``: the run's configuration (a dict).

    The files go into a temporary directory, are fsynced with it, and the directory is
    renamed into place (an older checkpoint of the same step is swapped out) and the
    parent fsynced before ``latest`` is rewritten."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(unwrapped, options=opts)
    osd = get_optimizer_state_dict(unwrapped, optimizer, options=opts)
    name = f"checkpoint-{step}"
    final = os.path.join(out_dir, name)
    if dist.main:
        tmp = os.path.join(out_dir, f".tmp-{name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        unwrapped.save_pretrained(tmp, state_dict=msd, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(osd, os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
        atomic_write(os.path.join(tmp, "trainer_state.json"), json.dumps(
            {"step": step, "position": position, "world_size": dist.world,
             "data_fingerprint": data_fingerprint, "config": config}, indent=1))
        fsync_tree(tmp)  # every byte on disk before any name points at it
        if os.path.exists(final):  # an older checkpoint of the same step: swap it out
            old = os.path.join(out_dir, f".old-{name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            fsync_dir(out_dir)
        atomic_write(os.path.join(out_dir, "latest"), name)
    dist.barrier()
    return final


def repair_checkpoint_debris(out_dir: str) -> None:
    """Clean up after an interrupted save (its debris is never named by ``latest``).

    ``.tmp-checkpoint-*`` is a save that never completed: removed. ``.old-checkpoint-N-*``
    is an older same-step checkpoint moved aside for the new one; if the crash came
    before the new one moved in, ``checkpoint-N`` is missing (and ``latest`` may name
    it), so the old one is put back; otherwise it is removed.
    """
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if name.startswith(".old-checkpoint-"):
            live = os.path.join(out_dir, name[len(".old-"):].rsplit("-", 1)[0])
            if not os.path.exists(live):
                os.replace(path, live)
                continue
        if name.startswith((".tmp-checkpoint-", ".old-checkpoint-")):
            shutil.rmtree(path, ignore_errors=True)


def load_training_state(path, unwrapped, optimizer, scheduler) -> None:
    """Load the optimizer, scheduler and RNG states of the checkpoint at ``path``
    (``torch.load(weights_only=True)``: never unpickles code). The weights are loaded
    by the caller (``from_pretrained``, safetensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    osd = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True, map_location="cpu")
    set_optimizer_state_dict(unwrapped, optimizer, osd, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=True))
