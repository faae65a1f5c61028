"""One optimizer step, as every loop of this project takes it: train.py's, tools/bench.py's and
tools/make_teacher.py's all call these functions, so there is one copy of the step to read.

    lr = get_lr(step, total_steps, peak_lr, warmup)        # a pure function of the step
    denominators, tokens = global_denominators(micro, ...)  # rows each loss reads, over micro-steps and ranks
    losses = forward_backward(model, teacher, micro, ...)   # each micro-batch: forward, losses, backward
    result = optimizer_step(student, optimizer, ...)        # unscale, clip, the one read-back, step or skip

The loss of one micro-batch is the `step_fn` passed in: distil.distil_step (a masked-LM teacher) or
tasks.task_step (a task teacher); a benchmark or a test passes its own variant the same way.
"""

import math

import numpy as np
import torch
import torch.distributed as dist

from data import to_device


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
    summed = [counts[name] for name in names]
    if world_size > 1:
        summed = host_to_device(summed, device)
        dist.all_reduce(summed)
    denominators = {name: summed[j] / world_size for j, name in enumerate(names)}
    tokens = summed[names.index("cos"):names.index("cos") + 1] if world_size > 1 else \
        host_to_device([counts["cos"]], device)
    return denominators, tokens


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
    """Unscale, clip, step (or skip), update the scaler, zero the gradients.

    Each rank holds world_size x its share of the global mean (its denominators are the global
    counts / world_size): summed over ranks and divided, every rank knows the step's loss. The stop
    flag (SIGTERM, Ctrl-C) travels in the same all_reduce, so every rank stops at the same step; so
    does the save flag (--save-every-minutes, read from each rank's own clock).
    The one read-back of the step: the loss, the gradient norm (from the all-reduced gradients, so
    alike on every rank) and the stop flag decide whether to step and whether to stop.

    Returns a dict: losses (averaged over ranks, on the device), loss and grad_norm (floats),
    stop and save (bools: asked by some rank), stepped (False: a non-finite loss or gradient,
    skipped), bad (a non-finite loss, or a non-finite gradient in bf16/fp32: fp16 overflows with a
    finite loss are the scaler's routine and not bad).
    """
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), clip if clip > 0 else math.inf)
    stats = torch.cat([losses, host_to_device([float(stop_requested), float(save_requested)], device=losses.device)])
    if world_size > 1:
        dist.all_reduce(stats)
    losses = stats[:-2] / world_size
    loss_value, norm_value, stop, save = torch.cat([losses[:1], grad_norm.double().reshape(1), stats[-2:]]).tolist()
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    if finite:  # never step on a non-finite loss or gradient, in any dtype
        optimizer.step()
    scaler.update()  # fp16: after overflowing gradients, a lower scale (a no-op in bf16/fp32)
    optimizer.zero_grad(set_to_none=True)
    bad = not math.isfinite(loss_value) or (not finite and not scaler.is_enabled())
    return {"losses": losses, "loss": loss_value, "grad_norm": norm_value, "stop": bool(stop), "save": bool(save),
            "stepped": finite, "bad": bad}
