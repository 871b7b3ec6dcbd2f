"""Multi-stage recipes: ``minorsft recipe FILE`` runs ``train`` / ``select`` / ``spin``
stages in order, each stage's outputs feeding the next ones.

The file (JSON; YAML as well when PyYAML is installed)::

    {"out_dir": "runs/pipeline",
     "description": "optional; printed with the plan",
     "stages": [
       {"name": "sft",  "kind": "train",  "loss": "sft", "max_steps": 300},
       {"name": "pick", "kind": "select", "data": "@sft", "keep": 0.5, "probe_steps": 50},
       {"name": "tune", "kind": "train",  "loss": "minor_sft", "data": "@pick"},
       {"name": "play", "kind": "spin",   "data": "@pick", "rounds": 2}]}

- A stage has a ``name`` (its folder: letters, digits, ``-``, ``_``), a ``kind`` and the
  options of that command spelled as the long option with underscores (``max_steps`` for
  ``--max-steps``), with JSON values (``true`` / ``false`` for switches).
- Stage NAME writes into ``OUT_DIR/NAME/``; the recipe sets those paths, so a stage may not
  (``train``: the run in ``train/`` and the model in ``model/``; ``select``:
  ``selected.jsonl``, ``scores.jsonl`` and the probe fine-tune in ``probe/``; ``spin``:
  ``round-k/``).
- ``"@NAME"`` as an option's value is an output of the earlier stage NAME: its model for
  ``model`` and ``finetuned``, its rows for ``data``, its held-out rows for ``eval_data``;
  ``"@NAME.OUTPUT"`` names the output. Outputs: ``train``: ``model``, ``data`` (the rows it
  trained on: ``--data``, or the synthetic set it wrote), ``eval_data``; ``select``:
  ``data`` (the kept rows), ``scores``, ``model`` (its base model, passed on); ``spin``:
  ``model`` (the last round's), ``data`` (the last round's pairs). ``"@@..."`` is the
  literal text ``"@..."``.
- A stage's ``model`` defaults to the previous stage's model output.
- Relative paths are relative to the folder the command runs in.

Everything is checked before any work (:func:`plan_recipe`): the file's shape, each
stage's name, kind, options and references, and each stage's configuration (as its own
command checks it; paths that earlier stages make are checked when they exist). A stage
is finished when its ``stage.json`` (written last: its options, the ``stage.json`` digests
of the stages it read, and the SHA-256 of its output files) matches and its outputs
verify; a finished stage is skipped (the output says so). A finished stage whose options
changed, or whose inputs are not finished (or changed) now, is refused: remove its folder
to run it again. An unfinished stage resumes where its command resumes (a ``train``
stage, or a ``spin`` round, from its last checkpoint). One recipe run holds ``OUT_DIR``.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Optional

from minorsft.train.checkpoint import atomic_write
from minorsft.train.config import (ConfigError, TrainConfig, config_to_argv, existing_path, option,
                                   validate_config)
from minorsft.train.lobass import SelectConfig, select, validate_select
from minorsft.train.manifest import VerifyError, sha256_file, verify_manifest
from minorsft.train.outdir import OutDirLock
from minorsft.train.selfplay import PAIRS, SpinConfig, spin, validate_spin
from minorsft.train.stages import MODEL, RUN, train_to_model

KINDS = {"train": TrainConfig, "select": SelectConfig, "spin": SpinConfig}
# Options the recipe sets for each kind (the stage's folder).
OWNED = {"train": ("out_dir", "resume", "overwrite"), "select": ("out", "scores", "work_dir"),
         "spin": ("out_dir",)}
# The output "@NAME" means, by the option it is given to.
DEFAULT_OUTPUT = {"model": "model", "finetuned": "model", "data": "data", "eval_data": "eval_data"}
# Options that change nothing a stage produces: a finished stage ignores them.
DISPLAY = ("progress", "print_steps")
NAME = re.compile(r"^[A-Za-z0-9_-]+$")
MARKER = "stage.json"
TOP_KEYS = ("out_dir", "stages", "description")


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file, the stage and the option."""


@dataclass
class RecipeConfig:
    """``minorsft recipe``'s arguments."""

    file: Optional[str] = option(None, "the recipe: a JSON file (YAML with PyYAML installed)",
                                 group="recipe", check=existing_path, required=True,
                                 positional=True, type=str)
    dry_run: bool = option(False, "print the resolved plan (each stage's status, command and "
                           "outputs) and stop", group="recipe")


@dataclass
class Stage:
    """One resolved stage: its ``config`` (the command's config dataclass), the ``options``
    it was resolved from (references replaced by paths: what ``stage.json`` records), the
    earlier stages it reads (``inputs``), its ``outputs`` and its ``status`` ("run",
    "resume" or "finished")."""

    index: int
    name: str
    kind: str
    folder: str
    config: object
    options: dict
    inputs: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)
    status: str = "run"
    note: str = ""


# ---------------------------------------------------------------- reading the file

def load_recipe(path: str) -> dict:
    """The recipe in ``path``: JSON, or YAML (``.yaml`` / ``.yml``) when PyYAML is
    importable (:class:`RecipeError` saying so when it is not)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot be read ({e})") from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise RecipeError(f"{path}: a YAML recipe needs PyYAML, which is not installed "
                              f"(pip install pyyaml), or write the recipe as JSON") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: invalid YAML ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


# ---------------------------------------------------------------- resolving the stages

def _option_fields(kind: str) -> dict:
    cls = KINDS[kind]
    return {f.name: f for f in dataclasses.fields(cls)
            if f.metadata["cli"] and not f.metadata["positional"]}


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_type(where: str, key: str, value, f) -> None:
    """A JSON value of the option's type (None is left to the config's own checks)."""
    want = f.metadata["type"] or type(f.default)
    if value is None or want not in _TYPE_NAMES:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: number and float(value).is_integer(),
          float: number, str: isinstance(value, str)}[want]
    if not ok:
        raise RecipeError(f"{where}: {key}: expected {_TYPE_NAMES[want]}, got {json.dumps(value)}")


def _reference(where: str, key: str, value, done: dict, later: set):
    """``(stage, output)`` for an ``"@NAME[.OUTPUT]"`` value, else None."""
    if not isinstance(value, str) or not value.startswith("@") or value.startswith("@@"):
        return None
    name, _, output = value[1:].partition(".")
    if name not in done:
        what = "a later stage: a stage reads earlier stages only" if name in later else \
            f"no earlier stage (earlier: {', '.join(done) or 'none'})"
        raise RecipeError(f"{where}: {key}: {value!r} names {what}")
    output = output or DEFAULT_OUTPUT.get(key)
    if output is None:
        raise RecipeError(f"{where}: {key}: {value!r}: name the output, '@{name}.OUTPUT' (outputs "
                          f"of '{name}': {', '.join(done[name].outputs)})")
    if done[name].outputs.get(output) is None:
        raise RecipeError(f"{where}: {key}: {value!r}: stage '{name}' ({done[name].kind}) has no "
                          f"{output!r} output (its outputs: "
                          f"{', '.join(k for k, v in done[name].outputs.items() if v is not None)})")
    return done[name], output


def _outputs(kind: str, cfg, folder: str) -> dict:
    """The paths a stage makes (or passes on) that later stages may name."""
    if kind == "train":
        synthetic = os.path.join(folder, RUN, "data")
        return {"model": os.path.join(folder, MODEL),
                "data": cfg.data or os.path.join(synthetic, "train.jsonl"),
                "eval_data": cfg.eval_data or (os.path.join(synthetic, "eval.jsonl") if cfg.data is None
                                               else None)}
    if kind == "select":
        return {"model": cfg.model or "tiny", "data": cfg.out, "scores": cfg.scores}
    last = cfg.round_dir(cfg.rounds)
    return {"model": os.path.join(last, MODEL), "data": os.path.join(last, PAIRS)}


def _owned(kind: str, folder: str) -> dict:
    if kind == "train":
        return {"out_dir": os.path.join(folder, RUN)}
    if kind == "select":
        return {"out": os.path.join(folder, "selected.jsonl"),
                "scores": os.path.join(folder, "scores.jsonl"), "work_dir": os.path.join(folder, "probe")}
    return {"out_dir": folder}


def _validate(kind: str, cfg, pending) -> None:
    if kind == "train":
        validate_config(cfg, pending=pending)
    elif kind == "select":
        validate_select(cfg, pending=pending)
    else:
        validate_spin(cfg, pending=pending)


def _stage_options(where: str, kind: str, raw: dict, done: dict, later: set, folder: str):
    """``(values, inputs)``: the stage's options with references replaced by paths and
    the model inherited from the previous stage, and the earlier stages it reads."""
    fields = _option_fields(kind)
    values, inputs = {}, []
    for key, value in raw.items():
        if key in ("name", "kind"):
            continue
        if key in OWNED[kind]:
            raise RecipeError(f"{where}: {key}: set by the recipe (this stage writes into {folder}/)")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            raise RecipeError(f"{where}: {key}: not an option of a {kind} stage"
                              + (f" (did you mean {close[0]}?)" if close else ""))
        _check_type(where, key, value, fields[key])
        ref = _reference(where, key, value, done, later)
        if ref is not None:
            value = ref[0].outputs[ref[1]]
            inputs.append(ref[0].name)
        elif isinstance(value, str) and value.startswith("@@"):
            value = value[1:]
        values[key] = value
    if "model" not in raw and done:
        prev = list(done.values())[-1]
        values["model"] = prev.outputs["model"]
        inputs.append(prev.name)
        if prev.kind == "select" and "tiny_seed" not in raw:   # its base model, passed on
            values["tiny_seed"] = prev.config.tiny_seed
    return values, sorted(set(inputs))


def _plan_stage(i: int, raw, out_dir: str, done: dict, later: set, source: str) -> Stage:
    where = f"{source}: stages[{i}]"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected an object {{\"name\", \"kind\", ...options}}, got "
                          f"{json.dumps(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise RecipeError(f"{where}: name: " + ("is required" if name is None else f"{name!r} is not "
                          f"a folder name of letters, digits, '-' and '_'"))
    where = f"{source}: stage '{name}'"
    if name in done:
        raise RecipeError(f"{where}: name: another stage is called {name!r}")
    kind = raw.get("kind")
    if kind not in KINDS:
        what = "is required" if kind is None else f"{kind!r} is not a kind"
        raise RecipeError(f"{where}: kind: {what} (kinds: {', '.join(KINDS)})")
    folder = os.path.join(out_dir, name)
    values, inputs = _stage_options(where, kind, raw, done, later, folder)
    options = dict(values)
    values.update(_owned(kind, folder))
    cfg = KINDS[kind](**values)
    made = {v for st in done.values() for v in st.outputs.values() if v is not None}
    pending = tuple(k for k, v in values.items() if v in made and not os.path.exists(v))
    try:
        _validate(kind, cfg, pending)
    except ConfigError as e:
        raise RecipeError(f"{where}: {e.field}: {e.message}") from None
    return Stage(i, name, kind, folder, cfg, options, inputs, _outputs(kind, cfg, folder))


def plan_recipe(recipe, source: str = "recipe"):
    """``(out_dir, stages)``: the recipe (a dict, as :func:`load_recipe` returns) resolved
    into :class:`Stage` s, each checked as its command checks its arguments, with its
    status; :class:`RecipeError` naming ``source``, the stage and the option, before any
    work. Changes nothing."""
    if not isinstance(recipe, dict):
        raise RecipeError(f"{source}: expected an object {{\"out_dir\", \"stages\"}}, got "
                          f"{type(recipe).__name__}")
    unknown = [k for k in recipe if k not in TOP_KEYS]
    if unknown:
        raise RecipeError(f"{source}: {unknown[0]}: not a recipe key (keys: {', '.join(TOP_KEYS)})")
    out_dir, stages = recipe.get("out_dir"), recipe.get("stages")
    if not isinstance(out_dir, str) or not out_dir:
        raise RecipeError(f"{source}: out_dir: is required (the folder the stages write into)")
    if not isinstance(stages, list) or not stages:
        raise RecipeError(f"{source}: stages: is required (a non-empty list of stages)")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise RecipeError(f"{source}: out_dir: {out_dir} is a file, not a folder")
    names = {s.get("name") for s in stages if isinstance(s, dict)}
    done = {}
    for i, raw in enumerate(stages):
        later = names - set(done) - {raw.get("name") if isinstance(raw, dict) else None}
        st = _plan_stage(i, raw, out_dir, done, later, source)
        done[st.name] = st
    planned = list(done.values())
    for st in planned:
        st.status, st.note = _status(st, done, source)
    return out_dir, planned


# ---------------------------------------------------------------- finished stages

def _marker_digest(st: Stage) -> Optional[str]:
    path = os.path.join(st.folder, MARKER)
    return sha256_file(path) if os.path.isfile(path) else None


def _own_outputs(st: Stage) -> dict:
    """The stage's outputs inside its folder: ``{path relative to the folder: path}``."""
    root = os.path.abspath(st.folder) + os.sep
    return {os.path.relpath(p, st.folder): p for p in st.outputs.values()
            if p is not None and os.path.abspath(p).startswith(root)}


def _verify_outputs(st: Stage, files: dict) -> Optional[str]:
    """Why the stage's outputs do not verify (a model folder's manifest, an output file's
    SHA-256 as ``stage.json`` recorded it), or None."""
    for rel, path in _own_outputs(st).items():
        try:
            if os.path.isdir(path):
                verify_manifest(path)
            elif not os.path.isfile(path):
                return f"{path} is missing"
            elif sha256_file(path) != files.get(rel):
                return f"{path} changed since the stage finished"
        except VerifyError as e:
            return str(e)
    return None


def _differences(then: dict, now: dict) -> list:
    keys = sorted((set(then) | set(now)) - set(DISPLAY))
    return [f"{k}: then {then.get(k)!r}, now {now.get(k)!r}" for k in keys if then.get(k) != now.get(k)]


def _status(st: Stage, stages: dict, source: str):
    """``(status, note)`` of a stage: "finished" (its ``stage.json`` matches and its outputs
    verify), "resume" (an earlier attempt left work in its folder) or "run".
    :class:`RecipeError` for a finished stage that no longer fits the recipe."""
    where = f"{source}: stage '{st.name}'"
    marker = os.path.join(st.folder, MARKER)
    if not os.path.isfile(marker):
        started = os.path.isdir(st.folder) and any(n != ".lock" for n in os.listdir(st.folder))
        return ("resume", "an earlier attempt left work in its folder") if started else ("run", "")
    try:
        with open(marker, encoding="utf-8") as f:
            rec = json.load(f)
        then, inputs, files = rec["options"], rec["inputs"], rec["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RecipeError(f"{where}: {marker} cannot be read ({e}): remove {st.folder} to run the "
                          f"stage again") from None
    diffs = _differences(then, st.options) + ([f"kind: then {rec.get('kind')!r}"]
                                              if rec.get("kind") != st.kind else [])
    if diffs:
        raise RecipeError(f"{where}: finished earlier with other options ({'; '.join(diffs)}): remove "
                          f"{st.folder} to run it again, or choose another out_dir")
    for name in st.inputs:
        up = stages[name]
        if up.status != "finished" or inputs.get(name) != _marker_digest(up):
            raise RecipeError(f"{where}: finished earlier from stage '{name}', which is not finished "
                              f"now or finished again since: remove {st.folder} to run it again")
    problem = _verify_outputs(st, files)
    if problem:
        return "resume", f"its outputs do not verify ({problem}): it runs again"
    return "finished", ""


def _write_marker(st: Stage, stages: dict, result: dict) -> None:
    """``stage.json``, last: the stage is finished."""
    files = {rel: sha256_file(p) for rel, p in _own_outputs(st).items() if os.path.isfile(p)}
    rec = {"format": 1, "name": st.name, "kind": st.kind, "options": st.options,
           "inputs": {n: _marker_digest(stages[n]) for n in st.inputs}, "outputs": st.outputs,
           "files": files, "result": result}
    atomic_write(os.path.join(st.folder, MARKER), json.dumps(rec, indent=1, default=str) + "\n")


# ---------------------------------------------------------------- running

def stage_command(st: Stage) -> str:
    """The ``minorsft`` command that does what the stage does."""
    return shlex.join(["minorsft", st.kind, *config_to_argv(st.config)])


def format_plan(out_dir: str, stages: list, source: str = "recipe", description=None) -> str:
    """The resolved plan as text: each stage's status, command and outputs."""
    status = {"run": "to run", "resume": "to resume", "finished": "finished: skipped"}
    lines = [f"{source}: {len(stages)} stages into {out_dir}"]
    if description:
        lines.append(f"  {description}")
    for st in stages:
        note = f" ({st.note})" if st.note else ""
        lines.append(f"{st.index + 1}. {st.name} ({st.kind}): {status[st.status]}{note}")
        lines.append(f"   {stage_command(st)}")
        outs = "; ".join(f"{k} {v}" for k, v in st.outputs.items() if v is not None)
        lines.append(f"   outputs: {outs}")
    return "\n".join(lines)


def _run_stage(st: Stage, log) -> dict:
    """Run one stage; returns the summary its ``stage.json`` records."""
    if st.kind == "train":
        out = train_to_model(st.config, st.folder, log=log, info={"recipe_stage": st.name})
        res = out["result"] or {}
        return {"model": out["model"], "step": res.get("step"), "final_eval": res.get("final_eval")}
    if st.kind == "select":
        res = select(st.config, log=log)
        return {k: res[k] for k in ("rows", "kept", "finetuned", "kept_lines", "no_response_lines")}
    res = spin(st.config, log=log)
    return {"model": res["model"], "rounds": [{k: r[k] for k in ("round", "model", "last_step")}
                                              for r in res["rounds"]]}


def run_recipe(recipe, *, dry_run: bool = False, log=print) -> dict:
    """Run a recipe: ``recipe`` is a path (:func:`load_recipe`) or a dict. Checks it all
    first (:func:`plan_recipe`), then runs each stage that is not finished, in order,
    writing its ``stage.json`` when it ends; with ``dry_run`` prints the plan and stops.
    ``log(message)`` reports progress.

    Returns ``{"out_dir", "stages": [{"name", "kind", "status", "outputs", "result"}]}``
    (``status``: as planned; ``result``: what the stage returned, None when skipped).
    Raises :class:`RecipeError` for a recipe that cannot run (before any work) and, naming
    the stage, for an error a stage's command raises; a stop signal during a stage's
    training raises :class:`~minorsft.train.preempt.Preempted` (run again to resume)."""
    source = recipe if isinstance(recipe, (str, os.PathLike)) else "recipe"
    data = load_recipe(os.fspath(recipe)) if isinstance(recipe, (str, os.PathLike)) else recipe
    out_dir, stages = plan_recipe(data, source=str(source))
    log(format_plan(out_dir, stages, str(source), data.get("description")))
    summary = {"out_dir": out_dir, "stages": [{"name": st.name, "kind": st.kind, "status": st.status,
                                               "outputs": st.outputs, "result": None} for st in stages]}
    if dry_run:
        return summary
    by_name = {st.name: st for st in stages}
    lock = OutDirLock(out_dir)
    lock.acquire()
    try:
        for st, record in zip(stages, summary["stages"]):
            if st.status == "finished":
                log(f"stage {st.index + 1}/{len(stages)} '{st.name}' ({st.kind}): finished earlier, "
                    f"skipped")
                continue
            log(f"stage {st.index + 1}/{len(stages)} '{st.name}' ({st.kind}): {stage_command(st)}")
            try:
                record["result"] = _run_stage(st, log)
            except ConfigError as e:
                raise RecipeError(f"{source}: stage '{st.name}': {e.field}: {e.message}") from None
            except ValueError as e:
                raise RecipeError(f"{source}: stage '{st.name}': {e}") from None
            _write_marker(st, by_name, record["result"])
            st.status = "finished"
    finally:
        lock.release()
    return summary
