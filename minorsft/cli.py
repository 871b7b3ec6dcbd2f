"""Command line: ``minorsft train | select | spin | recipe | plot | demo`` (also ``python -m minorsft``).

A thin layer: each command's flags are generated from its config dataclass (one flag per
field, with its default and help: :class:`~minorsft.train.TrainConfig`,
:class:`~minorsft.train.SelectConfig`, :class:`~minorsft.train.SpinConfig`,
:class:`~minorsft.train.RecipeConfig`), and the configuration is checked before any work
starts. Distributed training goes through torchrun, e.g.
``torchrun --nproc-per-node 2 -m minorsft train --data d.jsonl [--fsdp]``.

Exit status: 0 done; 2 refused before any work (a bad flag, data row, recipe or output
folder, a checkpoint that does not verify); 3 a non-finite loss or gradient norm stopped
the run (nothing of it saved); 75 (:data:`~minorsft.train.preempt.EXIT_PREEMPTED`)
stopped by SIGTERM / SIGINT, after writing a checkpoint when a step was running: ``train``
prints the command that resumes it, ``spin`` and ``recipe`` resume when run again; 130
Ctrl-C while the arguments were being checked.
"""
from __future__ import annotations

import argparse
import json
import sys

from minorsft.train.config import ConfigError, add_arguments, check_fields, config_from_args, flag

EXIT_REFUSED = 2
EXIT_NONFINITE = 3


# The commands generated from a config dataclass: (help, description).
COMMANDS = {
    "train": ("fine-tune a causal LM with a fused loss",
              "Fine-tune a causal LM with a fused loss against a frozen reference."),
    "select": ("LoBaSS: keep the SFT rows a fine-tune learns most from",
               "Score each SFT row by its learnability (L0 - L1) / L0 (token-mean response "
               "cross-entropy under the base and a fine-tuned model) and keep the top fraction."),
    "spin": ("SPIN: self-play rounds of DPO against the model's own responses",
             "Each round the previous round's model answers the SFT prompts; a DPO-family loss "
             "prefers the dataset's response, with the previous round's model as reference."),
    "recipe": ("run a multi-stage pipeline (train / select / spin stages) from a file",
               "Run the stages of a recipe file in order; finished stages are skipped."),
}


def config_class(command: str):
    """The config dataclass of a command."""
    from minorsft.train import RecipeConfig, SelectConfig, SpinConfig, TrainConfig
    return {"train": TrainConfig, "select": SelectConfig, "spin": SpinConfig,
            "recipe": RecipeConfig}[command]


def build_parser() -> argparse.ArgumentParser:
    """The ``minorsft`` parser: ``train``, ``select``, ``spin``, ``recipe``, ``plot`` and ``demo``."""
    parser = argparse.ArgumentParser(
        prog="minorsft", description="Fine-tune causal LMs with the fused SFT / MinorSFT / DPO / MinorDPO losses.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, (help_text, description) in COMMANDS.items():
        add_arguments(sub.add_parser(command, help=help_text, description=description),
                      config_class(command))
    pl = sub.add_parser(
        "plot", help="draw training runs' metrics.jsonl as a PNG",
        description="Draw the metrics of one or more training runs against the step: the "
                    "training loss, held-out cross-entropy, exact match and deviation (those the "
                    "runs recorded), one colour per run, training as lines, evaluations as markers.")
    pl.add_argument("runs", nargs="+", metavar="RUN",
                    help="a run's output folder (train's --out-dir) or its metrics.jsonl")
    pl.add_argument("--out", default=None,
                    help="the PNG to write (default: metrics.png beside the first RUN's metrics.jsonl)")
    pl.add_argument("--title", default=None, help="a title above the panels")
    dm = sub.add_parser(
        "demo", help="SFT vs MinorSFT fine-tuning a trained tiny model on new tasks",
        description="Train the built-in tiny model on task family A (cached), fine-tune it on "
                    "family B with SFT and MinorSFT at a grid of learning rates, and compare "
                    "what each learns (B) and keeps (A).")
    dm.add_argument("--out-dir", default="runs/demo",
                    help="output folder: results.json, frontier.png, the cached base model in "
                         "OUT_DIR/base and each run's folder in OUT_DIR/runs (default: %(default)s)")
    dm.add_argument("--seed", type=int, default=0,
                    help="seed of the data, the model's initialisation and the data order; "
                         "another seed trains another base model (default: %(default)s)")
    return parser


def _label(command: str, name: str) -> str:
    """A config field as the command line spells it: ``--flag``, or ``FILE`` (positional)."""
    f = config_class(command).__dataclass_fields__.get(name)
    return name.upper() if f is not None and f.metadata["positional"] else flag(name)


def _error(command: str, e: Exception, status: int = EXIT_REFUSED) -> int:
    """Print a one-line error (a config field spelled as its flag) and return ``status``."""
    msg = f"{_label(command, e.field)}: {e.message}" if isinstance(e, ConfigError) else str(e)
    print(f"minorsft {command}: error: {msg}", file=sys.stderr)
    return status


def _preempted(cfg, signame: str, checkpoint) -> int:
    """Say how the run stopped and print the command that resumes it; returns 75."""
    from minorsft.train.checkpoint import checkpoints
    from minorsft.train.preempt import EXIT_PREEMPTED, resume_command
    done = f"checkpoint {checkpoint} written" if checkpoint else "stopped at once, no new checkpoint"
    cmd = resume_command(cfg, has_checkpoint=bool(checkpoints(cfg.out_dir)))
    print(f"minorsft train: {signame}: {done}; resume with:\n  {cmd}", file=sys.stderr)
    return EXIT_PREEMPTED


def _pipeline(command: str, cfg) -> int:
    """``select`` / ``spin`` / ``recipe``: run, print the result's summary line (JSON)."""
    from minorsft.train import run_recipe, select, spin
    from minorsft.train.metrics import NonFiniteError
    from minorsft.train.preempt import EXIT_PREEMPTED, Preempted
    try:
        if command == "select":
            res = select(cfg)
            summary = {k: res[k] for k in ("rows", "kept", "out", "scores", "finetuned")}
        elif command == "spin":
            res = spin(cfg)
            summary = {"model": res["model"], "rounds": [r["model"] for r in res["rounds"]]}
        else:
            check_fields(cfg)
            res = run_recipe(cfg.file, dry_run=cfg.dry_run)
            if cfg.dry_run:
                return 0
            summary = {"out_dir": res["out_dir"], "stages": {s["name"]: s["outputs"] for s in res["stages"]}}
    except ValueError as e:   # config, recipe, bad rows, a stage's refusal
        return _error(command, e)
    except NonFiniteError as e:
        return _error(command, e, EXIT_NONFINITE)
    except Preempted as e:
        print(f"minorsft {command}: {e.signame}: stopped; run the same command again to continue "
              f"(finished parts are skipped, the interrupted training resumes from its last "
              f"checkpoint)", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:   # Ctrl-C outside a training run (loading, scoring, generating)
        print(f"minorsft {command}: interrupted; run the same command again to continue (finished "
              f"parts are skipped)", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plot":
        from minorsft.train.plots import plot_metrics
        try:
            print(plot_metrics(args.runs, args.out, title=args.title))
        except ValueError as e:   # a run without metrics.jsonl, nothing to draw
            return _error("plot", e)
        return 0
    if args.command == "demo":
        from minorsft.demo import run_demo
        run_demo(out_dir=args.out_dir, seed=args.seed)
        return 0
    if args.command != "train":
        return _pipeline(args.command, config_from_args(args, config_class(args.command)))
    from minorsft.train import train
    from minorsft.train.metrics import NonFiniteError
    from minorsft.train.preempt import Preempted
    cfg = config_from_args(args)
    try:
        result = train(cfg)   # checks everything it can before any work
    except ValueError as e:   # config, bad rows (data.DataError), tokenizer/model mismatch, ...
        return _error("train", e)
    except NonFiniteError as e:
        return _error("train", e, EXIT_NONFINITE)
    except Preempted as e:
        return _preempted(cfg, e.signame, None)
    except KeyboardInterrupt:   # Ctrl-C before the signal handlers were installed
        print("minorsft train: interrupted before training started", file=sys.stderr)
        return 130
    if result.get("preempted"):
        return _preempted(cfg, result["preempted"], result["checkpoint"])
    if result.get("final_eval"):
        print(json.dumps({"step": result["step"], "eval": result["final_eval"]}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
