"""Command line: ``minorsft train ...`` / ``minorsft demo`` (also ``python -m minorsft``).

Every ``train`` flag maps to a :class:`minorsft.train.TrainConfig` field; the
configuration is validated before any work starts. Distributed runs go through
torchrun, e.g. ``torchrun --nproc-per-node 2 -m minorsft train --data d.jsonl [--fsdp]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from minorsft.train.loop import LENGTH_NORMS, LOSS_TYPES, LOSSES, SCHEDULES, TrainConfig


def _bool_flag(p, name, default, help):
    p.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction,
                   default=default, help=help)


def _opt_int(s):
    return None if s.lower() == "none" else int(s)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="minorsft", description="Fine-tune causal LMs with the fused SFT / MinorSFT / DPO / MinorDPO losses.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a causal LM with a fused loss")
    g = t.add_argument_group("loss")
    g.add_argument("--loss", choices=LOSSES, default=d.loss)
    g.add_argument("--loss-type", choices=LOSS_TYPES, default=d.loss_type, help="DPO variant (--loss dpo)")
    g.add_argument("--beta", type=float, default=d.beta)
    g.add_argument("--length-norm", choices=LENGTH_NORMS, default=d.length_norm, help="MinorSFT length normalisation")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                   help="loss backend (default: triton on CUDA, torch on CPU)")
    g.add_argument("--fused-linear", action="store_true",
                   help="compute the loss from hidden states and the lm_head weight (minorsft.linear)")
    g = t.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="local Hugging Face model directory (default: the built-in tiny model)")
    g.add_argument("--tiny-seed", type=int, default=d.tiny_seed)
    g.add_argument("--data", default=None, help="JSONL file or datasets dir (default: the synthetic task set)")
    g.add_argument("--eval-data", default=None)
    g.add_argument("--max-length", type=int, default=d.max_length)
    _bool_flag(g, "skip-bad-rows", d.skip_bad_rows, "skip and count bad rows instead of failing")
    g = t.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per rank, per micro-batch (pairs for DPO)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    g.add_argument("--max-steps", type=_opt_int, default=None)
    g.add_argument("--epochs", type=float, default=d.epochs)
    g.add_argument("--clip-grad", type=float, default=d.clip_grad, help="0 disables clipping")
    _bool_flag(g, "bf16", d.bf16, "bf16 autocast on CUDA (ignored on CPU)")
    _bool_flag(g, "gradient-checkpointing", d.gradient_checkpointing, "recompute activations in backward")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=None)
    _bool_flag(g, "fsdp", d.fsdp, "shard with FSDP2 (fully_shard) under torchrun instead of DDP")
    g = t.add_argument_group("reference model")
    _bool_flag(g, "precompute-ref", d.precompute_ref, "precompute reference log-probs once and cache them")
    g.add_argument("--ref-cache-dir", default=None, help="default: OUT_DIR/ref-cache")
    g.add_argument("--ref-dtype", default=None, choices=("float32", "bfloat16", "float16"))
    g.add_argument("--ref-device", default=None)
    _bool_flag(g, "track-deviation", d.track_deviation, "sft: keep a reference to report the deviation")
    g = t.add_argument_group("logging, eval, checkpoints")
    g.add_argument("--out-dir", default=d.out_dir)
    g.add_argument("--run-name", default=None)
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--eval-every", type=int, default=d.eval_every)
    g.add_argument("--eval-batch-size", type=int, default=None)
    g.add_argument("--eval-limit", type=int, default=None)
    _bool_flag(g, "eval-generate", d.eval_generate, "exact-match accuracy by greedy generation")
    g.add_argument("--save-every", type=int, default=d.save_every)
    g.add_argument("--resume", default=None, help="checkpoint directory, or 'latest' (OUT_DIR/latest)")
    _bool_flag(g, "progress", d.progress, "tqdm progress bar")
    _bool_flag(g, "print-steps", d.print_steps, "print a line per logged step")
    g.add_argument("--dump-grads", default=None, help="debug: write the first step's gradients (safetensors)")

    dm = sub.add_parser("demo", help="SFT vs MinorSFT on the built-in tiny model and synthetic tasks")
    dm.add_argument("--out-dir", default="runs/demo")
    dm.add_argument("--steps", type=int, default=None)
    dm.add_argument("--beta", type=float, default=None)
    dm.add_argument("--seed", type=int, default=0)
    return parser


def config_from_args(args) -> TrainConfig:
    """The :class:`TrainConfig` for parsed ``train`` arguments."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    if cfg.clip_grad == 0:
        cfg.clip_grad = None
    return cfg


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from minorsft.demo import run_demo
        run_demo(out_dir=args.out_dir, steps=args.steps, beta=args.beta, seed=args.seed)
        return 0
    from minorsft.train import check_config, train
    cfg = config_from_args(args)
    try:
        check_config(cfg)
    except ValueError as e:
        print(f"minorsft train: error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg)
    except ValueError as e:   # bad rows (data.DataError), tokenizer/model mismatch, ...
        print(f"minorsft train: error: {e}", file=sys.stderr)
        return 2
    if result.get("final_eval"):
        print(json.dumps({"step": result["step"], "eval": result["final_eval"]}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
