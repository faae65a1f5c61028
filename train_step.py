"""One optimizer step, as every loop of this project takes it: train.py's, tools/bench.py's and
tools/make_teacher.py's all call these functions, so there is one copy of the step to read.

    lr = get_lr(step, total_steps, peak_lr, warmup)        # a pure function of the step
    denominators, tokens = global_denominators(micro, ...)  # rows each loss reads, over micro-steps and ranks
    losses = forward_backward(model, teacher, micro, ...)   # each micro-batch: forward, losses, backward
    result = optimizer_step(student, optimizer, ...)        # unscale, clip, step or skip on the device
    counters.add(result)                                    # skipped and bad steps, stop/save: read a step late

The loss of one micro-batch is the `step_fn` passed in: distil.distil_step (a masked-LM teacher) or
tasks.task_step (a task teacher); a benchmark or a test passes its own variant the same way.
"""

import math

import numpy as np
import torch
import torch.distributed as dist

from data import to_device
from losses import compiled_or_eager


def use_compile(choice, device):
    """--compile as a bool: "on", "off", or "auto", which compiles on a GPU, where the eager step's
    ~1,400 kernel launches per micro-step leave the GPU waiting for the host, and not on a CPU, where
    the compilation costs more than it saves in a short run (docs/speed.md). A bool (a resumed run's
    OUT/run.json keeps what its start decided) is that decision."""
    if isinstance(choice, bool):
        return choice
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def compile_step(step_fn, mode, device):
    """`step_fn` (distil_step, task_step, embedding_step) through torch.compile: both models' forwards,
    the losses and, through AOTAutograd, the student's backward as compiled graphs, with no graph
    break (tests/test_compile.py). One graph per batch shape: a compiled run's batches have few shapes
    (data.static_length, data.masked_size). Call it after one eager step (train.py's probe step):
    transformers and distil.forward_at_rows install their hooks at the first forward, which a graph
    cannot trace. If compiling fails, one warning line and the eager step (losses.compiled_or_eager).
    `mode`: torch.compile's ("default", "reduce-overhead" for CUDA graphs, "max-autotune")."""
    if device.type == "cpu":
        # Inductor's own random numbers for dropout's masks are slower on a CPU than aten's
        torch._inductor.config.fallback_random = True
    # a graph per shape: up to 8 lengths at --seq-len 512, packed and padded, for each model in the process
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return compiled_or_eager(step_fn, "the training step", devices=None, mode=mode)


def get_lr(step, total_steps, lr, warmup):
    """Linear warmup over the first `warmup` fraction of the steps, then linear decay to zero
    (BERT's and DistilBERT's schedule). A pure function of the step: it cannot miscount on resume
    or on several GPUs, as schedulers stepped by hand have."""
    warmup_steps = int(warmup * total_steps)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def make_optimizer(student, lr, betas, eps, weight_decay, device):
    """AdamW over the parameters that train; matrices decay, biases and LayerNorms do not. The fused
    kernel (one launch for all parameters) on GPUs, and on CPUs too, where it is also the faster."""
    trained = [p for p in student.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in trained if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=eps, fused=device.type in ("cuda", "cpu"))


def host_to_device(values, device):
    """Host numbers as a float64 tensor on `device`, without making the host wait for the device
    (a pinned buffer and an asynchronous copy on a GPU)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)


def dropout_seed(seed, step, rank):
    """The seed of step `step`'s dropout on rank `rank`: a resumed run replays it with no RNG state."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def bf16_all_reduce_hook(process_group, bucket):
    """A DDP communication hook (DDP.register_comm_hook(None, this)): each bucket of gradients is
    divided by the number of ranks and all-reduced in bf16, half the bytes of fp32, then written back
    in the gradients' dtype. Each entry is rounded to bf16 (8 bits of mantissa) on the wire. torch's
    bf16_compress_hook is the same algorithm but refuses anything but NCCL; this one also runs on gloo,
    where the tests run it."""
    group = process_group if process_group is not None else dist.group.WORLD
    compressed = bucket.buffer().to(torch.bfloat16).div_(dist.get_world_size(group))
    reduced = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def write_back(future):
        buffer = bucket.buffer()
        buffer.copy_(future.value()[0])
        return buffer
    return reduced.then(write_back)


def global_denominators(micro, count, device, world_size=1):
    """What one optimizer step's losses are divided by: the rows each loss reads (`count(batch)`, host
    ints: distil.count_rows or tasks.count_task_rows) summed over the micro-batches and, on several
    ranks, over the ranks (an all_reduce that stays on the devices: nothing is read back).

    DDP averages gradients over ranks, so each rank divides by the global count / world_size: then
    accumulation and DDP give exactly the gradient of one big batch, however unevenly the masked
    positions fall. Returns ({loss name: count}, the real positions counted: a float64 (1,) tensor).
    """
    counts = {}
    for batch in micro:
        for name, n in count(batch).items():
            counts[name] = counts.get(name, 0) + n
    names = list(counts)
    # on the device, even on one rank: a compiled step takes them as tensors (a number would be baked
    # into its graph, and every new count would compile it again)
    summed = host_to_device([counts[name] for name in names], device)
    if world_size > 1:
        dist.all_reduce(summed)
    denominators = {name: summed[j] / world_size for j, name in enumerate(names)}
    return denominators, summed[names.index("cos"):names.index("cos") + 1]


def forward_backward(model, teacher, micro, step_fn, cfg, denominators, names, device, autocast, scaler):
    """Each micro-batch of `micro` (numpy arrays from the DataLoader) moved to the device, its losses
    computed under `autocast` by step_fn(model, teacher, batch, cfg, denominators=...) and
    backpropagated (scaled by the fp16 gradient scaler; a no-op in bf16/fp32). Under DDP the
    gradients are synchronised on the last micro-step only, a flag set before its forward.

    Returns the step's losses summed over the micro-batches: a float64 device tensor, the weighted
    total, then each term of `names[1:]` (each already divided by its global denominator).
    """
    losses = torch.zeros(len(names), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro):
        if hasattr(model, "require_backward_grad_sync"):  # DDP: set before the forward, not after
            model.require_backward_grad_sync = i == len(micro) - 1
        batch = to_device(batch, device)
        with autocast():
            loss, terms = step_fn(model, teacher, batch, cfg, denominators=denominators)
        scaler.scale(loss).backward()
        losses += torch.stack([loss.detach()] + [terms[k] for k in names[1:]]).double()
    return losses


def optimizer_step(student, optimizer, scaler, losses, clip, stop_requested=False, world_size=1,
                   save_requested=False):
    """Unscale, clip, step or skip, update the scaler, zero the gradients; nothing is read back.

    Each rank holds world_size x its share of the global mean (its denominators are the global
    counts / world_size): summed over ranks and divided, every rank knows the step's loss. The stop
    flag (SIGTERM, Ctrl-C) and the save flag (--save-every-minutes, from each rank's own clock) travel
    in the same all_reduce, so every rank sees the same flags (StepCounters brings them to the host
    one step later).

    A step with a non-finite loss or gradient norm (the norm of the all-reduced gradients, alike on
    every rank) is skipped on the device: the fused AdamW of make_optimizer takes a `found_inf` (as
    the gradient scaler drives it) and leaves the weights, exp_avg, exp_avg_sq and its step count
    exactly as they were where it is 1. An optimizer without that (not fused) cannot skip on the
    device: for it the skip flag is read back here, the one read of the step (tools/make_teacher.py's
    and bench's CPU variants; train.py's optimizer is fused on CPUs and GPUs).

    Returns a dict of device tensors, all float64:
        losses (len(losses),): the step's losses averaged over ranks
        grad_norm (1,): the gradient norm before clipping
        skipped (1,): 1 where the step was skipped (a non-finite loss or gradient), else 0
        bad (1,): 1 where the loss is non-finite, or a gradient in bf16/fp32 (fp16 overflows with a
            finite loss are the gradient scaler's routine, which lowers its scale, and not bad)
        stop, save (1,): > 0 where some rank asked
    """
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), clip if clip > 0 else math.inf)
    stats = torch.cat([losses, host_to_device([float(stop_requested), float(save_requested)], device=losses.device)])
    if world_size > 1:
        dist.all_reduce(stats)
    losses = stats[:-2] / world_size
    grad_norm = grad_norm.double().reshape(1)
    loss_finite = torch.isfinite(losses[:1])
    skipped = (~(loss_finite & torch.isfinite(grad_norm))).double()  # never step on a non-finite value
    if getattr(optimizer, "_step_supports_amp_scaling", False):  # fused: skips where found_inf is 1
        optimizer.found_inf = skipped.float().reshape(())  # the kernel's contract: a float32 scalar, 0 or 1
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not skipped.item():  # not fused: no device-side skip, so one read-back (never train.py's)
        optimizer.step()
    scaler.update()  # fp16: after overflowing gradients, a lower scale (a no-op in bf16/fp32)
    optimizer.zero_grad(set_to_none=True)
    bad = (~loss_finite).double() if scaler.is_enabled() else skipped
    return {"losses": losses, "grad_norm": grad_norm, "skipped": skipped, "bad": bad, "stop": stats[-2:-1],
            "save": stats[-1:]}


class StepCounters:
    """The loop's counters, kept on the device and brought to the host without draining its queue.

    values (float64 (5,), on the device), after each step (add): skipped steps (the whole run's), the
    run of consecutive bad steps (0 after a good one), the stop and save flags of the step's
    all-reduce (> 0 where some rank asked) and its gradient norm. Each step's values are copied to a
    host buffer (pinned, asynchronously, on a GPU); `previous()` reads them during the next step,
    after that step's kernels are queued: the host then waits for the previous step's copy only, and
    the queue stays full. `read(window)` reads the values of the step just taken, with the log
    window, in the one read of a logging (or saving) step.
    """

    FIELDS = ("skipped", "bad_run", "stop", "save", "grad_norm")

    def __init__(self, device, skipped=0):
        start = [float(skipped), 0.0, 0.0, 0.0, math.nan]
        self.values = torch.tensor(start, dtype=torch.float64, device=device)
        self.host = torch.tensor(start, dtype=torch.float64)
        if device.type == "cuda":  # page-locked: the copy from the device runs without the host waiting
            self.host = self.host.pin_memory()
        self.host_view = self.host.numpy()  # made once: reading it later reads host memory only
        self.event = torch.cuda.Event() if device.type == "cuda" else None

    def add(self, result):
        """Count optimizer_step's result on the device, and start the copy of the counters to the host."""
        bad = result["bad"]
        self.values = torch.cat([self.values[0:1] + result["skipped"], (self.values[1:2] + bad) * bad,
                                 result["stop"], result["save"], result["grad_norm"]])
        self.host.copy_(self.values, non_blocking=True)
        if self.event is not None:
            self.event.record()

    def previous(self):
        """The counters after the previous step (before the first: the start values), as a dict of
        floats. Call it before this step's add(), which overwrites them."""
        if self.event is not None:
            self.event.synchronize()  # the previous step's copy: this step's kernels stay queued
        return dict(zip(self.FIELDS, self.host_view.tolist()))

    def read(self, window):
        """One read-back of `window` (a float64 device tensor) and of the counters after the last
        add(): (window's values as a list of floats, the counters as a dict of floats)."""
        values = torch.cat([window, self.values]).tolist()
        return values[:len(window)], dict(zip(self.FIELDS, values[len(window):]))


def check_bad_steps(bad_run, step, max_bad_steps, last_ckpt):
    """Raise FloatingPointError when the last `bad_run` steps up to `step` (host numbers) were all
    bad (a non-finite loss or gradient, skipped) and they reach --max-bad-steps."""
    if bad_run >= max_bad_steps:
        raise FloatingPointError(
            f"non-finite loss or gradients at steps {step - int(bad_run) + 1}-{step} (--max-bad-steps "
            f"{max_bad_steps}); last good checkpoint: {last_ckpt or 'none yet'} (--resume continues "
            "from it); if it happens again, check the data or start anew with a lower --lr or --dtype fp32")
