"""Distil a BERT-family teacher into a student made of some of its layers (DistilBERT's recipe): a
masked LM on a corpus, or a teacher fine-tuned on a task on the task's labelled data.

One process:      python train.py --teacher bert-base-uncased --train corpus.txt --out runs/distil
A task teacher:   python train.py --teacher my-finetuned-bert --train train.csv --valid valid.csv --out runs/task
One node, 8 GPUs: torchrun --nproc_per_node=8 train.py --config configs/distilbert-base-uncased.json ...

The run, top to bottom: flags -> distributed setup -> teacher (its class says masked LM or task),
tokenizer, data, student, all checked before anything is written (run_inputs.py) -> the one place
where a masked-LM run and a task run differ (pick_run: the step, the row counts, the batches, the
evaluation) -> DDP, optimizer, resume (run_folder.py) -> the loop: for each step, fetch the micro-batches, agree on
the denominators across ranks, forward/backward each micro-batch, clip and step (train_step.py),
log, evaluate, checkpoint -> save the student in Hugging Face format.
"""

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the libraries load (seconds): one line, not a traceback from an import
    signal.signal(signal.SIGINT, lambda *_: sys.exit("error: interrupted while starting; nothing was written"))

import os
import time
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (CheckpointError, check_out_dir, check_resumable, check_same_corpus, checkpoints_size,
                        list_checkpoints, load_latest, stop_signals)
from cluster import ClusterError, process_group_options, wait_for_ranks
from data import MicroBatches, micro_batch_loader
from embeddings import KIND as EMBEDDING, embedding_run
from distil import count_rows, distil_step, freeze_unreached, probe_batch, unwrap
from flags import parse_args, recipe_defaults
from heldout import evaluate_masked_lm, evaluate_task_model, label_order_warnings
from logs import LogError, check_log_spec, close_loggers, log_metrics, open_loggers
from modelcard import HubError, push_to_hub, write_model_card, write_task_model_card
from precision import DTYPES, autocast_for, pick_dtype
from run_folder import open_run_folder, resume_state, run_config, save_run_checkpoint, start_or_resume
from run_inputs import load_inputs
from pretrained import load_teacher, save_student, task_kind
from student import StudentError
from tasks import KINDS, TaskBatches, count_task_rows, task_probe_batch, task_step
from teacher_cache import teacher_logits_for_run
from token_cache import DataError
from train_step import (StepCounters, bf16_all_reduce_hook, check_bad_steps, compile_step, dropout_seed,
                        forward_backward, get_lr, global_denominators, host_to_device, make_optimizer, optimizer_step,
                        use_compile)


def setup_device(args):
    """torchrun's RANK, LOCAL_RANK and WORLD_SIZE, and this process's device."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    # modulo the visible devices: launchers that show each process only its own GPU (Slurm's srun with
    # --gpus-per-task) still set LOCAL_RANK to the process's rank on the node
    device = torch.device(f"cuda:{local_rank % max(1, torch.cuda.device_count())}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, local_rank, world_size, device


def main(argv=None):
    args = parse_args(argv)
    RUN["out"] = args.out
    transformers.logging.set_verbosity_error()  # our own checks report what matters, in one line
    transformers.utils.logging.disable_progress_bar()
    rank, local_rank, world_size, device = setup_device(args)
    args.compile = use_compile(args.compile, device)  # "auto": on a GPU
    ddp, master = world_size > 1, rank == 0
    if master and args.compile_mode != "default" and not (args.compile and device.type == "cuda"):
        print(f"warning: --compile-mode {args.compile_mode} " + ("does nothing without --compile on" if not args.compile
              else "has no CUDA graphs to replay on a CPU"), file=sys.stderr, flush=True)
    finished = start_or_resume(args, rank, world_size, master)
    if finished is not None:  # one line said so: exit 0, so that torchrun --max-restarts does not retry
        return finished
    dtype_name, dtype_reason = pick_dtype(args.dtype, device)
    dtype, autocast = DTYPES[dtype_name], autocast_for(device, DTYPES[dtype_name])

    # ---- inputs, all checked before anything is written or the process group starts ----
    check_out_dir(args.out, args.resume or args.cache_only)
    check_log_spec(args.log)  # a missing tensorboard/wandb stops the run now, not after loading
    teacher, kind = load_teacher_and_kind(args)
    config = run_config(args, world_size, dtype_name, dtype_reason)
    ckpt_path, ckpt = load_latest(args.out) if args.resume else (None, None)
    if ckpt is not None:
        check_resumable(ckpt["config"], config, ckpt_path)
    inputs = load_inputs(args, config["global_batch"], master, teacher, kind, device, autocast)
    config.update(seq_len_used=inputs.seq_len, train_corpus=inputs.train_corpus)
    if args.cache_only:
        if master:
            print(f"tokenized {args.train}{' and ' + args.valid if args.valid else ''} into {args.cache_dir}")
        return 0
    wait_for_ranks("loaded", rank, world_size)  # a slow node's tokenization is not a collective's timeout
    if ckpt is not None:  # the same file, or one with the same tokens (at another path, on another node)
        check_same_corpus(ckpt["config"], config, ckpt_path)
    n_batches = inputs.steps_per_epoch * args.grad_accum  # micro-batches per rank and epoch
    total_steps = args.max_steps or max(1, int(args.epochs * inputs.steps_per_epoch))
    config["total_steps"] = total_steps  # run.json: what finished_run compares the newest checkpoint with
    if master:  # the run's first line, once every input has passed its checks (an error stays one line)
        print(f"dtype: {dtype_name} ({dtype_reason})", flush=True)
    run = pick_run(kind, args, inputs, teacher, n_batches, rank, world_size, device, autocast)

    # The DataLoader's workers fork now, before the process group starts (see micro_batch_stream).
    stream = micro_batch_stream(run, args, ckpt["step"] if ckpt is not None else 0, total_steps, device, world_size)

    # ---- the models on the device, DDP, the optimizer ----
    student, cfg = inputs.student, inputs.cfg
    model = place_models(student, teacher, run, cfg, args, device, dtype, local_rank, world_size, master)
    step_fn = compile_step(run.step, args.compile_mode, device) if args.compile else run.step  # after the probe
    betas = tuple(float(b) for b in args.adam_betas.split(","))
    optimizer = make_optimizer(student, args.lr, betas, args.adam_eps, args.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    # ---- resume, or start: the run folder, the loggers, the teacher's held-out scores ----
    names = ["loss"] + [k for k in ("kd", "mlm", "label", "cos", "mse", "hidden", "attn", "relation", "embed")
                        if getattr(cfg, f"alpha_{k}") > 0]
    state = resume_state(ckpt, ckpt_path, student, optimizer, scaler, len(names), master)
    del ckpt
    step, window, n_logged, last_ckpt = state.step, host_to_device(state.window, device), state.n_logged, ckpt_path
    if step > total_steps:
        raise CheckpointError(f"--resume: {ckpt_path} is at step {step}, past this run's {total_steps} steps; "
                              f"pass --max-steps {step} or more")
    out_lock = open_run_folder(args, config, step) if master else None  # held until the process ends
    loggers = open_loggers(args.log, args.out, config, step, args.wandb_project) if master else []
    teacher_scores, teacher_predictions, valid_scores = state.teacher_scores, None, None
    # A task's agreement needs the teacher's predictions, which no checkpoint keeps: computed every run.
    if inputs.valid_data is not None and teacher is not None and (teacher_scores is None or kind in KINDS):
        teacher_scores, teacher_predictions = run.evaluate(teacher)
        log(args, master, {"step": step, **prefixed("teacher_", teacher_scores)}, loggers)
    # Labels given as bare ids may number the classes in another order than the teacher's: its predictions
    # say so, once, before the loop (never inside a step).
    label_warnings = label_order_warnings(teacher, inputs, args, teacher_predictions, device, autocast) \
        if master and teacher is not None and kind in KINDS else []
    for warning in label_warnings:
        print(warning, flush=True)

    # ---- the loop ----
    bar = tqdm(total=total_steps, initial=step, disable=not (master and args.progress), dynamic_ncols=True)
    train_seconds, data_seconds = 0.0, 0.0
    counters = StepCounters(device, state.skipped)  # skipped and bad steps, stop and save flags: on the device
    # --save-every-minutes: each rank's own clock; the step's all-reduce agrees
    last_save, last_save_step = time.monotonic(), step
    with stop_signals() as stop_requested:  # SIGTERM / Ctrl-C: finish the step and the next, save, exit cleanly
        while step < total_steps:
            t_step = time.perf_counter()
            micro = [next(stream) for _ in range(args.grad_accum)]
            data_seconds += time.perf_counter() - t_step
            denominators, tokens = global_denominators(micro, run.count, device, world_size)
            lr = get_lr(step, total_steps, args.lr, args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(dropout_seed(args.seed, step, rank))
            losses = forward_backward(model, teacher, micro, step_fn, cfg, denominators, names, device, autocast,
                                      scaler)
            # The previous step's counters, read one step late, once this step's kernels are queued (so the
            # host never waits for an empty queue): a stop or save asked in step k's all-reduce is acted on
            # at step k + 1, by every rank alike; a run of --max-bad-steps ending at step k ends the run
            # here, before step k + 1's update. A save asked in step k is answered by a save at step k (its
            # clock was read before it), and a save coming at this step answers this rank's clock too.
            late = counters.previous()
            check_bad_steps(late["bad_run"], step, args.max_bad_steps, last_ckpt)
            stop, save_asked = late["stop"] > 0, late["save"] > 0 and last_save_step < step
            save_due = not save_asked and 0 < args.save_every_minutes * 60 <= time.monotonic() - last_save
            result = optimizer_step(student, optimizer, scaler, losses, args.clip, stop_requested(), world_size,
                                    save_due)
            counters.add(result)
            step += 1
            window += torch.cat([result["losses"], tokens])  # summed on the device, read at logging steps only
            n_logged += 1
            train_seconds += time.perf_counter() - t_step  # throughput counts training, not evaluations and saves
            bar.update(1)

            logging = step % args.log_every == 0 or step == total_steps
            saving = step % args.save_every == 0 or step == total_steps or save_asked or stop
            if logging or saving:  # this step's own counters, in the one read of a logging or saving step
                sums, now = counters.read(window)
                check_bad_steps(now["bad_run"], step, args.max_bad_steps, last_ckpt)
            if logging:
                record = {"step": step, **{k: w / n_logged for k, w in zip(names, sums)}, "lr": lr,
                          "grad_norm": now["grad_norm"], "tokens_per_s": sums[-1] / train_seconds,
                          "data_wait": data_seconds / train_seconds, "skipped_steps": int(now["skipped"]),
                          **({"scale": scaler.get_scale()} if scaler.is_enabled() else {})}
                log(args, master, record, loggers)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                window.zero_()
                n_logged, train_seconds, data_seconds = 0, 0.0, 0.0
            if inputs.valid_data is not None and (step % args.eval_every == 0 or step == total_steps):
                valid_scores, _ = run.evaluate(unwrap(model), teacher_predictions)
                log(args, master, {"step": step, **prefixed("valid_", valid_scores),
                                   **prefixed("teacher_", teacher_scores or {}, drop=("examples", "agreement"))},
                    loggers)
            # Not during a run of bad steps: the last good checkpoint stays the newest.
            if (saving and now["bad_run"] == 0) or stop:
                last_ckpt = save_run_checkpoint(args, config, student, optimizer, scaler, step, teacher_scores,
                                                int(now["skipped"]), window, n_logged, n_batches, master, ddp)
                last_save, last_save_step = time.monotonic(), step
            if stop:
                if master:
                    print(f"stopped at step {step} as asked; checkpoint {last_ckpt}; continue with --resume")
                break
    bar.close()
    close_loggers(loggers)
    if step == total_steps and master:
        finish_run(run, student, inputs, args, config, step, valid_scores, teacher_scores, label_warnings,
                   relabelled_alone=not cfg.alpha_kd)
    end_process_group(ddp)
    if step == total_steps and master and args.push_to_hub:  # after the process group: an upload can be slow
        print(f"uploaded to {push_to_hub(args.out, args.push_to_hub)}")
    return step


def finish_run(run, student, inputs, args, config, step, valid_scores, teacher_scores, label_warnings,
               relabelled_alone):
    """Rank 0, once the last step is done: the student and its model card in --out, and what the user
    should know about them (label names the data's ids may not follow; the checkpoints' size)."""
    run.save(student, inputs.tokenizer, args.out)
    run.write_card(config, step, valid_scores, teacher_scores)
    print(f"saved the student ({sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters) to {args.out}")
    if label_warnings:  # the student's label names are the teacher's; the data's ids may not follow them
        names = ", ".join(f"{i} {n}" for i, n in list(student.config.id2label.items())[:6])
        alone = "; with --alpha-kd 0 the student learnt the data ids alone" if relabelled_alone else ""
        print(f"warning: {args.out} keeps the teacher's label names ({names}), which the data's label ids may not "
              f"follow (see the warning above{alone}); check them, or rerun with --label-map")
    size = checkpoints_size(args.out) / 1e6
    print(f"checkpoints: {size:.{0 if size >= 10 else 1}f} MB in {os.path.join(args.out, 'checkpoints')}, "
          "for --resume; the student does not need them: rm -r that folder to free the space")


def end_process_group(ddp):
    """Every rank waits for the others (rank 0 may be saving), then the process group ends."""
    if ddp:
        dist.barrier()
        # Let gloo's worker threads take the GIL to free the tensors of finished collectives: the last
        # reference to the process group joins those threads while holding the GIL, and a thread still
        # waiting for it then hangs the exit (seen about once in 30 runs with torch 2.13 on CPU).
        time.sleep(0.2)
        dist.destroy_process_group()


def place_models(student, teacher, run, cfg, args, device, dtype, local_rank, world_size, master):
    """Both models on the device; the student's parameters that no loss reaches frozen; --compile;
    under torchrun, the process group and the student wrapped in DDP. Returns the model to train."""
    student.to(device)
    if teacher is not None:
        teacher.to(device)
        if dtype != torch.float32:  # the teacher only runs forward: keep its weights in the compute dtype
            teacher.to(dtype)
    # Parameters no active loss reaches (the MLM head when only hidden states are compared, layers past
    # the last --layer-map pair) would get no gradient, which DDP takes for an error: they do not train.
    frozen = freeze_unreached(student, run.step(student, teacher, run.probe_batch(student), cfg)[0])
    if frozen and master:
        print(f"not trained (no active loss reaches them): {', '.join(frozen[:4])}{', ...' if len(frozen) > 4 else ''}")
    if world_size == 1:
        return student
    # A timeout, so that the ranks left waiting for a lost one end (cluster.process_group_options)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None,
                            **process_group_options(args.collective_timeout))
    # Only the student is wrapped: the teacher has no gradients to synchronise (and wrapping it, as some
    # toolkits do, would all-reduce nothing at a cost).
    # Buckets that are the gradients themselves (no copy of every gradient), no broadcast of the buffers
    # (the constant position and token-type ids) every step, the graph's bookkeeping done once: every
    # step reaches the same parameters (freeze_unreached froze the others). Not with --grad-accum: a
    # static graph whose first backward skips the all-reduce fails an internal assert (torch 2.13).
    # --ddp-bf16-grads halves the all-reduce's bytes (each gradient rounded to bf16 on the wire).
    model = DDP(student, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
                broadcast_buffers=False, static_graph=args.grad_accum == 1)
    if args.ddp_bf16_grads:
        model.register_comm_hook(None, bf16_all_reduce_hook)
    return model


def load_teacher_and_kind(args):
    """The teacher (None to fine-tune without one) and what the run does, which its class says: a
    masked LM (kind None) or a task (one of tasks.KINDS); then the recipe's defaults for that kind."""
    teacher = load_teacher(args.teacher) if args.teacher else None
    kind = args.task if teacher is None else EMBEDDING if hasattr(teacher, "sentence") else task_kind(teacher.config)
    if teacher is not None and args.task:
        raise StudentError(f"--task: the task of a fine-tuned teacher comes from it, and {args.teacher} is "
                           f"{'a masked LM' if kind is None else kind}; drop --task (or --teacher, to fine-tune)")
    recipe_defaults(args, kind, has_teacher=teacher is not None)
    return teacher, kind


def pick_run(kind, args, inputs, teacher, n_batches, rank, world_size, device, autocast):
    """The one place where a masked-LM run and a task run differ. Returns a namespace:

        step(model, teacher, batch, cfg, denominators=...) -> (loss, terms): distil_step or task_step
        count(batch) -> {loss name: rows it reads}: the denominators' parts (host ints)
        dataset: micro-batch m of this rank, a pure function of m (data.MicroBatches, tasks.TaskBatches)
        probe_batch(student): a batch every loss reads everywhere (freeze_unreached)
        evaluate(model, teacher_predictions=None) -> (scores, predictions): {"ppl": ...} or the task's
            scores (heldout.task_metrics), over every rank's share of --valid
        write_card(config, step, valid_scores, teacher_scores): the model card of the saved student
        save(student, tokenizer, out): the student in --out (pretrained.save_student; a sentence-embedding
            run: embeddings.save_embedding_student, a folder sentence-transformers loads)
    """
    if kind == EMBEDDING:  # a sentence-transformers teacher: its sentence embeddings (embeddings.py)
        return embedding_run(args, inputs, teacher, n_batches, rank, world_size, device, autocast)
    tokenizer, train_data, valid_data = inputs.tokenizer, inputs.train_data, inputs.valid_data
    max_length = inputs.seq_len if args.compile else None  # a compiled step: batches of few shapes
    if kind is None:
        def evaluate(model, teacher_predictions=None):
            return evaluate_masked_lm(model, valid_data, tokenizer, args.batch_size, device, autocast, rank,
                                      world_size), None

        def write_card(config, step, valid_scores, teacher_scores):
            corpora = {"train": (args.train, len(train_data.tokens)),
                       "valid": (args.valid, len(valid_data.tokens) if valid_data is not None else 0)}
            write_model_card(args.out, config, teacher, unwrap(inputs.student), tokenizer.mask_token,
                             inputs.layers, step, corpora, (valid_scores or {}).get("ppl"),
                             (teacher_scores or {}).get("ppl"))
        return SimpleNamespace(
            step=distil_step, count=partial(count_rows, cfg=inputs.cfg), probe_batch=probe_batch,
            dataset=MicroBatches(train_data, tokenizer, inputs.spec, args.batch_size, args.seed, n_batches, rank,
                                 world_size, group_by_length=not args.pack, max_length=max_length),
            evaluate=evaluate, write_card=write_card, save=save_student)

    def evaluate(model, teacher_predictions=None):
        return evaluate_task_model(model, valid_data, inputs.student.config.id2label, tokenizer.pad_token_id,
                                   args.batch_size, device, autocast, rank, world_size, teacher_predictions)

    def write_card(config, step, valid_scores, teacher_scores):
        write_task_model_card(args.out, config, teacher, unwrap(inputs.student), kind, step, valid_scores,
                              teacher_scores)
    cached = None  # --teacher-cache: the teacher's logits of every record, computed once (teacher_cache.py)
    if args.teacher_cache:
        cached = teacher_logits_for_run(args, teacher, train_data, tokenizer.pad_token_id, device, autocast,
                                        rank == 0)
        wait_for_ranks("teacher logits", rank, world_size)  # the first rank computes them; the others wait here
    return SimpleNamespace(
        step=partial(task_step, kind=kind), count=partial(count_task_rows, cfg=inputs.cfg),
        probe_batch=partial(task_probe_batch, kind=kind),
        dataset=TaskBatches(train_data, tokenizer.pad_token_id, args.batch_size, args.seed, n_batches, rank,
                            world_size, cached, max_length),
        evaluate=evaluate, write_card=write_card, save=save_student)


def prefixed(prefix, scores, drop=("examples",)):
    """Scores as logged: {prefix + name: value}, without the counts (and what `drop` names)."""
    return {prefix + k: v for k, v in scores.items() if k not in drop}


def micro_batch_stream(run, args, start_step, total_steps, device, world_size):
    """This rank's micro-batches from `start_step` on, built ahead of the loop by DataLoader workers.
    Micro-batches are a pure function of their number (seed, epoch, index): a resumed run starts at
    its step's micro-batch and sees the same data. Called before the process group starts: a process
    forked after NCCL has set up InfiniBand/RDMA can hang or crash (the workers touch neither CUDA nor
    NCCL)."""
    num_workers = args.num_workers if args.num_workers is not None else default_workers(device, world_size)
    if num_workers:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers do not tokenize; silence the fork warning
    return iter(micro_batch_loader(run.dataset, start_step * args.grad_accum, total_steps * args.grad_accum,
                                   num_workers, pin_memory=device.type == "cuda"))


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


RUN = {"out": None}  # the run's --out, once the flags are read: what an interruption reports on


def interrupted_message(out_dir):
    """What a Ctrl-C outside the loop's own handling (while loading, evaluating, saving, or a second
    Ctrl-C) leaves, in one line true to what is on disk: the newest checkpoint, or none."""
    paths = list_checkpoints(out_dir) if out_dir else []
    if not paths:
        return "error: interrupted before the first checkpoint; nothing to resume: run the command again"
    return f"error: interrupted; the newest checkpoint is {paths[-1]}: --resume continues from it"


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, Ctrl-C is a KeyboardInterrupt
    try:
        main()
    except (StudentError, DataError, CheckpointError, ClusterError, FloatingPointError, LogError, HubError) as e:
        rank = os.environ.get("RANK")
        line = f"error{f' (rank {rank})' if rank and os.environ.get('WORLD_SIZE', '1') != '1' else ''}: {e}\n"
        os.write(2, line.encode())  # one write: under torchrun the ranks' lines share a pipe and stay whole
        sys.exit(1)
    except KeyboardInterrupt:  # before the loop, after it, or a second Ctrl-C: the checkpoints written are intact
        sys.exit(interrupted_message(RUN["out"]))
