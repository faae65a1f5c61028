"""The run's folder (--out) from train.py's side: a run started, resumed or found finished; run.json
(the run's settings); what a checkpoint holds (the student, the optimizer, the scaler, the step, the
log window, the RNG) and reading it back into the loop's state. The files themselves (atomic writes,
the --keep rotation, the resume checks, the lock) are checkpoint.py's.
"""

import json
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist

from checkpoint import (checkpoint_path, finished_run, list_checkpoints, load_optimizer_state, lock_out_dir,
                        resuming, save_checkpoint, truncate_metrics)
from cluster import check_restartable, check_shared_out, inductor_cache, split_global_batch


def run_config(args, world_size, dtype, dtype_reason):
    """The run's settings as recorded in checkpoints and run.json: the flags, with the dtype resolved
    (never "auto": a resume compares what was computed) and the global batch standing for its split."""
    config = {k: v for k, v in vars(args).items()}
    config.update(dtype=dtype, dtype_requested=args.dtype, dtype_reason=dtype_reason,
                  global_batch=args.batch_size * args.grad_accum * world_size)
    return config


def start_or_resume(args, rank, world_size, master):
    """Before any work, on every rank: --global-batch split over this many ranks (the accumulation);
    --out checked to be one folder for all nodes; --resume auto turned into a start or a resume
    (args.resume becomes a bool). Returns the step of a finished run in --out (after one line saying
    so; nothing is rewritten), else None."""
    if args.global_batch is not None:  # the same global batch on any number of ranks: the same run
        args.grad_accum = split_global_batch(args.global_batch, args.batch_size, world_size)
    if args.compile:
        inductor_cache(args.out)  # compiled kernels kept in --out, for a restarted group on any node
    if args.cache_only:  # tokenizes; neither reads nor writes --out
        args.resume = False
        return None
    check_restartable()
    check_shared_out(args.out, rank, world_size)  # every rank reads what rank 0 writes there
    done = finished_run(args.out, args) if args.resume else None
    if done is not None and master:
        more = ("a larger --max-steps extends it" if list_checkpoints(args.out) else
                "its checkpoints are deleted, so a longer run is a new run, in another --out")
        print(f"{args.out} holds a finished run (step {done}): nothing to do; {more}")
    args.resume = resuming(args.out, args.resume)  # --resume auto: resume if there is a checkpoint
    return done


def open_run_folder(args, config, step):
    """Rank 0's --out: created and locked (the lock is returned, and held while it is referenced or
    the process lives), run.json written, and what a crashed run logged after the checkpoint we
    resume from dropped from metrics.jsonl (a new run starts it empty)."""
    os.makedirs(args.out, exist_ok=True)
    lock = lock_out_dir(args.out)
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump(config, f, indent=1)
    truncate_metrics(args.out, step if args.resume else -1)
    return lock


def resume_state(ckpt, ckpt_path, student, optimizer, scaler, n_terms, master):
    """The loop's state at its start: a checkpoint's (weights, optimizer and scaler loaded in place,
    the step, the teacher's held-out scores, the skipped steps, the log window, the RNG), or a new run's."""
    if ckpt is None:
        return SimpleNamespace(step=0, teacher_scores=None, skipped=0, window=[0.0] * (n_terms + 1), n_logged=0)
    student.load_state_dict(ckpt["student"])
    load_optimizer_state(optimizer, ckpt["optimizer"])  # with this run's fused/foreach, not the saved run's
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng_cpu"])
    window, n_logged = ckpt["log_window"]  # losses since the last log line, so the next one is whole
    teacher_ppl = ckpt["teacher_ppl"]
    if master:
        print(f"resumed from {ckpt_path} at step {ckpt['step']}")
    return SimpleNamespace(step=ckpt["step"], teacher_scores=None if teacher_ppl is None else {"ppl": teacher_ppl},
                           skipped=ckpt["skipped_steps"], window=window, n_logged=n_logged)


def save_run_checkpoint(args, config, student, optimizer, scaler, step, teacher_scores, skipped, window, n_logged,
                        n_batches, master, ddp):
    """Rank 0 writes the checkpoint of `step` (checkpoint.save_checkpoint: atomic, the last --keep
    kept); every rank returns its path (each names it if it stops on NaNs) and waits for the write."""
    if master:
        state = {"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "step": step, "config": config,
                 "teacher_ppl": (teacher_scores or {}).get("ppl"), "skipped_steps": skipped,
                 "log_window": (window.tolist(), n_logged),
                 "rng_cpu": torch.get_rng_state(), "data_position": divmod(step * args.grad_accum, n_batches)}
        save_checkpoint(state, args.out, args.keep)
    if ddp:
        dist.barrier()
    return checkpoint_path(args.out, step)
