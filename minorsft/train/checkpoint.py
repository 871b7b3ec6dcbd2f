"""Training checkpoints: save, find, check and load them.

A checkpoint (``out_dir/checkpoint-{step}``) holds the model in Hugging Face format
(safetensors) + tokenizer, ``optimizer.pt`` / ``scheduler.pt`` / ``rng.pt`` (loaded
with ``torch.load(weights_only=True)``, so loading never unpickles code),
``trainer_state.json`` and, written last, ``manifest.json`` (size and SHA-256 of every
file, :mod:`~minorsft.train.manifest`). It is written into a temporary directory, every
file and the directory are fsynced, and only then is it renamed into place and
``out_dir/latest`` rewritten to name it: after a crash or a power loss ``latest`` names a
complete checkpoint, and the debris of an interrupted save is cleaned up by
:func:`repair_checkpoint_debris`. Resuming verifies the manifest before anything is
loaded; ``--resume latest`` takes the newest checkpoint that verifies
(:func:`find_resume`).

The functions take the values they need (the output folder, the configuration as a
dict); ``dist`` is any object with ``main``, ``world`` and ``barrier()`` (a
:class:`~minorsft.train.distributed.Dist`).
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from typing import Optional

import torch

from minorsft.train.config import ConfigError
from minorsft.train.manifest import VerifyError, verify_manifest, write_manifest

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Configuration fields naming files: compared resolved (a relative and an absolute path to
# the same file are the same); the data is compared by content (its fingerprint) as well.
PATH_FIELDS = ("data", "model")

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


def atomic_write(path: str, text) -> None:
    """Write ``text`` (a str, as UTF-8, or bytes, as they are) to ``path`` durably: a
    temporary file, fsynced, renamed over ``path``, then the parent directory fsynced
    (readers see the old or the new text)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    binary = isinstance(text, bytes)
    with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
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


# ---------------------------------------------------------------- finding a checkpoint

def checkpoints(out_dir: str) -> list:
    """``(step, path)`` of every ``checkpoint-N`` folder in ``out_dir``, newest first."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), os.path.join(out_dir, n)) for n in os.listdir(out_dir)
             if (m := CHECKPOINT_RE.match(n)) and os.path.isdir(os.path.join(out_dir, n))]
    return sorted(found, reverse=True)


def latest_name(out_dir: str) -> Optional[str]:
    """The folder name ``out_dir/latest`` holds, or None when there is no such file."""
    try:
        with open(os.path.join(out_dir, "latest"), encoding="utf-8") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def read_trainer_state(path: str) -> dict:
    """The checkpoint's ``trainer_state.json``: ``step``, ``position``, ``world_size``,
    ``config`` (:class:`~minorsft.train.manifest.VerifyError` naming the file when it
    cannot be read)."""
    file = os.path.join(path, "trainer_state.json")
    try:
        with open(file, encoding="utf-8") as f:
            state = json.load(f)
        int(state["step"]), dict(state["config"])   # the keys a resume reads, of their types
    except FileNotFoundError:
        raise VerifyError(file, "missing") from None
    except (ValueError, KeyError, TypeError) as e:
        raise VerifyError(file, f"unreadable ({type(e).__name__}: {e})") from None
    return state


def verified_state(path: str) -> dict:
    """Verify the checkpoint at ``path`` against its manifest (every file's size and
    SHA-256), then return its trainer state; :class:`VerifyError` naming the file that
    fails. Nothing of the checkpoint is loaded before this passes."""
    verify_manifest(path)
    return read_trainer_state(path)


def check_resume_target(resume: Optional[str], out_dir: str) -> None:
    """The cheap part of :func:`find_resume`, before any work: ``resume`` names an existing
    folder, or for ``"latest"`` ``out_dir`` holds at least one checkpoint folder."""
    if resume is None:
        return
    if resume == "latest":
        names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
        if not any(CHECKPOINT_RE.match(n) or n.startswith(".old-checkpoint-") for n in names):
            raise ConfigError("resume", f"latest: no checkpoint in {out_dir}")
    elif not os.path.isdir(resume):
        raise ConfigError("resume", f"{resume} is not a complete checkpoint (no such folder)")


def find_resume(resume: Optional[str], out_dir: str, log=print):
    """``(path, trainer_state)`` of the checkpoint to resume from, verified; ``(None, None)``
    without ``resume``.

    ``"latest"``: the newest ``checkpoint-N`` of ``out_dir`` that verifies, whatever
    ``latest`` names (a crash can come between a checkpoint's rename and the rewrite of
    ``latest``, or before the first ``latest`` exists); ``log(message)`` says which one
    and why any newer one was skipped. An explicit path that fails verification is a
    :class:`ConfigError` naming the file."""
    if resume is None:
        return None, None
    check_resume_target(resume, out_dir)
    if resume != "latest":
        try:
            return resume, verified_state(resume)
        except VerifyError as e:
            raise ConfigError("resume", f"{resume} is not a complete checkpoint: {e}") from None
    named, skipped = latest_name(out_dir), []
    for _step, path in checkpoints(out_dir):
        try:
            state = verified_state(path)
        except VerifyError as e:
            skipped.append(f"{os.path.basename(path)} ({e})")
            continue
        name = os.path.basename(path)
        note = [f"skipped {'; '.join(skipped)}"] if skipped else []
        if named is None:
            note.append(f"{os.path.join(out_dir, 'latest')} is missing")
        elif named != name and not os.path.isdir(os.path.join(out_dir, named)):
            note.append(f"{os.path.join(out_dir, 'latest')} names {named}, which does not exist")
        elif named != name:
            note.append(f"{os.path.join(out_dir, 'latest')} names {named}")
        log(f"resume latest: {path}, the newest checkpoint that verifies"
            + (f" ({'; '.join(note)})" if note else ""))
        return path, state
    raise ConfigError("resume", f"latest: no checkpoint in {out_dir} verifies: {'; '.join(skipped)}")


def resolved_paths(config: dict) -> dict:
    """The path fields (:data:`PATH_FIELDS`) of ``config`` resolved against the current
    folder (``os.path.realpath``); the built-in ``model`` is ``"tiny"``, no ``data`` None."""
    out = {}
    for k in PATH_FIELDS:
        v = config.get(k)
        out[k] = os.path.realpath(v) if v not in (None, "tiny") else ("tiny" if k == "model" else None)
    return out


def check_resume_config(state: dict, config: dict, world: int) -> None:
    """:class:`ConfigError` listing every field of ``config`` (the fields that must match,
    with their values now) and the world size where the checkpoint's ``state`` differs.
    Path fields are compared resolved (``state["resolved"]``, else the saved value resolved
    now); ``data`` is left to :func:`check_resume_data` (its content decides)."""
    saved = state["config"]
    then = state.get("resolved") or resolved_paths(saved)
    now = resolved_paths(config)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} != now {v!r}" for k, v in config.items()
             if k not in PATH_FIELDS and saved.get(k) != v]
    if "model" in config and then["model"] != now["model"]:
        diffs.append(f"model: checkpoint {then['model']!r} != now {now['model']!r}")
    if state.get("world_size", 1) != world:
        diffs.append(f"world_size: checkpoint {state.get('world_size')} != now {world}")
    if diffs:
        raise ConfigError("resume", "incompatible configuration: " + "; ".join(diffs))


def check_resume_data(state: dict, data_fingerprint: str, data_path: str, log=print) -> None:
    """``ConfigError`` if the tokenised training data differs from the checkpoint's (a file
    edited or regenerated in place, another tokenizer or max length). The same content
    under another path is accepted (``log`` says so): the content is what the run saw."""
    saved = state.get("data_fingerprint")
    then = (state.get("resolved") or {}).get("data")
    now = os.path.realpath(data_path)
    if saved and saved != data_fingerprint:
        where = f" ({then} -> {now})" if then and then != now else f" ({now})"
        raise ConfigError("resume", f"the tokenised training data changed since the checkpoint"
                                    f"{where}: fingerprint {saved[:12]} != now {data_fingerprint[:12]}")
    if then and then != now:
        log(f"resume: the training data is now read from {now} (the checkpoint's run read {then}); "
            f"same tokenised content, accepted")


# ---------------------------------------------------------------- save / load

def save_checkpoint(out_dir: str, dist, unwrapped, tokenizer, optimizer, scheduler, *, step: int,
                    position: int, config: dict, data_fingerprint: str = "",
                    extra: Optional[dict] = None, keep_last: Optional[int] = None) -> str:
    """Write ``out_dir/checkpoint-{step}`` (full state dicts gathered on every rank,
    written by rank 0) and point ``out_dir/latest`` at it; returns its path.
    ``position``: examples consumed; ``config``: the run's configuration (a dict);
    ``extra``: more keys for ``trainer_state.json``; ``keep_last``: then keep only the
    newest ``keep_last`` checkpoints (:func:`prune_checkpoints`).

    The files go into a temporary directory, ``manifest.json`` last, are fsynced with it,
    and the directory is renamed into place (an older checkpoint of the same step is
    swapped out) and the parent fsynced before ``latest`` is rewritten."""
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
             "data_fingerprint": data_fingerprint, **(extra or {}), "config": config}, indent=1))
        write_manifest(tmp)   # last: a folder with a manifest that verifies is complete
        fsync_tree(tmp)  # every byte on disk before any name points at it
        move_into_place(tmp, final)
        atomic_write(os.path.join(out_dir, "latest"), name)
        if keep_last:
            prune_checkpoints(out_dir, keep_last)
    dist.barrier()
    return final


def move_into_place(tmp: str, final: str) -> None:
    """Rename the finished ``tmp`` folder to ``final`` (an older ``final`` is swapped out,
    then removed) and fsync the parent."""
    out_dir, name = os.path.split(final)
    if os.path.exists(final):
        old = os.path.join(out_dir, f".old-{name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
        fsync_dir(out_dir)


def prune_checkpoints(out_dir: str, keep: int) -> list:
    """Remove all but the newest ``keep`` ``checkpoint-N`` folders, never the one
    ``out_dir/latest`` names. Each is first renamed to ``.tmp-checkpoint-N-pruned-PID``
    (a crash mid-removal leaves debris the next start removes, not a half checkpoint).
    Returns the removed checkpoints' paths."""
    named = latest_name(out_dir)
    removed = []
    for _step, path in checkpoints(out_dir)[keep:]:
        name = os.path.basename(path)
        if name == named:
            continue
        doomed = os.path.join(out_dir, f".tmp-{name}-pruned-{os.getpid()}")
        os.replace(path, doomed)
        fsync_dir(out_dir)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(path)
    return removed


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
