"""Distil a BERT-family masked LM into a student made of some of its layers (DistilBERT's recipe).

One process:      python train.py --teacher bert-base-uncased --train corpus.txt --out runs/distil
One node, 8 GPUs: torchrun --nproc_per_node=8 train.py --config configs/distilbert-base-uncased.json ...

The loop, top to bottom: flags -> distributed setup -> teacher, tokenizer, corpus (all checked
before anything is written) -> student, DDP, optimizer -> resume -> for each step: fetch the
micro-batches, agree on the denominators (and on stopping) across ranks, forward/backward each
micro-batch, clip, step, log, evaluate, checkpoint -> save the student in Hugging Face format.
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

from checkpoint import (CheckpointError, check_out_dir, check_resumable, checkpoint_path, load_latest, lock_out_dir,
                        save_checkpoint, stop_signals, truncate_metrics)
from data import DataError, epoch_batches, load_corpus, make_batch, make_sequences, mask_spec
from distil import DistilConfig, check_capture, count_rows, distil_step, parse_layer_map, unwrap
from heldout import masked_lm_sums, perplexity, to_device, valid_batches
from flags import parse_args
from logs import LogError, check_log_spec, close_loggers, log_metrics, open_loggers
from modelcard import HubError, push_to_hub, write_model_card
from student import (StudentError, build_student, check_layers, load_teacher, load_tokenizer, save_student,
                     usable_positions)


def get_lr(step, total_steps, args):
    """Linear warmup for the first `warmup` fraction of the steps, then linear decay to zero."""
    warmup_steps = int(args.warmup * total_steps)
    if step < warmup_steps:
        return args.lr * (step + 1) / warmup_steps
    return args.lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def pick_dtype(name, device):
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:  # AMX / AVX512-BF16 CPUs multiply bf16 several times faster than fp32; others gain nothing
            flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
            name = "bf16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def run_config(args, world_size):
    """The run's settings as recorded in checkpoints; the global batch stands for its split."""
    config = {k: v for k, v in vars(args).items()}
    config["global_batch"] = args.batch_size * args.grad_accum * world_size
    return config


def main(argv=None):
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()  # our own checks report what matters, in one line
    transformers.utils.logging.disable_progress_bar()

    # ---- distributed setup (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE) ----
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    ddp, master = world_size > 1, rank == 0
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = pick_dtype(args.dtype, device)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    # ---- inputs, all checked before anything is written or the process group starts ----
    check_out_dir(args.out, args.resume)
    check_log_spec(args.log)  # a missing tensorboard/wandb stops the run now, not after loading
    config = run_config(args, world_size)
    ckpt_path = ckpt = None
    if args.resume:
        ckpt_path, ckpt = load_latest(args.out)
        check_resumable(ckpt["config"], config, ckpt_path)
    teacher = load_teacher(args.teacher)
    tokenizer = load_tokenizer(teacher, args.teacher, args.tokenizer)
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()] if args.layers is not None else None
    except ValueError:
        raise StudentError(f"--layers {args.layers}: give teacher layer numbers separated by commas, e.g. 0,2,4")
    n_teacher_layers = teacher.config.num_hidden_layers
    layers = check_layers(layers, n_teacher_layers)  # now, not after tokenizing the corpus
    max_len = usable_positions(teacher)
    if args.seq_len > max_len:
        raise DataError(f"--seq-len {args.seq_len} is longer than the teacher's {max_len} positions; "
                        f"use --seq-len {max_len} or less")
    try:
        layer_map = parse_layer_map(args.layer_map, layers, n_teacher_layers)
        cfg = DistilConfig(args.temperature, args.alpha_kd, args.alpha_mlm, args.alpha_cos, args.alpha_mse,
                           args.kd_on, args.alpha_hidden, args.hidden_loss, args.alpha_attn, args.attn_loss,
                           args.alpha_relation, args.relation_heads, layer_map)
        if cfg.needs_attention():
            check_capture(teacher)
    except ValueError as e:
        raise StudentError(str(e))
    if not cfg.needs_teacher() and cfg.alpha_mlm <= 0:
        raise DataError("every --alpha-* is 0: turn on at least one loss")
    student = build_student(teacher, layers, args.student_init, args.student_arch, args.student_hidden,
                            args.student_heads, compares_hidden_states=cfg.needs_hidden_states())
    # Each rank takes the cache lock in turn: the first tokenizes, the others then just load it.
    corpus = load_corpus(args.train, tokenizer, args.cache_dir, args.text_column, args.min_tokens,
                         progress=master and args.progress)
    seqs = make_sequences(corpus, args.seq_len, args.pack)
    valid_seqs = None
    if args.valid:
        valid_seqs = make_sequences(load_corpus(args.valid, tokenizer, args.cache_dir, args.text_column,
                                                args.min_tokens, progress=master and args.progress),
                                    args.seq_len, args.pack)
    spec = mask_spec(tokenizer, corpus, args.mlm_smoothing, args.mlm_prob)
    # An epoch is a whole number of global batches, whatever their split over ranks and micro-steps,
    # so that a run resumed on another number of GPUs (same global batch) sees the same data.
    steps_per_epoch = len(seqs.starts) // config["global_batch"]
    if steps_per_epoch < 1:
        raise DataError(f"{args.train} gives {len(seqs.starts)} sequences of --seq-len {args.seq_len}: too few "
                        f"for one step of {config['global_batch']}; lower --batch-size "
                        "or --grad-accum, or pass a longer corpus")
    n_batches = steps_per_epoch * args.grad_accum  # micro-batches per rank and epoch
    total_steps = args.max_steps or max(1, int(args.epochs * steps_per_epoch))
    student.to(device)
    teacher.to(device)
    if dtype != torch.float32:  # the teacher only runs forward: keep its weights in the compute dtype
        teacher.to(dtype)

    model = torch.compile(student) if args.compile else student
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        # Only the student is wrapped: the teacher has no gradients to synchronise.
        model = DDP(model, device_ids=[local_rank] if use_cuda else None)

    decay = [p for p in student.parameters() if p.dim() >= 2]  # matrices decay; biases and LayerNorms do not
    no_decay = [p for p in student.parameters() if p.dim() < 2]
    betas = tuple(float(b) for b in args.adam_betas.split(","))
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=betas, eps=args.adam_eps, fused=use_cuda)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    # ---- resume ----
    names = ["loss"] + [k for k in ("kd", "mlm", "cos", "mse", "hidden", "attn", "relation")
                        if getattr(cfg, f"alpha_{k}") > 0]
    step, teacher_ppl, skipped, window, n_logged = 0, None, 0, [0.0] * len(names), 0
    if ckpt is not None:
        student.load_state_dict(ckpt["student"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, teacher_ppl, skipped = ckpt["step"], ckpt["teacher_ppl"], ckpt["skipped_steps"]
        window, n_logged = ckpt["log_window"]  # losses since the last log line, so the next one is whole
        torch.set_rng_state(ckpt["rng_cpu"])
        if master:
            print(f"resumed from {ckpt_path} at step {step}")
        del ckpt
    last_ckpt = ckpt_path

    def save(step):
        nonlocal last_ckpt
        if master:
            state = {"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "step": step, "config": config,
                     "teacher_ppl": teacher_ppl, "skipped_steps": skipped, "log_window": (window, n_logged),
                     "rng_cpu": torch.get_rng_state(), "data_position": divmod(step * args.grad_accum, n_batches)}
            save_checkpoint(state, args.out, args.keep)
        last_ckpt = checkpoint_path(args.out, step)  # on every rank: each names it if it stops on NaNs
        if ddp:
            dist.barrier()

    def evaluate(model_to_eval):
        sums = masked_lm_sums(model_to_eval, valid_batches(valid_seqs, tokenizer, args.batch_size, rank, world_size),
                              device, autocast)
        if ddp:
            dist.all_reduce(sums)
        return perplexity(sums[0].item(), sums[1].item())

    if master:
        os.makedirs(args.out, exist_ok=True)
        out_lock = lock_out_dir(args.out)  # held until main returns or the process ends, however it ends
        with open(os.path.join(args.out, "run.json"), "w") as f:
            json.dump(config, f, indent=1)
        # Drop what a crashed run logged after the checkpoint we resume from (a new run starts empty).
        truncate_metrics(args.out, step if args.resume else -1)
    loggers = open_loggers(args.log, args.out, config, step, args.wandb_project) if master else []
    if valid_seqs is not None and teacher_ppl is None:
        teacher_ppl = evaluate(teacher)
        log(args, master, {"step": step, "teacher_ppl": teacher_ppl}, loggers)

    # ---- the loop ----
    def micro_batches(micro):
        """Micro-batches from position `micro` on (epoch after epoch): a pure function of the step."""
        while True:
            epoch, i = divmod(micro, n_batches)
            batches = epoch_batches(seqs, args.batch_size, args.seed, epoch, rank, world_size, not args.pack)
            for indices in batches[i:n_batches]:
                yield make_batch(seqs, indices, tokenizer, spec, args.seed, epoch)
            micro += n_batches - i

    stream = micro_batches(step * args.grad_accum)
    bar = tqdm(total=total_steps, initial=step, disable=not (master and args.progress), dynamic_ncols=True)
    train_seconds, tokens_seen, bad_steps, valid_ppl = 0.0, 0, 0, None
    with stop_signals() as stop_requested:  # SIGTERM / Ctrl-C: finish the step, save, exit cleanly
        while step < total_steps:
            t_step = time.time()
            micro = [next(stream) for _ in range(args.grad_accum)]
            # Denominators: rows counted over all micro-batches and ranks, so that accumulation and DDP
            # give the gradient of one big batch. The same all_reduce carries the stop flag, so every
            # rank stops at the same step.
            counts = [count_rows(b, cfg) for b in micro]
            stats = torch.tensor([sum(c[k] for c in counts) for k in ("kd", "mlm", "cos")] + [stop_requested()],
                                 dtype=torch.float64, device=device)
            if ddp:
                dist.all_reduce(stats)
            if stats[3].item() > 0:
                save(step)
                if master:
                    print(f"stopped at step {step} as asked; checkpoint {last_ckpt}; continue with --resume")
                break
            # DDP averages gradients over ranks, so each rank divides by the global count / world size.
            denominators = {"kd": stats[0] / world_size, "mlm": stats[1] / world_size, "cos": stats[2] / world_size}
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
                    loss, terms = distil_step(model, teacher, batch, cfg, denominators)
                scaler.scale(loss).backward()
                losses += torch.stack([loss.detach()] + [terms[k] for k in names[1:]]).double()
            # Each rank holds world_size x its share of the global mean (its denominators are the global
            # counts / world_size): summed and divided, every rank knows the step's loss, logs it
            # without further communication and judges a non-finite one alike.
            if ddp:
                dist.all_reduce(losses)
                losses /= world_size
            losses = losses.tolist()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.clip if args.clip > 0 else math.inf)
            if scaler.is_enabled():
                # fp16: the scaler skips a step whose gradients overflowed and lowers its scale; that is
                # routine. A non-finite loss is not: the forward itself overflowed.
                scale_before = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                skipped += scaler.get_scale() < scale_before
                bad = not math.isfinite(losses[0])
            else:
                # bf16/fp32: never step on a NaN. grad_norm is computed from the all-reduced
                # gradients, so every rank takes the same decision.
                bad = not (math.isfinite(losses[0]) and math.isfinite(grad_norm.item()))
                if bad:
                    skipped += 1
                else:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bad_steps = bad_steps + 1 if bad else 0
            if bad_steps >= args.max_bad_steps:
                raise FloatingPointError(
                    f"non-finite loss or gradients at steps {step - bad_steps + 1}-{step} (--max-bad-steps "
                    f"{args.max_bad_steps}); last good checkpoint: {last_ckpt or 'none yet'} (--resume continues "
                    "from it); if it happens again, check the data or start anew with a lower --lr or --dtype fp32")
            window, n_logged = [w + v for w, v in zip(window, losses)], n_logged + 1
            tokens_seen += int(stats[2].item())
            train_seconds += time.time() - t_step  # throughput counts training, not evaluations and saves
            bar.update(1)

            if step % args.log_every == 0 or step == total_steps:
                record = {"step": step, **{k: w / n_logged for k, w in zip(names, window)}, "lr": lr,
                          "grad_norm": grad_norm.item(), "tokens_per_s": tokens_seen / train_seconds,
                          "skipped_steps": skipped}
                if scaler.is_enabled():
                    record["scale"] = scaler.get_scale()
                log(args, master, record, loggers)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                window, n_logged, train_seconds, tokens_seen = [0.0] * len(names), 0, 0.0, 0
            if valid_seqs is not None and (step % args.eval_every == 0 or step == total_steps):
                valid_ppl = evaluate(unwrap(model))
                log(args, master, {"step": step, "valid_ppl": valid_ppl, "teacher_ppl": teacher_ppl}, loggers)
            # Not during a run of bad steps: the last good checkpoint stays the newest.
            if (step % args.save_every == 0 or step == total_steps) and bad_steps == 0:
                save(step)
    bar.close()
    close_loggers(loggers)

    if step == total_steps and master:
        save_student(student, tokenizer, args.out)
        corpora = {"train": (args.train, len(corpus.tokens)),
                   "valid": (args.valid, len(valid_seqs.tokens) if valid_seqs is not None else 0)}
        write_model_card(args.out, config, teacher, student, tokenizer.mask_token, layers, step, corpora,
                         valid_ppl, teacher_ppl)
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


def log(args, master, record, loggers=()):
    """metrics.jsonl and --log's backends get every record (rank 0 only); the console, evaluations."""
    if master:
        log_metrics(args.out, record, loggers)
        if "valid_ppl" in record or set(record) == {"step", "teacher_ppl"}:
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


if __name__ == "__main__":
    try:
        main()
    except (StudentError, DataError, CheckpointError, FloatingPointError, LogError, HubError) as e:
        rank = os.environ.get("RANK")
        sys.exit(f"error{f' (rank {rank})' if rank and os.environ.get('WORLD_SIZE', '1') != '1' else ''}: {e}")
    except KeyboardInterrupt:  # a second Ctrl-C: the checkpoints already written are intact
        sys.exit("error: interrupted before the checkpoint could be saved; --resume continues from the last one")
