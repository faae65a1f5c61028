"""Checkpoints that survive crashes: atomic writes, the last K kept, and resume checks.

A checkpoint is one file, `OUT/checkpoints/step-XXXXXXXX.pt`, holding everything a run needs to
continue as if it had never stopped: the student's weights, the optimizer and gradient-scaler
states, the step (from which the data position, the masks, the dropout seeds and the learning
rate all follow), the RNG states and the run's configuration. It is written to a temporary name,
flushed to disk and renamed: a crash while writing leaves the previous checkpoint untouched and
never a partial file under a checkpoint's name.
"""

import glob
import json
import os
import re
import signal
import zipfile
from contextlib import contextmanager

import torch

from cluster import try_lock

CKPT_PATTERN = re.compile(r"step-(\d{8})\.pt$")

# Flags that may change between a run and its resumption: they change when things happen, where
# they are written, or how the same global batch is split over ranks and micro-steps (the run
# records the global batch itself, which must match), not what is computed.
FREE_FLAGS = {"eval_every", "save_every", "log_every", "keep", "resume", "config", "log", "progress",
              "save_every_minutes", "collective_timeout", "cache_only",
              # the length of the run: a larger --max-steps extends it (the learning rate then follows the
              # schedule of the new length from the step resumed on: see docs/faults.md)
              "max_steps", "epochs", "total_steps",
              "max_bad_steps", "cache_dir", "push_to_hub", "wandb_project", "language", "batch_size",
              "grad_accum", "world_size", "out", "compile", "num_workers", "dtype_requested", "dtype_reason",
              "train_corpus", "seq_len_used", "ddp_bf16_grads",
              "teacher_cache", "augment", "augment_model", "augment_seed", "augment_top_k", "augment_prob"}
# train_corpus: compared by check_same_corpus once the corpus is loaded; seq_len_used: what --seq-len
# (compared) resolved to; ddp_bf16_grads: how the gradients travel between ranks (rounded to bf16 on the
# wire), like world_size not what a step computes. teacher_cache: the same losses, the teacher's logits
# read from disk (to the dtype's rounding). The --augment flags make rewrites that are part of the
# training data, whose tokens check_same_corpus compares (other rewrites are another corpus); listed here
# so that a checkpoint written before the flags existed still resumes.


class CheckpointError(ValueError):
    """A resume that cannot be done as asked: the message says why and what to do."""


def checkpoint_dir(out_dir):
    return os.path.join(out_dir, "checkpoints")


def checkpoint_path(out_dir, step):
    return os.path.join(checkpoint_dir(out_dir), f"step-{step:08d}.pt")


def list_checkpoints(out_dir):
    """Finished checkpoints, oldest first (temporary files never match the pattern)."""
    paths = glob.glob(os.path.join(checkpoint_dir(out_dir), "step-*.pt"))
    return sorted(p for p in paths if CKPT_PATTERN.search(p))


def save_checkpoint(state, out_dir, keep):
    """Write `state` atomically as the checkpoint of state["step"]; keep only the newest `keep` (0: all)."""
    folder = checkpoint_dir(out_dir)
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(folder, "*.tmp")):  # left by a writer that was killed
        os.remove(stale)
    path = checkpoint_path(out_dir, state["step"])
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        os.remove(old)
    return path


def load_latest(out_dir):
    """(path, state) of the newest checkpoint that loads; a damaged one is skipped with a warning."""
    paths = list_checkpoints(out_dir)
    if not paths:
        raise CheckpointError(f"--resume: no checkpoint in {checkpoint_dir(out_dir)}; "
                              "run without --resume to start a new run there")
    for path in reversed(paths):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a file damaged after it was written (disk fault, manual copy)
            print(f"warning: skipping unreadable checkpoint {path} ({type(e).__name__})")
    raise CheckpointError(f"--resume: no checkpoint in {checkpoint_dir(out_dir)} could be read")


def checkpoints_size(out_dir):
    """Bytes the run's checkpoints take on disk."""
    return sum(os.path.getsize(p) for p in list_checkpoints(out_dir))


def config_differences(saved, current):
    """The flags that change the run's mathematics and differ between `saved` and `current`."""
    keys = (set(saved) | set(current)) - FREE_FLAGS
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def check_resumable(saved_config, current_config, path):
    """Refuse, in one line, to resume a run with flags that change what it computes.

    The dtype is compared as resolved (a run records "bf16", never "auto"): a resume where --dtype
    auto resolves otherwise (another machine) is refused rather than followed, so precision never
    changes without the user saying so, and the fix is one flag. The training corpus is compared
    later, once it is loaded (check_same_corpus)."""
    saved_dtype, dtype = saved_config.get("dtype"), current_config.get("dtype")
    if saved_dtype == "auto":  # recorded before the resolved dtype was: the user names it
        if current_config.get("dtype_requested") == "auto":
            raise CheckpointError(f"--resume: {path} records --dtype auto, not what it resolved to; "
                                  "pass --dtype with the precision the run used (bf16, fp16 or fp32)")
    elif saved_dtype != dtype:
        raise CheckpointError(f"--resume: {path} was trained in {saved_dtype} and this run would compute in "
                              f"{dtype} ({current_config.get('dtype_reason')}); pass --dtype {saved_dtype} "
                              "to continue it, or start a new run in another --out")
    # A recorded corpus is identified by its tokens (check_same_corpus), so it may have moved: another
    # path on another node of the cluster, or after a copy. Older checkpoints compare the path.
    recorded = {"dtype", "train"} if "train_corpus" in saved_config else {"dtype"}
    diffs = [k for k in config_differences(saved_config, current_config) if k not in recorded]
    if diffs:
        detail = "; ".join(f"{k}: {saved_config.get(k)!r} -> {current_config.get(k)!r}" for k in diffs[:6])
        raise CheckpointError(f"--resume: {path} was made with other settings ({detail}); "
                              "resume with the original flags, or start a new run in another --out")


def check_same_corpus(saved_config, current_config, path):
    """Refuse to resume on a training corpus other than the run's: another number of sequences changes
    the epoch's length, order and schedule, other tokens change what is learnt. A checkpoint written
    before the corpus was recorded is not checked."""
    saved, current = saved_config.get("train_corpus"), current_config["train_corpus"]
    identity = ("tokens", "sequences", "sha256")  # not the cache's name, which holds the file's path and time
    if saved is None or all(saved[k] == current[k] for k in identity):
        return
    if (saved["tokens"], saved["sequences"]) != (current["tokens"], current["sequences"]):
        what = (f"{saved['tokens']} tokens in {saved['sequences']} sequences, now {current['tokens']} "
                f"in {current['sequences']}")
    else:
        what = "the same number of tokens, but other ones"
    raise CheckpointError(f"--resume: the training corpus {current_config.get('train')} changed since {path} was "
                          f"written ({what}); resume with the original file, or start a new run in another --out")


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict(state), keeping this run's implementation choices (fused, foreach,
    capturable) instead of the saved run's: a run started on a CPU (unfused) and resumed on a GPU
    takes the fused kernel. They are set in the saved groups before loading, because loading places
    each parameter's step counter according to them (on the GPU, as float32, for fused)."""
    mine = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in optimizer.param_groups]
    groups = [{**saved, **choice} for saved, choice in zip(state["param_groups"], mine)]
    optimizer.load_state_dict({**state, "param_groups": groups})


def resuming(out_dir, resume):
    """Whether this run continues the one in `out_dir`: --resume (True), or --resume auto when the
    folder holds a checkpoint (and starts a new run when it holds none: what torchrun --max-restarts
    needs, re-running one command line after any failure)."""
    return resume is True or (resume == "auto" and bool(list_checkpoints(out_dir)))


def finished_run(out_dir, args):
    """The step a finished run in `out_dir` ended at, or None if there is none, or if `args` (train.py's
    flags) ask it for more: --max-steps above that step, or --epochs other than the run's. A run is
    finished when its student is saved (config.json, which save_student moves in last) and run.json's
    total_steps is its newest checkpoint's step (a damaged one is not: --resume goes back to the one
    before and replays the steps); with its checkpoints deleted to free the space, its step is the
    last one logged, and a longer run has nothing to start from (CheckpointError).
    Flags given that change what the run computes are refused (CheckpointError) as check_resumable
    would. Reads run.json and file names only: cheap enough to ask before anything is loaded."""
    if not os.path.isfile(os.path.join(out_dir, "config.json")):
        return None
    paths = list_checkpoints(out_dir)
    if not paths:
        step = last_logged_step(out_dir)
        if args.max_steps is not None and args.max_steps > step:
            raise CheckpointError(f"--resume: {out_dir} holds a finished run (step {step}) whose checkpoints are "
                                  "deleted; a longer run is a new run, in another --out")
        return step
    config = read_run_json(out_dir)
    step = int(CKPT_PATTERN.search(paths[-1]).group(1))
    if config.get("total_steps") != step or not zipfile.is_zipfile(paths[-1]):
        return None  # unfinished, or its last checkpoint damaged (cut short: no zip directory at its end)
    if args.max_steps is not None and args.max_steps > step:
        return None
    if args.max_steps is None and config.get("max_steps") is None and args.epochs != config.get("epochs"):
        return None
    # Flags left unset (None: filled in later from the recipe) and the dtype "auto" are not compared;
    # the corpus is compared by its tokens, not its path (check_same_corpus), so not here.
    given = {k: v for k, v in vars(args).items() if v is not None and k != "train" and k in config}
    given["dtype"] = config.get("dtype") if args.dtype == "auto" else args.dtype
    diffs = [k for k in config_differences({k: config[k] for k in given}, given)]
    if diffs:
        detail = "; ".join(f"{k}: {config.get(k)!r} -> {given.get(k)!r}" for k in diffs[:6])
        raise CheckpointError(f"--resume: {paths[-1]} was made with other settings ({detail}); "
                              "resume with the original flags, or start a new run in another --out")
    return step


def read_run_json(out_dir):
    """OUT/run.json, the settings train.py recorded for the run in `out_dir` (its flags, the dtype it
    computed in, seq_len_used, total_steps, ...), as a dict; empty when there is none or it cannot be
    read (a run that never started, a file cut short)."""
    try:
        with open(os.path.join(out_dir, "run.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def last_logged_step(out_dir):
    """The highest step in OUT/metrics.jsonl (0 if there is none): a finished run's last step once
    its checkpoints are deleted."""
    steps = [0]
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    steps.append(int(json.loads(line)["step"]))
                except (ValueError, KeyError, TypeError):
                    continue
    except OSError:
        pass
    return max(steps)


def check_out_dir(out_dir, resume):
    """Refuse to start a new run on top of one that has something to lose: a checkpoint or a model.

    A folder with only the log of a run that died before its first checkpoint is started over,
    else its owner could neither --resume it (no checkpoint) nor start again. --resume auto
    continues whatever the folder holds.
    """
    if resume:
        return
    leftovers = [os.path.basename(p) for p in list_checkpoints(out_dir)[-1:]] + \
        [name for name in ("config.json", "model.safetensors") if os.path.exists(os.path.join(out_dir, name))]
    if leftovers:
        raise CheckpointError(f"--out {out_dir} already holds a run ({', '.join(leftovers)}); "
                              "pass --resume to continue it, or choose another --out")


def lock_out_dir(out_dir):
    """Hold OUT/.lock for as long as the returned file stays open: a second run (or a second --resume)
    in the same folder stops at once instead of interleaving its checkpoints and log with this one's."""
    path = os.path.join(out_dir, ".lock")
    lock = try_lock(path)  # flock, or a soft lock on a filesystem without it
    if lock is None:
        raise CheckpointError(f"--out {out_dir} is in use by another run (it holds the lock on {path}); "
                              "wait for it to finish or choose another --out")
    return lock


def truncate_metrics(out_dir, step):
    """Keep the metric lines up to `step` (none for step < 0): what a crashed run logged after the
    checkpoint we resume from is replayed, and a line cut short by a kill is dropped."""
    path = os.path.join(out_dir, "metrics.jsonl")
    kept = []
    if step >= 0 and os.path.exists(path):
        for line in open(path):
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
    with open(path, "w") as f:
        f.writelines(kept)


@contextmanager
def stop_signals():
    """Inside the block, SIGTERM (what schedulers send before pre-emption) and Ctrl-C only set a
    flag; it yields a function that says whether one came, so the loop can finish its step, save
    and exit cleanly. A second Ctrl-C stops at once. The previous handlers come back on exit."""
    requested = []

    def handler(signum, frame):
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield lambda: bool(requested)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
