"""Manifests: the size and SHA-256 of every file of a folder, written last, checked before use.

A checkpoint folder gets ``manifest.json`` as its last file (:func:`write_manifest`);
resuming checks it (:func:`verify_manifest`) before anything is loaded, so a truncated,
missing or silently changed file (flipped bytes inside a valid safetensors header) is
found and named instead of being loaded.
"""
from __future__ import annotations

import hashlib
import json
import os

MANIFEST = "manifest.json"
FORMAT = 1


class VerifyError(ValueError):
    """A file that does not match its manifest: ``file`` (its path) and ``reason``."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    """The hex SHA-256 of the file at ``path`` (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(folder: str) -> list:
    """Every file under ``folder`` as a sorted list of ``/``-separated relative paths
    (the manifest itself excluded)."""
    out = []
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/")
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(folder: str) -> str:
    """Write ``folder/manifest.json``: ``{"format", "files": {path: {"size", "sha256"}}}`` for
    every file under ``folder``. Call it after the last file is written; returns its path."""
    from minorsft.train.checkpoint import atomic_write
    files = {}
    for rel in _files(folder):
        path = os.path.join(folder, rel)
        files[rel] = {"size": os.path.getsize(path), "sha256": sha256_file(path)}
    out = os.path.join(folder, MANIFEST)
    atomic_write(out, json.dumps({"format": FORMAT, "files": files}, indent=1))
    return out


def read_manifest(folder: str) -> dict:
    """The ``files`` table of ``folder/manifest.json``; :class:`VerifyError` when it is
    missing or unreadable."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise VerifyError(path, "missing (an interrupted save, or a checkpoint written before "
                                "manifests existed)")
    try:
        with open(path, encoding="utf-8") as f:
            files = json.load(f)["files"]
        if not all(isinstance(v["size"], int) and isinstance(v["sha256"], str) for v in files.values()):
            raise ValueError("bad entry")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise VerifyError(path, f"unreadable ({type(e).__name__}: {e})") from None
    return files


def verify_manifest(folder: str) -> None:
    """Check every file ``folder/manifest.json`` lists: present, of its size (all sizes are
    checked before any file is hashed), then of its SHA-256. Raises :class:`VerifyError`
    naming the first file that differs."""
    files = read_manifest(folder)
    for rel, want in files.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            raise VerifyError(path, "missing")
        size = os.path.getsize(path)
        if size != want["size"]:
            raise VerifyError(path, f"{size} bytes, the manifest says {want['size']} (truncated or "
                                    f"changed)")
    for rel, want in files.items():
        path = os.path.join(folder, rel)
        if sha256_file(path) != want["sha256"]:
            raise VerifyError(path, "its SHA-256 differs from the manifest's (the bytes changed: "
                                    "corrupt or edited)")
