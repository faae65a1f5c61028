"""Evaluate a distilled student against its teacher: perplexity or task scores, agreement, size and speed.

    python heldout.py STUDENT_DIR --teacher TEACHER --valid valid.txt
    python heldout.py STUDENT_DIR --teacher TEACHER --valid valid.csv      # task models: labelled data

For masked LMs, prints the held-out masked-LM perplexity of both models, how often the student's
top-1 prediction at a masked position is the teacher's, their parameter counts, and the student's
inference speed-up over the teacher on the same batch. The masks are fixed (a constant seed,
uniform masking), so numbers compare across runs and across students. For models fine-tuned on a
task (sequence or token classification), the task's scores of both (tasks.task_metrics: accuracy
and macro-F1, micro-F1, Pearson and Spearman, or entity F1) and how often the student agrees with
the teacher; --teacher is optional there. train.py uses the same functions for validation.
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import transformers

from data import make_batch, make_sequences, mask_spec
from token_cache import DataError, default_cache_dir, load_corpus
from distil import forward_at_rows
from precision import DTYPES, autocast_for
from student import StudentError, load_teacher, load_tokenizer, task_kind, usable_positions

VALID_MASK_SEED = 0  # validation masks never depend on --seed, so runs with different seeds compare


def valid_batches(seqs, tokenizer, batch_size, rank=0, world_size=1):
    """This rank's share of the validation sequences, in order, with fixed masks."""
    spec = mask_spec(tokenizer)  # uniform masking even if training uses --mlm-smoothing
    mine = list(range(rank, len(seqs.starts), world_size))
    for i in range(0, len(mine), batch_size):
        yield make_batch(seqs, mine[i:i + batch_size], tokenizer, spec, VALID_MASK_SEED, 0)


@torch.no_grad()
def masked_lm_sums(model, batches, device, autocast=nullcontext, teacher=None):
    """Sum of cross-entropies at the masked positions, their count and, given a teacher, how many
    of the model's top-1 predictions there equal the teacher's. Sums, not means: the caller adds
    them up over ranks before dividing. Returns a float64 tensor [ce_sum, count, agree]."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in batches:
        batch = to_device(batch, device)
        rows, labels = batch["masked_rows"], batch["masked_labels"]  # found on the host by make_batch
        attention_mask = batch["attention_mask"] if batch["padded"] else None
        with autocast():
            logits, _ = forward_at_rows(model, batch["input_ids"], attention_mask, rows, False)
            if teacher is not None:
                teacher_logits, _ = forward_at_rows(teacher, batch["input_ids"], attention_mask, rows, False)
        sums[0] += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").double()
        sums[1] += labels.numel()
        if teacher is not None:
            sums[2] += (logits.argmax(-1) == teacher_logits.argmax(-1)).sum()
    model.train(was_training)
    return sums


def perplexity(ce_sum, count):
    return math.exp(ce_sum / count) if count else float("nan")


@torch.no_grad()
def inference_ms(model, batch, device, autocast=nullcontext, repeats=5):
    """Median wall time in ms of the encoder's forward on `batch`: what a downstream task runs
    (DistilBERT's speed-up was measured so), without the MLM head that fine-tuning replaces."""
    model.eval()
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast():
            model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first run warms up
            times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", help="folder of a distilled student (train.py's --out)")
    p.add_argument("--teacher", help="the teacher it was distilled from (hub name or folder); optional for a task")
    p.add_argument("--valid", required=True, help="held-out corpus (.txt, .csv or .jsonl), or labelled data")
    p.add_argument("--text-column", help="default: text (token classification: tokens)")
    p.add_argument("--text-pair-column", help="tasks on text pairs: the second text's column (default: the "
                   "training run's, from STUDENT/run.json)")
    p.add_argument("--label-column", help="tasks: default label (token classification: ner_tags)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache-dir", default=None, help="token cache folder (default: ~/.cache/bert-distil)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = autocast_for(device, DTYPES[args.dtype])
    student = load_teacher(args.student).to(device)
    kind = task_kind(student.config)
    if kind is not None:
        return evaluate_task(args, student, kind, device, autocast)
    if not args.teacher:
        raise StudentError(f"{args.student} is a masked LM: pass --teacher to compare it with")
    args.text_column = args.text_column or "text"
    teacher = load_teacher(args.teacher).to(device)
    tokenizer = load_tokenizer(teacher, args.teacher)
    seq_len = min(args.seq_len, usable_positions(teacher), usable_positions(student))
    corpus = load_corpus(args.valid, tokenizer, args.cache_dir or default_cache_dir(), args.text_column)
    seqs = make_sequences(corpus, seq_len)

    t_sums = masked_lm_sums(teacher, valid_batches(seqs, tokenizer, args.batch_size), device, autocast)
    s_sums = masked_lm_sums(student, valid_batches(seqs, tokenizer, args.batch_size), device, autocast, teacher)
    batch = to_device(next(valid_batches(seqs, tokenizer, args.batch_size)), device)
    t_ms, s_ms = inference_ms(teacher, batch, device, autocast), inference_ms(student, batch, device, autocast)
    n_params = lambda m: sum(p.numel() for p in m.parameters())
    result = {
        "teacher_ppl": perplexity(t_sums[0].item(), t_sums[1].item()),
        "student_ppl": perplexity(s_sums[0].item(), s_sums[1].item()),
        "top1_agreement": s_sums[2].item() / max(1.0, s_sums[1].item()),
        "masked_positions": int(s_sums[1].item()),
        "teacher_params": n_params(teacher), "student_params": n_params(student),
        "teacher_ms": t_ms, "student_ms": s_ms, "speedup": t_ms / s_ms,
        "batch": list(batch["input_ids"].shape), "device": str(device), "dtype": args.dtype,
    }
    if args.json:
        print(json.dumps(result))
        return result
    r = result
    print(f"| | teacher | student |\n|---|---|---|\n"
          f"| held-out MLM perplexity | {r['teacher_ppl']:.2f} | {r['student_ppl']:.2f} |\n"
          f"| parameters | {r['teacher_params'] / 1e6:.1f}M | {r['student_params'] / 1e6:.1f}M "
          f"({100 * (1 - r['student_params'] / r['teacher_params']):.0f}% smaller) |\n"
          f"| encoder forward, {r['batch'][0]}x{r['batch'][1]} tokens ({r['device']}, {r['dtype']}) | "
          f"{r['teacher_ms']:.1f} ms | {r['student_ms']:.1f} ms ({r['speedup']:.2f}x faster) |\n"
          f"| top-1 agreement with the teacher at masked positions | | {100 * r['top1_agreement']:.1f}% |\n"
          f"({r['masked_positions']} masked positions)")
    return result


def evaluate_task(args, student, kind, device, autocast):
    """heldout.py for a task model: its scores on labelled --valid data, and the teacher's beside them."""
    from tasks import (check_metrics, examples_note, format_score, gold, load_examples, predict, task_metrics,
                       valid_task_batches)

    run_json = os.path.join(args.student, "run.json")  # train.py's record: the columns it was trained on
    run = json.load(open(run_json)) if os.path.isfile(run_json) else {}
    for column in ("text_column", "text_pair_column", "label_column"):
        if getattr(args, column) is None and run.get(column):
            setattr(args, column, run[column])
    teacher = load_teacher(args.teacher).to(device) if args.teacher else None
    if teacher is not None and task_kind(teacher.config) != kind:
        raise StudentError(f"--teacher {args.teacher} is not a {kind} model as {args.student} is")
    tokenizer = load_tokenizer(student, args.student, masked_lm=False, words=kind == "token_classification")
    token = kind == "token_classification"
    id2label = student.config.id2label
    check_metrics(kind, id2label)
    examples = load_examples(args.valid, tokenizer, kind, id2label, min(args.seq_len, usable_positions(student)),
                             args.cache_dir or default_cache_dir(), args.text_column or ("tokens" if token else "text"),
                             args.label_column or ("ner_tags" if token else "label"), args.text_pair_column)
    print(examples_note(examples, args.valid), file=sys.stderr)
    batches = lambda: valid_task_batches(examples, tokenizer.pad_token_id, args.batch_size)
    labels = gold(examples)
    teacher_predictions = predict(teacher, batches(), device, autocast) if teacher is not None else None
    scores = task_metrics(kind, predict(student, batches(), device, autocast), labels, id2label, teacher_predictions)
    result = {"kind": kind, "student": scores,
              "teacher": task_metrics(kind, teacher_predictions, labels, id2label) if teacher is not None else None,
              "student_params": sum(p.numel() for p in student.parameters())}
    batch = to_device(next(batches()), device)
    result["student_ms"] = inference_ms(student, batch, device, autocast)
    if teacher is not None:
        result["teacher_params"] = sum(p.numel() for p in teacher.parameters())
        result["teacher_ms"] = inference_ms(teacher, batch, device, autocast)
    if args.json:
        print(json.dumps(result))
        return result
    fmt = lambda d, k: "" if not d or k not in d else format_score(kind, d[k])
    print("| | teacher | student |\n|---|---|---|")
    for k in (k for k in scores if k != "examples"):
        print(f"| {k.replace('_', ' ')} | {fmt(result['teacher'], k)} | {fmt(scores, k)} |")
    print(f"| parameters | {result.get('teacher_params', 0) / 1e6:.1f}M | {result['student_params'] / 1e6:.1f}M |\n"
          f"| forward, {batch['input_ids'].shape[0]}x{batch['input_ids'].shape[1]} tokens ({device}, {args.dtype}) | "
          f"{result.get('teacher_ms', float('nan')):.1f} ms | {result['student_ms']:.1f} ms |\n"
          f"({scores['examples']} labelled examples; scores in %, correlations as they are)")
    return result


if __name__ == "__main__":
    try:
        main()
    except (StudentError, DataError) as e:
        sys.exit(f"error: {e}")
