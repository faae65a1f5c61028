"""Send the metrics of a run to TensorBoard and/or Weights & Biases, under metrics.jsonl's names.

    python train.py ... --log tensorboard         # then: tensorboard --logdir OUT/tensorboard
    python train.py ... --log tensorboard,wandb   # wandb: project $WANDB_PROJECT or --wandb-project

metrics.jsonl stays the record of a run; these backends only mirror it, so each record goes to
them unchanged: the same step, the same names (loss, kd, mlm, cos, mse, lr, grad_norm,
tokens_per_s, scale, skipped_steps, valid_ppl, teacher_ppl). Neither package is needed unless
asked for; a missing one stops the run before it starts, with the pip command that installs it.
"""

import json
import math
import os

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # backend name -> the pip package it needs


class LogError(ValueError):
    """A --log request that cannot be served: the message names the fix."""


def check_log_spec(spec):
    """The backends named in `spec` ("tensorboard", "wandb", "tensorboard,wandb", "" or None),
    each checked to be importable now, so a missing package stops the run before any work."""
    names = [name.strip() for name in (spec or "").split(",") if name.strip()]
    for name in names:  # a misspelt name first: installing a package would not fix it
        if name not in BACKENDS:
            raise LogError(f"--log {spec}: unknown backend '{name}'; use tensorboard, wandb or tensorboard,wandb")
    for name in names:
        try:
            if name == "tensorboard":
                import torch.utils.tensorboard  # noqa: F401  (fails when the tensorboard package is absent)
            else:
                import wandb  # noqa: F401
        except ImportError:
            raise LogError(f"--log {name} needs the {BACKENDS[name]} package: pip install {BACKENDS[name]}") from None
    return names


def open_loggers(spec, out_dir, config=None, start_step=0, wandb_project=None):
    """Open the backends of `spec` for the run in `out_dir`; returns a list of (name, handle).

    start_step is where the run starts (a resumed run: its checkpoint's step). TensorBoard hides
    what the folder holds from that step on, as train.py truncates metrics.jsonl: what an
    interrupted run logged after its checkpoint, or all of an earlier run's logs in a reused
    folder. W&B continues a resumed run under its id, kept in OUT/wandb-run-id; a new run gets a
    new id.
    """
    loggers = []
    for name in check_log_spec(spec):
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start_step)
            loggers.append((name, writer))
        else:
            import wandb
            id_file = os.path.join(out_dir, "wandb-run-id")
            run_id = open(id_file).read().strip() if start_step and os.path.exists(id_file) else None
            run = wandb.init(project=wandb_project or os.environ.get("WANDB_PROJECT", "bert-distil"),
                             name=os.path.basename(os.path.abspath(out_dir)), id=run_id, resume="allow",
                             dir=out_dir, config=config)
            with open(id_file, "w") as f:
                f.write(run.id)
            loggers.append((name, run))
    return loggers


def log_metrics(out_dir, record, loggers=()):
    """Append `record` as a line of OUT/metrics.jsonl and mirror it to the open backends.

    Non-finite values (a skipped step's gradient norm) are written as null: strict JSON."""
    clean = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in record.items()}
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(clean) + "\n")
    write_metrics(loggers, record)


def write_metrics(loggers, record):
    """Send one metrics.jsonl record ({"step": s, name: number, ...}) to every open backend."""
    step = record["step"]
    scalars = {k: v for k, v in record.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    for name, handle in loggers:
        if name == "tensorboard":
            for key, value in scalars.items():
                handle.add_scalar(key, value, step)
        else:
            handle.log(scalars, step=step)


def close_loggers(loggers):
    """Flush and close every backend (TensorBoard writes its event file in the background)."""
    for name, handle in loggers:
        if name == "tensorboard":
            handle.close()
        else:
            handle.finish()
