"""Evaluate a distilled student against its teacher: perplexity or task scores, agreement, size and speed.

    python heldout.py STUDENT_DIR --teacher TEACHER --valid valid.txt
    python heldout.py STUDENT_DIR --teacher TEACHER --valid valid.csv      # task models: labelled data
    python heldout.py STUDENT_DIR --teacher ST_FOLDER --valid texts.csv    # sentence embeddings (embeddings.py)
    python heldout.py --layers 0,2,5 --teacher ST_FOLDER --valid texts.csv # ... the teacher's layers, untrained

For masked LMs, prints the held-out masked-LM perplexity of both models, how often the student's
top-1 prediction at a masked position is the teacher's, their parameter counts, and the student's
inference speed-up over the teacher on the same batch. The masks are fixed (a constant seed,
uniform masking), so numbers compare across runs and across students. For models fine-tuned on a
task (sequence or token classification), the task's scores of both (task_metrics: accuracy
and macro-F1, micro-F1, Pearson and Spearman, or entity F1) and how often the student agrees with
the teacher; --teacher is optional there. For sentence-embedding models (a sentence-transformers
--teacher), the agreement with the teacher's embeddings, the encoding speed-up and, with labelled
texts, a linear probe's accuracy (embeddings.evaluate_folder). train.py uses the same functions
for validation.
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

from checkpoint import read_run_json
from data import make_batch, make_sequences, mask_spec, to_device
from token_cache import DataError, default_cache_dir, load_corpus
from distil import forward_at_rows
from embeddings import evaluate_folder, is_sentence_folder
from precision import DTYPES, autocast_for
from tasks import check_labelled, examples_note, load_examples, parse_label_map, task_batch, valid_task_batches
from pretrained import load_teacher, load_tokenizer, task_kind, usable_positions
from student import StudentError

VALID_MASK_SEED = 0  # validation masks never depend on --seed, so runs with different seeds compare
PRIMARY = {"single_label_classification": "accuracy", "multi_label_classification": "micro_f1",
           "regression": "pearson", "token_classification": "entity_f1"}  # the score a run is judged by

# ---------------------------------------------------------------------------------------------
# Masked LMs: perplexity
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Tasks: predictions and scores (numpy; seqeval for entity F1)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model, batches, device, autocast):
    """{example id: the model's float32 logits (C,), or (words, C) for token classification}."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        for batch in batches:
            inputs = {k: torch.as_tensor(batch[k], device=device) for k in ("input_ids", "attention_mask",
                                                                              "token_type_ids") if k in batch}
            with autocast():
                logits = model(**inputs).logits.float().cpu().numpy()
            for row, i in enumerate(batch["example_ids"]):
                if logits.ndim == 3:  # token classification: the rows of the words' first sub-tokens
                    out[int(i)] = logits[row][np.asarray(batch["word_mask"][row], dtype=bool)]
                else:
                    out[int(i)] = logits[row]
    finally:
        model.train(was_training)
    return out


def gold(examples):
    """{example id: its label (id, float vector, or word label ids)} for the labelled examples."""
    out = {}
    for i in range(len(examples.starts)):
        if examples.kind == "token_classification":
            span = slice(examples.starts[i], examples.starts[i] + examples.lengths[i])
            tags = examples.token_labels[span][examples.word_mask[span]]
            if (tags != -100).all() and len(tags):
                out[i] = tags
        elif examples.kind == "single_label_classification":
            if examples.labels[i] != -100:
                out[i] = examples.labels[i]
        elif not np.isnan(examples.labels[i]).any():
            out[i] = examples.labels[i]
    return out


def decide(kind, logits):
    """What a model predicts from its logits: argmax ids, 0/1 per label (sigmoid > 0.5), or the values."""
    if kind == "multi_label_classification":
        return (logits > 0).astype(np.int64)
    if kind == "regression":
        return logits
    return logits.argmax(-1)


def format_score(kind, value):
    """A score as the tables print it: in % with two decimals, or, for a regression (whose scores and
    agreement are correlations), as the correlation with four."""
    return f"{value:.4f}" if kind == "regression" else f"{100 * value:.2f}"


def _f1(true_pos, false_pos, false_neg):
    return 2 * true_pos / max(1, 2 * true_pos + false_pos + false_neg)


def _ranks(x):
    """Ranks 1..n of x, ties given their mean rank (Spearman's convention, as scipy's rankdata)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / np.bincount(inverse))[inverse]


def _pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / max(np.sqrt((a * a).sum() * (b * b).sum()), 1e-12))


def task_metrics(kind, predictions, labels, id2label, teacher_predictions=None):
    """Scores of `predictions` ({id: logits}) against `labels` ({id: label}, labelled examples only):

        single-label: accuracy and macro-F1 (the mean over the labels that occur of each label's F1)
        multi-label:  micro-F1 over every (example, label) decision, and exact-match accuracy
        regression:   Pearson and Spearman correlations (the mean over outputs)
        token:        word accuracy and, when the labels are IOB tags (B-X, I-X, O), entity-level F1
                      (seqeval's, as CoNLL's conlleval scores: an entity counts when its span and
                      type are both right)

    With the teacher's predictions, `agreement`: the fraction of decisions where the two agree
    (regression: the Pearson correlation of their predictions). Small formulas are written here
    (numpy only); entity F1 comes from seqeval, imported only for token classification.
    """
    ids = sorted(labels)
    metrics = {"examples": len(ids)}
    if ids:
        pred = [decide(kind, predictions[i]) for i in ids]
        true = [labels[i] for i in ids]
        if kind == "single_label_classification":
            pred, true = np.array(pred), np.array(true)
            metrics["accuracy"] = float((pred == true).mean())
            # over the labels that occur (gold or predicted), as sklearn's f1_score(average="macro"): a label
            # absent from this set would add an F1 of 0 and cap the score below 1 however good the model
            metrics["macro_f1"] = float(np.mean([_f1(((pred == c) & (true == c)).sum(), ((pred == c) & (true != c)).sum(),
                                                     ((pred != c) & (true == c)).sum()) for c in np.union1d(pred, true)]))
        elif kind == "multi_label_classification":
            pred, true = np.stack(pred), np.stack(true).astype(np.int64)
            metrics["micro_f1"] = float(_f1(((pred == 1) & (true == 1)).sum(), ((pred == 1) & (true == 0)).sum(),
                                            ((pred == 0) & (true == 1)).sum()))
            metrics["exact_match"] = float((pred == true).all(axis=1).mean())
        elif kind == "regression":
            pred, true = np.stack(pred).reshape(len(ids), -1), np.stack(true).reshape(len(ids), -1)
            metrics["pearson"] = float(np.mean([_pearson(pred[:, c], true[:, c]) for c in range(pred.shape[1])]))
            metrics["spearman"] = float(np.mean([_pearson(_ranks(pred[:, c]), _ranks(true[:, c]))
                                                 for c in range(pred.shape[1])]))
        else:
            flat_p, flat_t = np.concatenate(pred), np.concatenate(true)
            metrics["accuracy"] = float((flat_p == flat_t).mean())
            names = [str(id2label[i]) for i in sorted(id2label)]
            if all(n == "O" or n[:2] in ("B-", "I-", "E-", "S-") for n in names):
                metrics["entity_f1"] = entity_f1([[names[t] for t in x] for x in true],
                                                 [[names[p] for p in x] for x in pred])
    if teacher_predictions is not None:
        shared = sorted(set(predictions) & set(teacher_predictions))
        s = [decide(kind, predictions[i]) for i in shared]
        t = [decide(kind, teacher_predictions[i]) for i in shared]
        if kind == "regression":
            metrics["agreement"] = _pearson(np.concatenate(s).ravel(), np.concatenate(t).ravel()) if shared else 0.0
        else:
            s = np.concatenate([np.ravel(x) for x in s]) if shared else np.zeros(0)
            t = np.concatenate([np.ravel(x) for x in t]) if shared else np.zeros(0)
            metrics["agreement"] = float((s == t).mean()) if len(s) else 0.0
    return metrics


def check_metrics(kind, id2label):
    """Fail before training, not at the first evaluation, when a metric's package is missing."""
    names = [str(id2label[i]) for i in sorted(id2label)]
    if kind == "token_classification" and all(n == "O" or n[:2] in ("B-", "I-", "E-", "S-") for n in names):
        entity_f1([["B-X"]], [["B-X"]])  # one entity: seqeval warns that the F1 of none is undefined


def entity_f1(true_tags, predicted_tags):
    """Entity-level F1 of IOB-tagged sentences (lists of tag names), by seqeval (pip install seqeval)."""
    try:
        from seqeval.metrics import f1_score
    except ImportError:
        raise DataError("entity-level F1 of token classification needs seqeval: pip install seqeval") from None
    return float(f1_score(true_tags, predicted_tags))


def label_order(kind, predictions, labels, n_labels, min_labels=20):
    """Whether labels given as ids look numbered in another order than the teacher's: the teacher's
    decisions ({id: logits}) agree with the labels ({id: label ids}) far below chance, while one
    permutation of the ids makes them agree on most. Returns None, or (agreement, chance, the
    permutation as {data id: teacher id}, the agreement under it). Single-label and token
    classification only; needs at least `min_labels` labels (words, for tokens)."""
    if kind not in ("single_label_classification", "token_classification"):
        return None
    ids = [i for i in sorted(labels) if i in predictions]
    if not ids:
        return None
    true = np.concatenate([np.ravel(labels[i]) for i in ids]).astype(np.int64)
    pred = np.concatenate([np.ravel(np.asarray(predictions[i]).argmax(-1)) for i in ids]).astype(np.int64)
    if len(true) < min_labels:
        return None
    counts = np.zeros((n_labels, n_labels))  # counts[data id, teacher's decision]
    np.add.at(counts, (true, pred), 1)
    total = counts.sum()
    agreement = np.trace(counts) / total
    chance = float((counts.sum(1) / total) @ (counts.sum(0) / total))
    if n_labels <= 8:  # every permutation (8! = 40320 sums)
        import itertools
        best = max(itertools.permutations(range(n_labels)), key=lambda p: counts[range(n_labels), p].sum())
    else:  # greedy: the largest remaining cell first
        best, free_rows, free_cols, work = [None] * n_labels, set(range(n_labels)), set(range(n_labels)), counts.copy()
        while free_rows:
            d, t = np.unravel_index(np.argmax(work), work.shape)
            best[d] = t
            free_rows.discard(d), free_cols.discard(t)
            work[d, :], work[:, t] = -1, -1
        best = tuple(int(t) for t in best)
    permuted = counts[range(n_labels), best].sum() / total
    if agreement < chance / 2 and permuted >= 0.5 and permuted >= agreement + 0.3 and best != tuple(range(n_labels)):
        return float(agreement), chance, {d: int(t) for d, t in enumerate(best)}, float(permuted)
    return None


def label_order_sample(model, examples, path, pad_id, device, autocast, batch_size, limit=512):
    """label_order_warning for the first `limit` labelled examples of a file whose labels were given as
    bare ids, from `model`'s (the teacher's) predictions: one forward over a few hundred records, once
    before training. None when the labels had names, or nothing looks wrong."""
    if not examples.meta.get("labels_as_ids") or examples.kind not in ("single_label_classification",
                                                                      "token_classification"):
        return None
    labels = gold(examples)
    ids = np.array(sorted(labels)[:limit], dtype=np.int64)
    batches = (task_batch(examples, ids[i:i + batch_size], pad_id) for i in range(0, len(ids), batch_size))
    predictions = predict(model, batches, device, autocast)
    return label_order_warning(examples.kind, predictions, {int(i): labels[int(i)] for i in ids},
                               {int(i): str(n) for i, n in model.config.id2label.items()}, path)


def label_order_warnings(teacher, inputs, args, teacher_predictions, device, autocast):
    """train.py's check of labels given as bare ids, before the loop: the teacher's predictions on a
    sample of the training records (label_order_sample) and on --valid (`teacher_predictions`, from
    its evaluation; None without --valid). Returns the warning lines, none when nothing looks wrong."""
    warnings = [label_order_sample(teacher, inputs.train_data, args.train, inputs.tokenizer.pad_token_id, device,
                                   autocast, args.batch_size)]
    if teacher_predictions is not None and inputs.valid_data.meta.get("labels_as_ids"):
        warnings.append(label_order_warning(inputs.valid_data.kind, teacher_predictions, gold(inputs.valid_data),
                                            teacher.config.id2label, args.valid))
    return [w for w in warnings if w]


def label_order_warning(kind, predictions, labels, id2label, path):
    """label_order's finding as one line naming the --label-map that applies the permutation, or None."""
    found = label_order(kind, predictions, labels, len(id2label))
    if found is None:
        return None
    agreement, chance, permutation, permuted = found
    spec = ",".join(f"{d}:{t}" for d, t in permutation.items())
    return (f"warning: {path}: the teacher agrees with {100 * agreement:.0f}% of the labels (chance: "
            f"{100 * chance:.0f}%) but with {100 * permuted:.0f}% once the data's ids are read as --label-map "
            f"{spec}: the data likely numbers its labels in another order than the teacher's "
            f"({', '.join(f'{i} {n}' for i, n in list(id2label.items())[:6])}); if so, rerun with --label-map {spec}")


# ---------------------------------------------------------------------------------------------
# During training: every rank scores its share of the held-out set, and the shares are gathered
# ---------------------------------------------------------------------------------------------

def evaluate_masked_lm(model, valid_data, tokenizer, batch_size, device, autocast, rank=0, world_size=1):
    """{"ppl": the held-out masked-LM perplexity}, over every rank's share (all_reduce when distributed)."""
    sums = masked_lm_sums(model, valid_batches(valid_data, tokenizer, batch_size, rank, world_size), device, autocast)
    if world_size > 1:
        torch.distributed.all_reduce(sums)
    return {"ppl": perplexity(*sums[:2].tolist())}


def evaluate_task_model(model, valid_data, id2label, pad_id, batch_size, device, autocast, rank=0, world_size=1,
                        teacher_predictions=None):
    """(task_metrics' scores, {example id: logits}) over every rank's share, gathered on every rank;
    with the teacher's predictions, the agreement with them. `id2label`: the student's labels."""
    shard = predict(model, valid_task_batches(valid_data, pad_id, batch_size, rank, world_size), device, autocast)
    shards = [shard]
    if world_size > 1:
        shards = [None] * world_size
        torch.distributed.all_gather_object(shards, shard)
    predictions = {i: p for shard in shards for i, p in shard.items()}
    return task_metrics(valid_data.kind, predictions, gold(valid_data), id2label, teacher_predictions), predictions


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


def run_defaults(args):
    """Fill what the command line left out with the training run's own settings (STUDENT/run.json,
    train.py's record): the held-out set, the columns, the label map, the sequence length and the
    teacher. The teacher is taken where it is a folder on this machine (a task's is optional: a hub
    name is not fetched unasked) or where one is required (a masked LM); a line on stderr says which."""
    run = read_run_json(args.student) if args.student else {}
    for name in ("valid", "text_column", "text_pair_column", "label_column", "label_map", "cache_dir"):
        if getattr(args, name) is None and run.get(name):
            setattr(args, name, run[name])
    if args.seq_len is None:
        args.seq_len = run.get("seq_len_used") or run.get("seq_len") or 128
    args.run_teacher = run.get("teacher")
    if args.valid is None:
        raise StudentError(f"{args.student or '--layers'}: pass --valid with held-out data (no run.json there names "
                           "the run's)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", nargs="?", help="folder of a distilled student (train.py's --out)")
    p.add_argument("--layers", help="sentence-embedding teachers: score the teacher's layers, untrained (e.g. 0,2,5), "
                   "instead of a STUDENT folder")
    p.add_argument("--teacher", help="the teacher it was distilled from (hub name or folder); default: the run's "
                   "(STUDENT/run.json) where it is a folder here, or for a masked LM; optional for a task")
    p.add_argument("--valid", help="held-out corpus (.txt, .csv or .jsonl), or labelled data (default: the run's "
                   "--valid, from STUDENT/run.json)")
    p.add_argument("--text-column", help="default: text (token classification: tokens)")
    p.add_argument("--text-pair-column", help="tasks on text pairs: the second text's column (default: the "
                   "training run's, from STUDENT/run.json)")
    p.add_argument("--label-column", help="tasks: default label (token classification: ner_tags)")
    p.add_argument("--label-map", help="tasks: the data's labels as the model's, DATA:TEACHER pairs, as train.py's "
                   "(default: the run's)")
    p.add_argument("--seq-len", type=int, help="default: the run's, else 128")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache-dir", default=None, help="token cache folder (default: ~/.cache/bert-distil)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    run_defaults(args)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = autocast_for(device, DTYPES[args.dtype])
    if is_sentence_folder(args.student) and not args.teacher and is_sentence_folder(args.run_teacher):
        args.teacher = args.run_teacher
        print(f"teacher: {args.teacher} (from {os.path.join(args.student, 'run.json')})", file=sys.stderr)
    if is_sentence_folder(args.teacher) or is_sentence_folder(args.student):  # sentence embeddings (embeddings.py)
        return evaluate_folder(args, device, autocast)
    if not args.student:
        raise StudentError("pass STUDENT: the folder of a distilled student")
    student = load_teacher(args.student).to(device)
    kind = task_kind(student.config)
    if kind is not None:
        return evaluate_task(args, student, kind, device, autocast)
    if not args.teacher and args.run_teacher:
        args.teacher = args.run_teacher
        print(f"teacher: {args.teacher} (from {os.path.join(args.student, 'run.json')})", file=sys.stderr)
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

    if not args.teacher and args.run_teacher and os.path.isdir(args.run_teacher):
        args.teacher = args.run_teacher
        print(f"teacher: {args.teacher} (from {os.path.join(args.student, 'run.json')}; --teacher picks another)",
              file=sys.stderr)
    teacher = load_teacher(args.teacher).to(device) if args.teacher else None
    if teacher is not None and task_kind(teacher.config) != kind:
        raise StudentError(f"--teacher {args.teacher} is not a {kind} model as {args.student} is")
    tokenizer = load_tokenizer(student, args.student, masked_lm=False, words=kind == "token_classification")
    token = kind == "token_classification"
    id2label = student.config.id2label
    check_metrics(kind, id2label)
    examples = load_examples(args.valid, tokenizer, kind, id2label, min(args.seq_len, usable_positions(student)),
                             args.cache_dir or default_cache_dir(), args.text_column or ("tokens" if token else "text"),
                             args.label_column or ("ner_tags" if token else "label"), args.text_pair_column,
                             parse_label_map(args.label_map, id2label))
    check_labelled(examples, args.valid, "--valid")
    print(examples_note(examples, args.valid), file=sys.stderr)
    batches = lambda: valid_task_batches(examples, tokenizer.pad_token_id, args.batch_size)
    labels = gold(examples)
    teacher_predictions = predict(teacher, batches(), device, autocast) if teacher is not None else None
    if teacher is not None and examples.meta.get("labels_as_ids"):
        warning = label_order_warning(kind, teacher_predictions, labels, teacher.config.id2label, args.valid)
        if warning:
            print(warning, file=sys.stderr)
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
    # a teacher column only when there is a teacher to fill it
    row = (lambda name, t, s: f"| {name} | {t} | {s} |") if teacher is not None else (lambda name, t, s: f"| {name} | {s} |")
    print("| | teacher | student |\n|---|---|---|" if teacher is not None else "| | student |\n|---|---|")
    for k in (k for k in scores if k != "examples"):
        print(row(k.replace("_", " "), format_score(kind, result["teacher"][k]) if teacher is not None and
                  k in result["teacher"] else "", format_score(kind, scores[k])))
    shape = f"{batch['input_ids'].shape[0]}x{batch['input_ids'].shape[1]} tokens ({device}, {args.dtype})"
    print(row("parameters", f"{result.get('teacher_params', 0) / 1e6:.1f}M", f"{result['student_params'] / 1e6:.1f}M"))
    print(row(f"forward, {shape}", f"{result.get('teacher_ms', float('nan')):.1f} ms", f"{result['student_ms']:.1f} ms"))
    print(f"({scores['examples']} labelled examples; scores in %, correlations as they are)")
    return result


if __name__ == "__main__":
    try:
        main()
    except (StudentError, DataError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted; heldout.py writes nothing, so nothing was lost")
