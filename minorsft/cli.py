"""Command line: ``minorsft train ...`` / ``minorsft demo`` (also ``python -m minorsft``).

A thin layer: ``train``'s flags are generated from :class:`minorsft.train.TrainConfig`
(one flag per field, with its default and help) and the configuration is validated
before any work starts. Distributed runs go through torchrun, e.g.
``torchrun --nproc-per-node 2 -m minorsft train --data d.jsonl [--fsdp]``.

Exit status of ``train``: 0 done; 2 refused before any work (a bad flag, data row or
output folder, a checkpoint that does not verify); 3 a non-finite loss or gradient norm
stopped the run (nothing of it saved); 75 (:data:`~minorsft.train.preempt.EXIT_PREEMPTED`)
stopped by SIGTERM / SIGINT, after writing a checkpoint when a step was running: the
command that resumes it is printed; 130 Ctrl-C while the arguments were being checked.
"""
from __future__ import annotations

import argparse
import json
import sys

from minorsft.train.config import ConfigError, add_arguments, config_from_args, flag

EXIT_REFUSED = 2
EXIT_NONFINITE = 3


def build_parser() -> argparse.ArgumentParser:
    """The ``minorsft`` parser with its ``train`` and ``demo`` commands."""
    parser = argparse.ArgumentParser(
        prog="minorsft", description="Fine-tune causal LMs with the fused SFT / MinorSFT / DPO / MinorDPO losses.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune a causal LM with a fused loss",
                       description="Fine-tune a causal LM with a fused loss against a frozen reference.")
    add_arguments(t)
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


def _error(command: str, e: Exception, status: int = EXIT_REFUSED) -> int:
    """Print a one-line error (a config field spelled as its flag) and return ``status``."""
    msg = f"{flag(e.field)}: {e.message}" if isinstance(e, ConfigError) else str(e)
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from minorsft.demo import run_demo
        run_demo(out_dir=args.out_dir, seed=args.seed)
        return 0
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
