"""Distil a BERT-family teacher into a student made of some of its layers (DistilBERT's recipe): a
masked LM on a corpus, or a teacher fine-tuned on a task on the task's labelled data.

One process:      python train.py --teacher bert-base-uncased --train corpus.txt --out runs/distil
A task teacher:   python train.py --teacher my-finetuned-bert --train train.csv --valid valid.csv --out runs/task
One node, 8 GPUs: torchrun --nproc_per_node=8 train.py --config configs/distilbert-base-uncased.json ...

The loop, top to bottom: flags -> distributed setup -> teacher (its class says masked LM or task),
tokenizer, data (all checked before anything is written, run_inputs.py) -> student, DDP,
optimizer -> resume -> for each step: fetch the micro-batches, agree on the denominators (and on
stopping) across ranks, forward/backward each micro-batch (distil_step, or task_step), clip, step,
log, evaluate, checkpoint -> save the student in Hugging Face format.
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (CheckpointError, check_out_dir, check_resumable, check_same_corpus, checkpoint_path,
                        load_latest, load_optimizer_state, lock_out_dir, save_checkpoint, stop_signals,
                        truncate_metrics)
from data import MicroBatches, micro_batch_loader, to_device
from token_cache import DataError
from distil import count_rows, count_task_rows, distil_step, freeze_unreached, task_step, unwrap
from flags import parse_args, recipe_defaults
from heldout import masked_lm_sums, perplexity, valid_batches
from logs import LogError, check_log_spec, close_loggers, log_metrics, open_loggers
from modelcard import HubError, push_to_hub, write_model_card, write_task_model_card
from precision import DTYPES, autocast_for, pick_dtype
from run_inputs import load_inputs
from student import StudentError, compile_layers, load_teacher, save_student, task_kind
from tasks import TaskBatches, gold, predict, task_metrics, valid_task_batches


def get_lr(step, total_steps, args):
    """Linear warmup for the first `warmup` fraction of the steps, then linear decay to zero."""
    warmup_steps = int(args.warmup * total_steps)
    if step < warmup_steps:
        return args.lr * (step + 1) / warmup_steps
    return args.lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def run_config(args, world_size, dtype, dtype_reason):
    """The run's settings as recorded in checkpoints and run.json: the flags, with the dtype resolved
    (never "auto": a resume compares what was computed) and the global batch standing for its split."""
    config = {k: v for k, v in vars(args).items()}
    config.update(dtype=dtype, dtype_requested=args.dtype, dtype_reason=dtype_reason,
                  global_batch=args.batch_size * args.grad_accum * world_size)
    return config


def setup_device(args):
    """torchrun's RANK, LOCAL_RANK and WORLD_SIZE, and this process's device."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, local_rank, world_size, device


def make_optimizer(student, args, device):
    """AdamW over the parameters that train; matrices decay, biases and LayerNorms do not. The fused
    kernel (one launch for all parameters) on GPUs, and on CPUs too, where it is also the faster."""
    trained = [p for p in student.parameters() if p.requires_grad]
    betas = tuple(float(b) for b in args.adam_betas.split(","))
    return torch.optim.AdamW([{"params": [p for p in trained if p.dim() >= 2], "weight_decay": args.weight_decay},
                              {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}],
                             lr=args.lr, betas=betas, eps=args.adam_eps, fused=device.type in ("cuda", "cpu"))


def host_to_device(values, device):
    """Host numbers as a float64 tensor on `device`, without making the host wait for the device
    (a pinned buffer and an asynchronous copy on a GPU)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def main(argv=None):
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()  # our own checks report what matters, in one line
    transformers.utils.logging.disable_progress_bar()
    rank, local_rank, world_size, device = setup_device(args)
    ddp, master, use_cuda = world_size > 1, rank == 0, device.type == "cuda"
    dtype_name, dtype_reason = pick_dtype(args.dtype, device)
    dtype = DTYPES[dtype_name]
    autocast = autocast_for(device, dtype)

    # ---- inputs, all checked before anything is written or the process group starts ----
    check_out_dir(args.out, args.resume)
    check_log_spec(args.log)  # a missing tensorboard/wandb stops the run now, not after loading
    # The teacher's class says what the run does: a masked LM (kind None) or a task (tasks.py).
    teacher = load_teacher(args.teacher) if args.teacher else None
    kind = task_kind(teacher.config) if teacher is not None else args.task
    if teacher is not None and args.task:
        raise StudentError(f"--task: the task of a fine-tuned teacher comes from it, and {args.teacher} is "
                           f"{'a masked LM' if kind is None else kind}; drop --task (or --teacher, to fine-tune)")
    recipe_defaults(args, kind, has_teacher=teacher is not None)
    config = run_config(args, world_size, dtype_name, dtype_reason)
    ckpt_path = ckpt = None
    if args.resume:
        ckpt_path, ckpt = load_latest(args.out)
        check_resumable(ckpt["config"], config, ckpt_path)
    tokenizer, layers, cfg, student, train_data, valid_data, spec, steps_per_epoch = \
        load_inputs(args, config, master, teacher, kind)
    if ckpt is not None:  # the same file, or one with the same tokens (at another path, on another node)
        check_same_corpus(ckpt["config"], config, ckpt_path)
    if master:  # the run's first line, once every input has passed its checks (an error stays one line)
        print(f"dtype: {dtype_name} ({dtype_reason})", flush=True)
    n_batches = steps_per_epoch * args.grad_accum  # micro-batches per rank and epoch
    total_steps = args.max_steps or max(1, int(args.epochs * steps_per_epoch))
    student.to(device)
    if teacher is not None:
        teacher.to(device)
        if dtype != torch.float32:  # the teacher only runs forward: keep its weights in the compute dtype
            teacher.to(dtype)
    # Parameters no active loss reaches (the MLM head when only hidden states are compared, layers past
    # the last --layer-map pair) would get no gradient, which DDP takes for an error: they do not train.
    frozen = freeze_unreached(student, teacher, cfg, kind)
    if frozen and master:
        print(f"not trained (no active loss reaches them): {', '.join(frozen[:4])}{', ...' if len(frozen) > 4 else ''}")

    model = student
    if args.compile:  # after the probe's forward (see compile_layers)
        compile_layers(student)
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        # Only the student is wrapped: the teacher has no gradients to synchronise.
        model = DDP(student, device_ids=[local_rank] if use_cuda else None)
    optimizer = make_optimizer(student, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    # ---- resume ----
    names = ["loss"] + [k for k in ("kd", "mlm", "label", "cos", "mse", "hidden", "attn", "relation")
                        if getattr(cfg, f"alpha_{k}") > 0]
    step, teacher_ppl, skipped, window, n_logged = 0, None, 0, [0.0] * (len(names) + 1), 0
    if ckpt is not None:
        student.load_state_dict(ckpt["student"])
        load_optimizer_state(optimizer, ckpt["optimizer"])  # with this run's fused/foreach, not the saved run's
        scaler.load_state_dict(ckpt["scaler"])
        step, teacher_ppl, skipped = ckpt["step"], ckpt["teacher_ppl"], ckpt["skipped_steps"]
        window, n_logged = ckpt["log_window"]  # losses since the last log line, so the next one is whole
        torch.set_rng_state(ckpt["rng_cpu"])
        if master:
            print(f"resumed from {ckpt_path} at step {step}")
        del ckpt
    # the log window (each loss term summed since the last log line, then the tokens) stays on the device
    window = host_to_device(window, device)
    last_ckpt = ckpt_path

    def save(step):
        nonlocal last_ckpt
        if master:
            state = {"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "step": step, "config": config,
                     "teacher_ppl": teacher_ppl, "skipped_steps": skipped, "log_window": (window.tolist(), n_logged),
                     "rng_cpu": torch.get_rng_state(), "data_position": divmod(step * args.grad_accum, n_batches)}
            save_checkpoint(state, args.out, args.keep)
        last_ckpt = checkpoint_path(args.out, step)  # on every rank: each names it if it stops on NaNs
        if ddp:
            dist.barrier()

    def evaluate(model_to_eval):
        """Masked LM: the held-out perplexity. Task: the scores (tasks.task_metrics) of every rank's
        share of the held-out set, gathered, with the agreement with the teacher's predictions."""
        if kind is not None:
            shard = predict(model_to_eval, valid_task_batches(valid_data, tokenizer.pad_token_id, args.batch_size,
                                                              rank, world_size), device, autocast)
            shards = [shard]
            if ddp:
                shards = [None] * world_size
                dist.all_gather_object(shards, shard)
            predictions = {i: p for shard in shards for i, p in shard.items()}
            return task_metrics(kind, predictions, gold(valid_data), student.config.id2label, teacher_predictions), \
                predictions
        sums = masked_lm_sums(model_to_eval, valid_batches(valid_data, tokenizer, args.batch_size, rank, world_size),
                              device, autocast)
        if ddp:
            dist.all_reduce(sums)
        return perplexity(*sums[:2].tolist())

    if master:
        os.makedirs(args.out, exist_ok=True)
        out_lock = lock_out_dir(args.out)  # held until main returns or the process ends, however it ends
        with open(os.path.join(args.out, "run.json"), "w") as f:
            json.dump(config, f, indent=1)
        # Drop what a crashed run logged after the checkpoint we resume from (a new run starts empty).
        truncate_metrics(args.out, step if args.resume else -1)
    loggers = open_loggers(args.log, args.out, config, step, args.wandb_project) if master else []
    teacher_predictions = teacher_scores = valid_scores = None
    if valid_data is not None and kind is not None and teacher is not None:  # once per run (resumed runs too)
        teacher_scores, teacher_predictions = evaluate(teacher)
        log(args, master, {"step": step, **{f"teacher_{k}": v for k, v in teacher_scores.items() if k != "examples"}},
            loggers)
    elif valid_data is not None and kind is None and teacher_ppl is None:
        teacher_ppl = evaluate(teacher)
        log(args, master, {"step": step, "teacher_ppl": teacher_ppl}, loggers)

    # ---- the loop ----
    # Micro-batches are a pure function of their number (seed, epoch, index), built ahead of the loop
    # by DataLoader workers: a resumed run starts at its step's micro-batch and sees the same data.
    num_workers = args.num_workers if args.num_workers is not None else default_workers(device, world_size)
    if num_workers:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers do not tokenize; silence the fork warning
    if kind is None:
        dataset = MicroBatches(train_data, tokenizer, spec, args.batch_size, args.seed, n_batches, rank, world_size,
                               group_by_length=not args.pack)
    else:
        dataset = TaskBatches(train_data, tokenizer.pad_token_id, args.batch_size, args.seed, n_batches, rank,
                              world_size)
    # what one micro-batch's losses are divided by: rows of KD, of the masked-LM or label loss, real positions
    count, count_keys = (count_rows, ("kd", "mlm", "cos")) if kind is None else (count_task_rows, ("kd", "label", "cos"))
    stream = iter(micro_batch_loader(dataset, step * args.grad_accum, total_steps * args.grad_accum, num_workers,
                                     pin_memory=use_cuda))
    bar = tqdm(total=total_steps, initial=step, disable=not (master and args.progress), dynamic_ncols=True)
    train_seconds, data_seconds, bad_steps, valid_ppl = 0.0, 0.0, 0, None
    with stop_signals() as stop_requested:  # SIGTERM / Ctrl-C: finish the step, save, exit cleanly
        while step < total_steps:
            t_step = time.perf_counter()
            micro = [next(stream) for _ in range(args.grad_accum)]
            data_seconds += time.perf_counter() - t_step
            # Denominators: rows counted over all micro-batches and ranks, so that accumulation and DDP
            # give the gradient of one big batch. The host counted them; the ranks' counts are summed on
            # the devices and stay there (the losses divide by device tensors: nothing is read back).
            counts = [sum(count(b, cfg)[k] for b in micro) for k in count_keys]
            if ddp:
                counts = host_to_device(counts, device)
                dist.all_reduce(counts)
            # DDP averages gradients over ranks, so each rank divides by the global count / world size.
            denominators = {k: counts[j] / world_size for j, k in enumerate(count_keys)}
            lr = get_lr(step, total_steps, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Dropout is seeded from (seed, step, rank): a resumed run replays it with no RNG state.
            torch.manual_seed(int(np.random.SeedSequence([args.seed, step, rank]).generate_state(1)[0]))
            losses = torch.zeros(len(names), dtype=torch.float64, device=device)  # total, then each term
            for i, batch in enumerate(micro):
                if ddp:  # synchronise gradients on the last micro-step only; set before the forward
                    model.require_backward_grad_sync = i == len(micro) - 1
                batch = to_device(batch, device)
                with autocast():
                    if kind is None:
                        loss, terms = distil_step(model, teacher, batch, cfg, denominators)
                    else:
                        loss, terms = task_step(model, teacher, batch, cfg, kind, denominators)
                scaler.scale(loss).backward()
                losses += torch.stack([loss.detach()] + [terms[k] for k in names[1:]]).double()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.clip if args.clip > 0 else math.inf)
            # Each rank holds world_size x its share of the global mean (its denominators are the global
            # counts / world_size): summed and divided, every rank knows the step's loss. The stop flag
            # travels in the same all_reduce, so every rank stops at the same step.
            stats = torch.cat([losses, host_to_device([float(stop_requested())], device)])
            if ddp:
                dist.all_reduce(stats)
            losses = stats[:-1] / world_size
            # The one read-back of the step: the loss, the gradient norm (from the all-reduced
            # gradients, so alike on every rank) and the stop flag decide whether to step and stop.
            loss_value, norm_value, stop = torch.cat([losses[:1], grad_norm.double().reshape(1), stats[-1:]]).tolist()
            finite = math.isfinite(loss_value) and math.isfinite(norm_value)
            if finite:  # never step on a non-finite loss or gradient, in any dtype
                optimizer.step()
            else:
                skipped += 1
            scaler.update()  # fp16: after overflowing gradients, a lower scale (a no-op in bf16/fp32)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # fp16 gradients that overflow while the loss is finite are routine (the scaler lowers its
            # scale); a non-finite loss, or a non-finite gradient in bf16/fp32, is not.
            bad = not math.isfinite(loss_value) or (not finite and not scaler.is_enabled())
            bad_steps = bad_steps + 1 if bad else 0
            if bad_steps >= args.max_bad_steps:
                raise FloatingPointError(
                    f"non-finite loss or gradients at steps {step - bad_steps + 1}-{step} (--max-bad-steps "
                    f"{args.max_bad_steps}); last good checkpoint: {last_ckpt or 'none yet'} (--resume continues "
                    "from it); if it happens again, check the data or start anew with a lower --lr or --dtype fp32")
            window += torch.cat([losses, counts[2:3] if ddp else host_to_device([counts[2]], device)])
            n_logged += 1
            train_seconds += time.perf_counter() - t_step  # throughput counts training, not evaluations and saves
            bar.update(1)

            if step % args.log_every == 0 or step == total_steps:
                sums = window.tolist()  # read back at logging steps only
                record = {"step": step, **{k: w / n_logged for k, w in zip(names, sums)}, "lr": lr,
                          "grad_norm": norm_value, "tokens_per_s": sums[-1] / train_seconds,
                          "data_wait": data_seconds / train_seconds, "skipped_steps": skipped}
                if scaler.is_enabled():
                    record["scale"] = scaler.get_scale()
                log(args, master, record, loggers)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                window.zero_()
                n_logged, train_seconds, data_seconds = 0, 0.0, 0.0
            if valid_data is not None and (step % args.eval_every == 0 or step == total_steps):
                if kind is None:
                    valid_ppl = evaluate(unwrap(model))
                    log(args, master, {"step": step, "valid_ppl": valid_ppl, "teacher_ppl": teacher_ppl}, loggers)
                else:
                    valid_scores, _ = evaluate(unwrap(model))
                    log(args, master, {"step": step, **{f"valid_{k}": v for k, v in valid_scores.items() if k != "examples"},
                                       **{f"teacher_{k}": v for k, v in (teacher_scores or {}).items()
                                          if k not in ("examples", "agreement")}}, loggers)
            # Not during a run of bad steps: the last good checkpoint stays the newest.
            saved = (step % args.save_every == 0 or step == total_steps) and bad_steps == 0
            if saved:
                save(step)
            if stop:
                if not saved:
                    save(step)
                if master:
                    print(f"stopped at step {step} as asked; checkpoint {last_ckpt}; continue with --resume")
                break
    bar.close()
    close_loggers(loggers)

    if step == total_steps and master:
        save_student(student, tokenizer, args.out)
        if kind is None:
            corpora = {"train": (args.train, len(train_data.tokens)),
                       "valid": (args.valid, len(valid_data.tokens) if valid_data is not None else 0)}
            write_model_card(args.out, config, teacher, student, tokenizer.mask_token, layers, step, corpora,
                             valid_ppl, teacher_ppl)
        else:
            write_task_model_card(args.out, config, teacher, student, kind, step, valid_scores, teacher_scores)
        print(f"saved the student ({sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters) to {args.out}")
    if ddp:
        dist.barrier()
        # Let gloo's worker threads take the GIL to free the tensors of finished collectives: the last
        # reference to the process group joins those threads while holding the GIL, and a thread still
        # waiting for it then hangs the exit (seen about once in 30 runs with torch 2.13 on CPU).
        time.sleep(0.2)
        dist.destroy_process_group()
    if step == total_steps and master and args.push_to_hub:  # after the process group: an upload can be slow
        print(f"uploaded to {push_to_hub(args.out, args.push_to_hub)}")
    return step


def default_workers(device, world_size):
    """DataLoader workers per process when --num-workers is not given. On a GPU, up to 4 per GPU
    (a batch takes a few ms to build; the GPU step about as long). On a CPU none: a batch costs about
    0.5% of a CPU step, and a worker would compete with the step's own threads for the cores."""
    if device.type != "cuda":
        return 0
    return max(1, min(4, (os.cpu_count() or 1) // max(1, min(world_size, torch.cuda.device_count())) - 1))


def log(args, master, record, loggers=()):
    """metrics.jsonl and --log's backends get every record (rank 0 only); the console, evaluations."""
    if master:
        log_metrics(args.out, record, loggers)
        if "loss" not in record and any(k.startswith(("valid_", "teacher_")) for k in record):
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


if __name__ == "__main__":
    try:
        main()
    except (StudentError, DataError, CheckpointError, FloatingPointError, LogError, HubError) as e:
        rank = os.environ.get("RANK")
        sys.exit(f"error{f' (rank {rank})' if rank and os.environ.get('WORLD_SIZE', '1') != '1' else ''}: {e}")
    except KeyboardInterrupt:  # a second Ctrl-C: the checkpoints already written are intact
        sys.exit("error: interrupted before the checkpoint could be saved; --resume continues from the last one")
