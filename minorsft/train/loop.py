"""The thin training loop: data -> model -> fused loss -> AdamW, with checkpoints.

Callable from Python (:func:`train` with a :class:`~minorsft.train.config.TrainConfig`)
and from the CLI (``minorsft train``). One optimiser step consumes a *global batch* of
``batch_size * grad_accum * world_size`` examples (pairs for the DPO family), drawn
from a seeded per-epoch permutation; rank ``r`` takes its slice of each micro-batch,
so a 2-rank run and a 1-rank run with twice the batch size see the same data.

Normalisation: the loss of each micro-batch is divided by the *global* count of the
step (label tokens for ``sft`` through ``num_items_in_batch``; sequences or pairs for
the others), counted on the host from the token lists, so gradient accumulation and
data parallelism give the same gradient as one big batch and nothing syncs.

A run is a :class:`Run`: named setup steps (data, model, reference, policy, optimiser,
resume), then a short step loop. Before it, :func:`train` checks the arguments and takes
the output folder (:mod:`~minorsft.train.outdir`: its lock, a refused rerun, ``--overwrite``)
and finds the verified checkpoint to resume from. Checkpoints live in
:mod:`~minorsft.train.checkpoint`, the process group in :mod:`~minorsft.train.distributed`,
metrics (and the non-finite check at their flush) in :mod:`~minorsft.train.metrics`,
signal handling in :mod:`~minorsft.train.preempt`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys

import torch

import minorsft as ms
from minorsft.train import data as D
from minorsft.train import reference as R
from minorsft.train.checkpoint import (check_resume_config, check_resume_data, check_resume_target,
                                       checkpoints, find_resume, latest_name, load_training_state,
                                       read_trainer_state, resolved_paths, save_checkpoint)
from minorsft.train.config import DTYPES, ConfigError, TrainConfig, resume_fields, validate_config
from minorsft.train.distributed import Dist, init_distributed, select_device, wrap_model
from minorsft.train.evaluate import evaluate
from minorsft.train.manifest import VerifyError
from minorsft.train.metrics import MetricsLog, NonFiniteError, StepLogger, StepRecord, say
from minorsft.train.optim import build_optimizer
from minorsft.train.outdir import OutDirLock, check_out_dir, prepare_out_dir
from minorsft.train.preempt import Preemption
from minorsft.train.step import LossSetup, compute_loss


def _check_resume_state(cfg: TrainConfig, path: str, state: dict) -> None:
    """The checkpoint's configuration (and world size) against ``cfg``; a ``max_steps``
    ending before its step."""
    check_resume_config(state, {k: getattr(cfg, k) for k in resume_fields()},
                        int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.max_steps is not None and cfg.max_steps < int(state["step"]):
        raise ConfigError("max_steps", f"{cfg.max_steps} ends before the step of the checkpoint "
                                       f"to resume from ({state['step']}, {path})")


def _check_arguments(cfg: TrainConfig):
    """The checks that change nothing and need no lock: the configuration, the output
    folder (rank 0), and the checkpoint to resume from. An explicit one is verified and
    checked here (returns its ``(path, state)``); for ``latest`` (found under the lock,
    after an interrupted save is repaired) the newest one's state is read unverified and
    checked against the configuration, so a mismatch is refused before any work."""
    validate_config(cfg)
    if os.environ.get("RANK", "0") != "0":
        return None
    check_out_dir(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    check_resume_target(cfg.resume, cfg.out_dir)
    if cfg.resume != "latest":
        return _resume_point(cfg, log=lambda m: None) if cfg.resume is not None else None
    for _step, path in checkpoints(cfg.out_dir):
        try:
            state = read_trainer_state(path)
        except VerifyError:
            continue
        _check_resume_state(cfg, path, state)
        break
    return None


def _resume_point(cfg: TrainConfig, log):
    """``(path, state)`` of the verified checkpoint to resume from (``None, None`` without
    ``resume``), its configuration checked against ``cfg``."""
    path, state = find_resume(cfg.resume, cfg.out_dir, log=log)
    if path is not None:
        _check_resume_state(cfg, path, state)
    return path, state


def check_config(cfg: TrainConfig):
    """Everything that can be refused before work starts, changing nothing: the
    configuration, the output folder (a file, not writable, a previous run without
    ``resume`` / ``overwrite``) and a ``resume`` checkpoint that does not verify or whose
    configuration (or world size) differs. Returns ``(resume_path, resume_state)``
    (``None, None`` without ``resume``). :func:`train` runs the same checks, the resume
    search under the output folder's lock, after repairing an interrupted save."""
    return _check_arguments(cfg) or _resume_point(cfg, log=lambda m: None)


def _claim_out_dir(cfg: TrainConfig, lock: OutDirLock, checked):
    """Rank 0, before the run reads its output folder: take the folder's lock, tidy it
    (stale temporaries, an interrupted save, ``--overwrite``) and find the checkpoint to
    resume from (``checked``: the one :func:`_check_arguments` verified, if any)."""
    lock.acquire()
    log = lambda m: say(True, m)   # noqa: E731
    prepare_out_dir(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite, log=log)
    return checked or _resume_point(cfg, log)


def train(cfg: TrainConfig) -> dict:
    """Run training as configured; returns ``{"history", "evals", "final_eval", "step",
    "checkpoint", "out_dir", "skipped_rows", "preempted"}`` (history: one dict per
    optimiser step with ``loss``, ``lr``, ``grad_norm`` and the loss metrics, gathered at
    each log interval; ``preempted``: the signal that stopped the run early, or None).

    Raises :class:`ConfigError` before any work for a bad configuration or output folder
    (also one another run holds), :class:`~minorsft.train.metrics.NonFiniteError` when a
    step's loss or gradient norm is not finite (nothing of it is saved), and
    :class:`~minorsft.train.preempt.Preempted` for a stop signal before the first step."""
    checked = _check_arguments(cfg)
    dist = init_distributed(cfg.device)
    lock = OutDirLock(cfg.out_dir)
    try:
        with Preemption(announce=dist.main) as preempt:
            resume_path, resume_state = dist.share(lambda: _claim_out_dir(cfg, lock, checked))
            run = Run(cfg, dist, preempt)
            run.setup(resume_path, resume_state)
            return run.loop()
    finally:
        lock.release()
        if dist.owns_group:
            torch.distributed.destroy_process_group()


def load_model(path, *, tiny_seed: int = 0):
    """The fp32 model (master weights) of a local HF directory, or the built-in tiny model."""
    if path is None or path == "tiny":
        from minorsft.train.tiny import build_tiny_model
        return build_tiny_model(seed=tiny_seed)[0]
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).float()


def load_model_and_tokenizer(path, *, tiny_seed: int = 0):
    """``(model fp32, tokenizer)`` from a local HF directory, or the built-in tiny model."""
    return load_model(path, tiny_seed=tiny_seed), load_tokenizer(path)


def load_tokenizer(path):
    """The tokenizer of a local HF directory, or the built-in tiny model's."""
    if path is None or path == "tiny":
        from minorsft.train.tiny import build_tokenizer
        return build_tokenizer()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


class Run:
    """One training run: ``setup`` (the named steps below), then ``loop``."""

    def __init__(self, cfg: TrainConfig, dist: Dist, preempt: Preemption | None = None):
        self.cfg, self.dist, self.preempt = cfg, dist, preempt
        self.setup_loss = LossSetup.from_config(cfg)
        self.kind = "pairs" if self.setup_loss.spec.pairs else "sft"
        self.skipped_steps = 0   # non-finite steps skipped so far (--skip-nonfinite)

    # ---------------------------------------------------------------- setup steps

    def setup(self, resume_path, resume_state) -> None:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        self.device = select_device(self.cfg.device, self.dist)
        ms.take_label_errors(self.device)         # the run reports its own bad labels only
        self._setup_seeds()
        self._setup_data(resume_state)           # a bad row is refused before any model is built
        model = self._setup_model()
        self.reference = self._setup_reference(model)
        self._setup_policy(model, resume_path)
        self._setup_optimizer()
        self.start_step = self._resume(resume_path, resume_state)
        self.resume_path = resume_path

    def _setup_seeds(self) -> None:
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)

    def _data_paths(self):
        cfg = self.cfg
        if cfg.data is not None:
            return cfg.data, cfg.eval_data
        from minorsft.train.tiny import write_synthetic_dataset
        d = os.path.join(cfg.out_dir, "data")
        say(self.dist.main, f"no --data: training on the built-in synthetic task set ({d})")
        if self.dist.main and not os.path.exists(os.path.join(d, "eval.jsonl")):
            write_synthetic_dataset(d, seed=cfg.seed)
        self.dist.barrier()
        return os.path.join(d, "train.jsonl"), cfg.eval_data or os.path.join(d, "eval.jsonl")

    def _setup_data(self, resume_state) -> None:
        cfg = self.cfg
        if cfg.model is None:
            say(self.dist.main, "no --model: training the built-in tiny model (a 0.1M-parameter "
                                "Llama with a character tokenizer, for trying things out)")
        self.tokenizer = load_tokenizer(cfg.model)
        train_path, eval_path = self._data_paths()
        load = dict(max_length=cfg.max_length, kind=self.kind, skip_bad_rows=cfg.skip_bad_rows)
        self.train_ds = D.load_dataset(train_path, self.tokenizer, **load)
        self.train_path = train_path
        if resume_state is not None:
            check_resume_data(resume_state, self.train_ds.fingerprint, train_path,
                              log=lambda m: say(self.dist.main, m))
        self._setup_length(resume_state)
        self.eval_ds = (D.load_dataset(eval_path, self.tokenizer, limit=cfg.eval_limit, **load)
                        if eval_path else None)
        if self.train_ds.skipped:
            say(self.dist.main, f"skipped {len(self.train_ds.skipped)} bad rows in {train_path} "
                                f"(first: {self.train_ds.skipped[0]})")
        self.pad_id = D.pad_token_id(self.tokenizer)

    def _setup_model(self):
        model = load_model(self.cfg.model, tiny_seed=self.cfg.tiny_seed)
        model.to(self.device)
        self.vocab = vocab = model.get_output_embeddings().weight.shape[0]
        for name, ds in (("data", self.train_ds), ("eval_data", self.eval_ds)):
            if ds is not None and D.max_token_id(ds) >= vocab:
                raise ConfigError(name, f"token id {D.max_token_id(ds)} >= the model's vocabulary "
                                  f"{vocab} (tokenizer/model mismatch)")
        if self.cfg.fused_linear:   # the model's logit transform (soft-capping, scale) or a refusal
            self.setup_loss = LossSetup.from_config(self.cfg, model)
        use_bf16 = self.cfg.bf16 and self.device.type == "cuda"
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        return model

    def autocast(self):
        """The forward passes' autocast context (bf16 on CUDA unless disabled)."""
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _setup_reference(self, model) -> R.ReferenceSetup:
        cfg = self.cfg
        if not cfg.uses_reference():
            return R.ReferenceSetup()
        ref = R.setup_reference(
            model, (self.train_ds, self.eval_ds), precompute=cfg.precompute_ref,
            dtype=DTYPES[cfg.ref_dtype] if cfg.ref_dtype else None,
            device=torch.device(cfg.ref_device) if cfg.ref_device else self.device,
            policy_device=self.device, collate_fn=lambda exs, kind: D.collate(exs, self.pad_id, kind),
            batch_size=cfg.eval_batch_size or cfg.batch_size, max_length=cfg.max_length,
            cache_dir=cfg.ref_cache_dir or os.path.join(cfg.out_dir, "ref-cache"),
            temperature=cfg.temperature, backend=cfg.backend, autocast_dtype=self.autocast_dtype,
            main=self.dist.main, barrier=self.dist.barrier, log=lambda m: say(self.dist.main, m))
        ms.check_label_errors(self.device, "the reference precomputation", self.vocab)
        return ref

    def _setup_policy(self, model, resume_path) -> None:
        if resume_path is not None:
            # the policy continues from the checkpoint's weights, copied into the model already
            # on the device (the checkpoint is read on the host): one policy-sized copy there
            model.load_state_dict(load_model(resume_path).state_dict())
        model.config.use_cache = False
        if self.cfg.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.unwrapped = model
        self.model = wrap_model(model, self.dist, self.device, fsdp=self.cfg.fsdp)

    def _setup_length(self, resume_state) -> None:
        """Examples per step and the run's length; a resume may change the length
        (``--max-steps`` / ``--epochs``), not end before the checkpoint's step."""
        cfg = self.cfg
        self.per_step = cfg.batch_size * cfg.grad_accum * self.dist.world
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.train_ds) / self.per_step))
        if resume_state is not None and self.total_steps < int(resume_state["step"]):
            raise ConfigError("max_steps" if cfg.max_steps else "epochs",
                              f"the run would end at step {self.total_steps}, before the step of "
                              f"the checkpoint to resume from ({resume_state['step']})")

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        self.optimizer, self.scheduler = build_optimizer(
            self.unwrapped.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
            schedule=cfg.schedule, warmup_steps=cfg.warmup_steps, total_steps=self.total_steps)

    def _resume(self, resume_path, resume_state) -> int:
        self.log = MetricsLog(self.cfg.out_dir, main=self.dist.main, run_name=self.cfg.run_name)
        if resume_path is None:
            self.log.start(None)
            return 0
        load_training_state(resume_path, self.unwrapped, self.optimizer, self.scheduler)
        # The optimizer carries the rate of the checkpoint's schedule; recompute it from this
        # run's (the same value, unless --max-steps / --epochs changed the run's length).
        self.scheduler.last_epoch -= 1
        self.scheduler.step()
        self.skipped_steps = int(resume_state.get("skipped_nonfinite", 0))
        step = int(resume_state["step"])
        self.log.start(step)
        say(self.dist.main, f"resumed from {resume_path} at step {step}")
        return step

    # ---------------------------------------------------------------- the loop

    def loop(self) -> dict:
        from tqdm.auto import tqdm
        cfg = self.cfg
        if self.start_step >= self.total_steps:
            return self._already_finished()
        self.sampler = D.Sampler(len(self.train_ds), cfg.seed)
        keys = self.setup_loss.spec.progress or (("deviation",) if cfg.uses_reference() else ())
        bar = tqdm(total=self.total_steps, initial=self.start_step, dynamic_ncols=True,
                   disable=not (cfg.progress and self.dist.main), desc=cfg.run_name or cfg.loss,
                   file=sys.stderr)
        logger = StepLogger(self.log, keys, world=self.dist.world, device=self.device, bar=bar,
                            print_steps=cfg.print_steps, vocab=self.vocab)
        step, last_ckpt, stop = self.start_step, None, None
        if self.preempt is not None:
            self.preempt.deferring = True   # a signal now ends the run after this step
        for step in range(self.start_step + 1, self.total_steps + 1):
            record, tokens = self._train_step(step, keys)
            logger.add(record, tokens)
            bar.update(1)
            final = step == self.total_steps
            stop = self._stop_requested()
            # Every flush checks the values it reads (NonFiniteError): before each checkpoint.
            if step % cfg.log_every == 0 or final or stop or record.halt:
                self._flush(logger)
            if stop:
                break
            if cfg.eval_every and step % cfg.eval_every == 0 and not final:
                self._flush(logger)
                self._evaluate(step)
            if cfg.save_every and step % cfg.save_every == 0 and not final:
                self._flush(logger)
                last_ckpt = self._save(step)
        self._flush(logger)
        bar.close()
        final_eval = None if stop else self._evaluate(step)
        last_ckpt = self._save(step)
        if stop:
            say(self.dist.main, f"{stop}: stopped after step {step}; checkpoint {last_ckpt}")
        return self._result(step, final_eval, last_ckpt, stop)

    def _already_finished(self) -> dict:
        """A resume from the run's last checkpoint (a crash after the final save, before
        what came next): nothing to train, no checkpoint rewritten; the final evaluation
        is the one logged at that step (run again only if none was)."""
        step = self.start_step
        say(self.dist.main, f"the run already ended at step {step} ({self.resume_path}): nothing to train")
        final_eval = self.dist.share(lambda: self.log.resumed_eval) or self._evaluate(step)
        return self._result(step, final_eval, self.resume_path, None)

    def _result(self, step: int, final_eval, checkpoint: str, stop) -> dict:
        return {"history": self.log.history, "evals": self.log.evals, "final_eval": final_eval,
                "step": step, "checkpoint": checkpoint, "out_dir": self.cfg.out_dir,
                "skipped_rows": len(self.train_ds.skipped), "preempted": stop}

    def _stop_requested(self):
        """The name of the signal that asked the run to stop, or None. With several ranks
        they must stop after the same step: one all-reduce of the host flag per step, over
        a CPU group (no wait for the device)."""
        name = self.preempt.requested if self.preempt is not None else None
        if self.dist.world > 1 and self.dist.any_host(name is not None):
            return name or "SIGTERM"   # another rank's signal
        return name

    def _flush(self, logger: StepLogger) -> None:
        """Flush the step records; a non-finite one stops the run, saying what was kept."""
        try:
            logger.flush()
        except NonFiniteError as e:
            named = latest_name(self.cfg.out_dir)
            kept = (f"{os.path.join(self.cfg.out_dir, 'latest')} still names {named}" if named
                    else "no checkpoint was written")
            raise NonFiniteError(e.step, f"{e}; the run stopped, nothing from step {e.step} on was "
                                 f"saved ({kept}); try a lower --lr, or --skip-nonfinite N") from None

    def _micro_batches(self, step: int):
        """The step's global batch as ``grad_accum`` micro-batches of examples (all ranks)."""
        A, BW = self.cfg.grad_accum, self.cfg.batch_size * self.dist.world
        first = (step - 1) * A * BW
        return [[self.train_ds.examples[i] for i in self.sampler.indices(first + a * BW, BW)]
                for a in range(A)]

    def _train_step(self, step: int, keys) -> tuple:
        """One optimiser step; returns ``(StepRecord, tokens this rank read)``."""
        cfg, dist = self.cfg, self.dist
        micro = self._micro_batches(step)
        if self.setup_loss.spec.token_level:
            num_items = sum(sum(l != D.IGNORE_INDEX for l in e.labels[1:]) for mb in micro for e in mb)
            denom = None
        else:
            num_items, denom = None, float(sum(len(mb) for mb in micro))
        step_loss = torch.zeros((), device=self.device)
        step_metrics = {k: torch.zeros((), device=self.device) for k in keys}
        tokens = 0
        for a, mb in enumerate(micro):
            mine = mb[dist.rank * cfg.batch_size: (dist.rank + 1) * cfg.batch_size]
            loss, m, n = self._micro_step(mine, last=a == len(micro) - 1, num_items=num_items, denom=denom)
            tokens += n
            step_loss += loss.detach().float()
            for k in keys:
                step_metrics[k] += m[k].float() / len(micro)
        if cfg.dump_grads and step == self.start_step + 1:
            _dump_grads(cfg.dump_grads, self.unwrapped, dist)
        lr = self.scheduler.get_last_lr()[0]   # the rate this step uses
        grad_norm, verdict = self._optimizer_step(step, step_loss)
        return StepRecord(step, step_loss, grad_norm, lr, step_metrics,
                          label_errors=ms.take_label_errors(self.device),   # read at the flush
                          skipped=verdict == "skipped", halt=verdict == "halt"), tokens

    def _micro_step(self, examples, *, last: bool, num_items, denom):
        """Forward and backward of this rank's share of one micro-batch."""
        b = D.collate(examples, self.pad_id, self.kind)
        idx = b.pop("index")
        tokens = int(b["attention_mask"].sum())
        b = {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
        table = self.reference.train_table
        ref = R.lookup(table, idx.to(self.device, non_blocking=True), self.kind) if table is not None else None
        W, fsdp = self.dist.world, self.cfg.fsdp
        if W > 1 and fsdp:
            self.model.set_requires_gradient_sync(last)
        sync = self.model.no_sync() if (W > 1 and not fsdp and not last) else contextlib.nullcontext()
        with sync:
            with self.autocast():
                loss, m = compute_loss(self.setup_loss, self.model, b, ref_model=self.reference.model,
                                       ref_logps=ref, denom=denom, num_items=num_items,
                                       unwrapped=self.unwrapped)
            # DDP / FSDP average gradients over ranks; the loss is normalised globally.
            (loss * W).backward()
        return loss, m, tokens

    def _optimizer_step(self, step: int, step_loss: torch.Tensor):
        """Clip, step, schedule, zero; returns ``(gradient norm (a device tensor), verdict)``,
        ``verdict`` None (stepped), ``"skipped"`` or ``"halt"`` (see :meth:`_check_finite`)."""
        params = list(self.unwrapped.parameters())
        if self.cfg.clip_grad:
            gn = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
        else:
            gn = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        verdict = self._check_finite(step, step_loss, gn) if self.cfg.skip_nonfinite else None
        if verdict is None:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # identical on every rank; the logger averages it after the cross-rank sum
        return gn.detach().float().to(self.device), verdict

    def _check_finite(self, step: int, step_loss: torch.Tensor, gn: torch.Tensor):
        """With ``--skip-nonfinite N``: None when the step's loss and gradient norm are finite
        (on every rank), else ``"skipped"`` (no update; up to N times) or ``"halt"`` (N spent:
        no update, and the loop's next flush stops the run).

        This reads one scalar per optimiser step on the host, only with the option: a
        skip must be decided before ``optimizer.step()``. Without it the loop finds a
        non-finite step where it already synchronises (the log flush, which precedes
        every checkpoint), and the loss path itself never syncs."""
        bad = ~(torch.isfinite(step_loss.float()) & torch.isfinite(gn.float()))
        if not self.dist.any(bad, self.device):
            return None
        if self.skipped_steps >= self.cfg.skip_nonfinite:
            return "halt"
        self.skipped_steps += 1
        say(self.dist.main, f"step {step}: the loss or gradient norm is not finite: optimiser update "
                            f"skipped ({self.skipped_steps} of --skip-nonfinite {self.cfg.skip_nonfinite})")
        return "skipped"

    def _evaluate(self, step: int):
        if self.eval_ds is None:
            return None
        cfg = self.cfg
        res = evaluate(self.setup_loss, self.model, self.eval_ds,
                       batch_size=cfg.eval_batch_size or cfg.batch_size, pad_id=self.pad_id,
                       device=self.device, ref_model=self.reference.model,
                       ref_table=self.reference.eval_table, tokenizer=self.tokenizer,
                       generate=cfg.eval_generate, autocast=self.autocast)
        ms.check_label_errors(self.device, f"the evaluation at step {step}", self.vocab)
        self.log.add_eval(step, res)
        say(self.dist.main, "eval  step %4d  " % step + "  ".join(f"{k}={v:.4f}" for k, v in res.items()))
        return res

    def _save(self, step: int) -> str:
        resolved = {**resolved_paths(dataclasses.asdict(self.cfg)), "data": os.path.realpath(self.train_path)}
        return save_checkpoint(self.cfg.out_dir, self.dist, self.unwrapped, self.tokenizer,
                               self.optimizer, self.scheduler, step=step, position=step * self.per_step,
                               config=dataclasses.asdict(self.cfg),
                               data_fingerprint=self.train_ds.fingerprint,
                               extra={"skipped_nonfinite": self.skipped_steps, "resolved": resolved},
                               keep_last=self.cfg.save_total_limit)


def _dump_grads(path, unwrapped, dist):
    """Write the accumulated, rank-averaged gradients (full tensors) to ``path`` (rank 0)."""
    from safetensors.torch import save_file
    grads = {}
    for name, p in unwrapped.named_parameters():
        if p.grad is not None:
            g = p.grad
            g = g.full_tensor() if hasattr(g, "full_tensor") else g
            grads[name] = g.detach().float().cpu().contiguous()
    if dist.main:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(grads, path)
