"""Task distillation's data and scores: labelled records in, batches out; predictions in, metrics out.

A task is what a fine-tuned teacher predicts (distil.KINDS): one label per text or text pair
(single_label_classification), any number of labels per text (multi_label_classification), one or
more numbers per text (regression), or one label per word (token_classification). The task and its
label names come from the teacher's class and config (student.task_kind, config.id2label); for
fine-tuning without a task teacher (--task), from the training data.

The pipeline, top to bottom:
1. `load_examples` reads a .csv, .jsonl or dataset (data.read_records), maps each label to its
   id, tokenizes once (text pairs as the tokenizer frames them; word lists with each word's label
   on its first sub-token, as transformers' token-classification example does) and caches the
   result as numpy arrays, keyed on the file, the tokenizer and every reading option. A record
   without a label is kept: the teacher's soft targets teach on it.
2. `TaskBatches` serves micro-batch m of the run as a pure function of m (epoch order from
   data.epoch_batches), padded to its longest sequence, with distil.task_rows' host indices.
3. `predict` runs a model over batches; `task_metrics` scores the predictions against the labels
   and, given the teacher's, how often the two agree.
"""

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from data import epoch_batches
from token_cache import DataError, dataset_fingerprint, is_dataset, open_dataset, plain_backend, read_records
from distil import KINDS, task_rows

CACHE_VERSION = 1
PRIMARY = {"single_label_classification": "accuracy", "multi_label_classification": "micro_f1",
           "regression": "pearson", "token_classification": "entity_f1"}  # the score a run is judged by


@dataclass
class Examples:
    """Tokenized labelled records, flat: example i is input_ids[starts[i]:starts[i] + lengths[i]]."""
    kind: str
    input_ids: np.ndarray       # int32, every example's ids, special tokens included
    starts: np.ndarray          # int64 (N,)
    lengths: np.ndarray         # int64 (N,)
    token_type_ids: np.ndarray  # int8, beside input_ids (text pairs), or None
    word_mask: np.ndarray       # bool, beside input_ids: each word's first sub-token (token classification)
    token_labels: np.ndarray    # int64, beside input_ids: the word's label id there, else -100
    labels: np.ndarray          # per example: int64 (-100: none), or float32 (N, C) (NaN: none); token: unused
    meta: dict                  # counts: records, labelled, truncated


# ---------------------------------------------------------------------------------------------
# 1. Labels
# ---------------------------------------------------------------------------------------------

def label_ids(value, where, kind, label2id, path):
    """One record's label as training uses it: an id (-100 when there is none), a float vector
    (NaN when there is none), or for token classification a list of ids. Names are matched to
    label2id first; whole numbers (or their strings, as CSV holds them) are taken as ids."""
    n = len(label2id)

    def one_id(x):
        name = x.strip() if isinstance(x, str) else None if isinstance(x, bool) else str(x)
        if name in label2id:  # a name (also a number used as a name: star ratings "1".."5")
            return label2id[name]
        try:  # an id: 1, "1", or 1.0 (pandas writes an integer column holding NaNs as floats)
            number = float(x) if not isinstance(x, bool) else None
            i = int(number) if number is not None and number.is_integer() else None
        except (TypeError, ValueError):
            i = None
        if i is None or not 0 <= i < n:
            raise DataError(f"{path} {where}: unknown label {x!r}; the labels are {', '.join(label2id)[:200]} "
                            f"(or their ids 0-{n - 1}); fix the record, or train a teacher with these labels")
        return i

    missing = value is None or (isinstance(value, str) and not value.strip())
    if kind == "token_classification":
        if missing:
            return None
        if isinstance(value, str):  # a CSV cell: tags separated by spaces, as the words are
            value = value.split()
        if not isinstance(value, (list, tuple)):
            raise DataError(f"{path} {where}: token labels must be a list with one tag per word, got {value!r}")
        return [one_id(x) for x in value]
    if kind == "single_label_classification":
        return -100 if missing else one_id(value.strip() if isinstance(value, str) else value)
    if kind == "multi_label_classification":
        if missing:
            return np.full(n, np.nan, dtype=np.float32)
        if isinstance(value, str):  # a CSV cell: names or ids separated by commas or semicolons
            value = [x.strip() for x in value.replace(";", ",").split(",") if x.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        targets = np.zeros(n, dtype=np.float32)
        targets[[one_id(x) for x in value]] = 1.0
        return targets
    # regression: one number per output; none (NaN) when the record has no label, as for multi-label
    if missing:
        return np.full(n, np.nan, dtype=np.float32)
    values = value if isinstance(value, (list, tuple)) else [value]
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float32)
    except (TypeError, ValueError):
        numbers = None
    if numbers is None or len(numbers) != n or not np.isfinite(numbers).all():
        raise DataError(f"{path} {where}: a regression label must be {n} finite number(s), got {value!r}")
    return numbers


def labels_from_data(path, kind, label_column, text_column, names=None):
    """id2label for fine-tuning without a task teacher: `names` (--labels) in that order if given,
    else a dataset's ClassLabel names, else the sorted label values found in the data (whole
    numbers 0..K-1 are ids, named LABEL_i as transformers names them); regression: one output per
    name of `names`, else one."""
    if names:  # before regression's default: --labels names a multi-output regression's outputs
        return dict(enumerate(names))
    if kind == "regression":
        return {0: "score"}
    if is_dataset(path):
        feature = open_dataset(path).features.get(label_column)
        feature = getattr(feature, "feature", feature)  # a Sequence of ClassLabel (token tags, multi-label)
        if hasattr(feature, "names"):
            return dict(enumerate(feature.names))
    found = set()
    for _, record in read_records(path, [text_column, label_column]):
        value = record.get(label_column)
        if isinstance(value, str):  # as label_ids reads a cell: stripped; words or tags split
            value = value.strip()
            if kind == "multi_label_classification":
                value = [x.strip() for x in value.replace(";", ",").split(",") if x.strip()]
            elif kind == "token_classification":
                value = value.split()
        if value is None or value == "":
            continue
        found.update(str(v).strip() for v in (value if isinstance(value, (list, tuple)) else [value]))
    found.discard("")
    if not found:
        raise DataError(f"{path}: no labels in column '{label_column}'; pass --label-column with the labels' column")
    numbers = sorted(int(v) for v in found if v.isdigit())
    if len(numbers) == len(found) and numbers[0] == 0:  # ids from 0, unnamed: LABEL_0 .. LABEL_max
        return {i: f"LABEL_{i}" for i in range(numbers[-1] + 1)}
    # names, sorted (numbers used as names, such as star ratings 1-5, in numeric order)
    return dict(enumerate(sorted(found, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))))


# ---------------------------------------------------------------------------------------------
# 2. Tokenizing once, into a cache
# ---------------------------------------------------------------------------------------------

def _cache_key(path, tokenizer, options):
    h = hashlib.sha256()
    if is_dataset(path):
        h.update(dataset_fingerprint(path).encode())
    else:
        stat = os.stat(path)
        with open(path, "rb") as f:
            h.update(f.read())  # labelled sets are small: hash the whole file
        h.update(json.dumps([os.path.abspath(path), stat.st_size]).encode())
    h.update(json.dumps([CACHE_VERSION, options]).encode())
    h.update(plain_backend(tokenizer).to_str().encode())
    return h.hexdigest()[:20]


def load_examples(path, tokenizer, kind, id2label, seq_len, cache_dir, text_column, label_column,
                  pair_column=None):
    """The labelled records of `path`, tokenized (from the cache when it is there). See Examples.

    Text is truncated to seq_len tokens, special tokens included (text pairs: the longer of the two
    first); how many records were cut is counted in meta["truncated"]. Records whose text is empty
    are skipped and counted. Under torchrun, every rank calls this before the process group
    starts: the first builds the cache while the others wait on its lock.
    """
    assert kind in KINDS, kind
    options = dict(kind=kind, labels=[id2label[i] for i in sorted(id2label)], seq_len=seq_len, text=text_column,
                   label=label_column, pair=pair_column)
    os.makedirs(cache_dir, exist_ok=True)
    key = os.path.join(cache_dir, f"{os.path.basename(path.rstrip('/'))}.task.{_cache_key(path, tokenizer, options)}")
    with open(key + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(key + ".npz"):
            arrays = _tokenize(path, tokenizer, kind, id2label, seq_len, text_column, label_column, pair_column)
            with open(key + ".tmp.npz", "wb") as f:
                np.savez(f, **arrays)
            os.replace(key + ".tmp.npz", key + ".npz")  # complete or absent, never half-written
    z = np.load(key + ".npz")
    meta = json.loads(str(z["meta"]))
    get = lambda name: z[name] if z[name].size or name in ("input_ids", "labels") else None
    return Examples(kind, z["input_ids"], z["starts"], z["lengths"], get("token_type_ids"), get("word_mask"),
                    get("token_labels"), z["labels"], meta)


def _tokenize(path, tokenizer, kind, id2label, seq_len, text_column, label_column, pair_column):
    label2id = {name: i for i, name in id2label.items()}
    columns = [text_column, label_column] + ([pair_column] if pair_column else [])
    flags = ["--text-column", "--label-column", "--text-pair-column"]
    texts, pairs, labels, skipped = [], [], [], 0
    for where, record in read_records(path, columns, flags[:len(columns)]):
        text = record.get(text_column)
        if kind == "token_classification":
            if isinstance(text, str):  # a CSV cell or a string: words separated by spaces
                text = text.split()
            if not isinstance(text, (list, tuple)) or not all(isinstance(w, str) for w in text):
                raise DataError(f"{path} {where}: '{text_column}' must be a list of words (the layout of the "
                                f"CoNLL datasets: tokens and ner_tags), got {str(text)[:60]!r}")
            tags = label_ids(record.get(label_column), where, kind, label2id, path)
            if tags is not None and len(tags) != len(text):
                raise DataError(f"{path} {where}: {len(text)} words but {len(tags)} tags in '{label_column}'; "
                                "give one tag per word")
            if not text:
                skipped += 1
                continue
            texts.append(list(text))
            labels.append(tags)
            continue
        if not isinstance(text, str) or not text.strip():
            if text is not None and not isinstance(text, str):
                raise DataError(f"{path} {where}: '{text_column}' holds {type(text).__name__}, not text")
            skipped += 1
            continue
        texts.append(text.strip())
        if pair_column:
            pair = record.get(pair_column)
            pairs.append(pair.strip() if isinstance(pair, str) else "")
        labels.append(label_ids(record.get(label_column), where, kind, label2id, path))
    if not texts:
        raise DataError(f"{path} holds no text in '{text_column}' ({skipped} empty records)")

    encode = lambda **kw: tokenizer(texts, pairs or None, is_split_into_words=kind == "token_classification",
                                    return_token_type_ids=bool(pair_column), **kw)
    full_lengths = [len(x) for x in encode(truncation=False)["input_ids"]]
    enc = encode(truncation=True, max_length=seq_len)
    lengths = np.array([len(x) for x in enc["input_ids"]], dtype=np.int64)
    arrays = {"input_ids": np.concatenate([np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]),
              "starts": np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64), "lengths": lengths,
              "token_type_ids": np.zeros(0, dtype=np.int8), "word_mask": np.zeros(0, dtype=bool),
              "token_labels": np.zeros(0, dtype=np.int64)}
    if pair_column and "token_type_ids" in enc:
        arrays["token_type_ids"] = np.concatenate([np.asarray(x, dtype=np.int8) for x in enc["token_type_ids"]])
    n_labelled = sum(1 for x in labels if x is not None and not (np.isscalar(x) and x == -100)
                     and not (isinstance(x, np.ndarray) and np.isnan(x).any()))
    if kind == "token_classification":
        word_mask, token_labels, words_cut = [], [], 0
        for i, tags in enumerate(labels):
            word_ids = enc.word_ids(i)
            first = [w is not None and (j == 0 or word_ids[j - 1] != w) for j, w in enumerate(word_ids)]
            word_mask.append(np.array(first, dtype=bool))
            token_labels.append(np.array([tags[w] if f and tags is not None else -100
                                          for f, w in zip(first, word_ids)], dtype=np.int64))
            words_cut += len(texts[i]) - sum(first)
        arrays.update(word_mask=np.concatenate(word_mask), token_labels=np.concatenate(token_labels),
                      labels=np.zeros(0, dtype=np.int64))
    elif kind == "single_label_classification":
        arrays["labels"] = np.array(labels, dtype=np.int64)
    else:
        arrays["labels"] = np.stack(labels).astype(np.float32)
    meta = {"records": len(texts), "labelled": n_labelled, "skipped": skipped,
            "truncated": int(sum(n > seq_len for n in full_lengths)), "seq_len": seq_len}
    if kind == "token_classification":
        meta["words_lost"] = int(words_cut)  # words past the truncation (or with no sub-token) carry no label
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def examples_digest(examples):
    """sha256 of the tokenized examples and their labels: what a resumed run must train on again."""
    h = hashlib.sha256()
    for array in (examples.input_ids, examples.lengths, examples.labels, examples.token_labels, examples.token_type_ids):
        if array is not None:
            h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def examples_note(examples, path):
    """One line on what reading `path` found: records, unlabelled ones, truncation."""
    m = examples.meta
    parts = [f"{path}: {m['records']} records, {m['labelled']} labelled"]
    if m["records"] > m["labelled"]:
        parts.append(f"{m['records'] - m['labelled']} without a label (taught by the teacher only)")
    if m["truncated"]:
        parts.append(f"{m['truncated']} cut to --seq-len {m['seq_len']}")
    if m.get("words_lost"):
        parts.append(f"{m['words_lost']} words past the cut carry no prediction")
    if m["skipped"]:
        parts.append(f"{m['skipped']} empty records skipped")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# 3. Batches
# ---------------------------------------------------------------------------------------------

def task_batch(examples, indices, pad_id):
    """Examples `indices` as a batch of numpy arrays, padded to the longest: input_ids,
    attention_mask (and token_type_ids for text pairs), the labels in transformers' layout, and
    distil.task_rows' indices, computed here on the host so that the step never looks for them."""
    lengths = examples.lengths[indices]
    shape = (len(indices), int(lengths.max()))
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    attention_mask = np.zeros(shape, dtype=np.int64)
    token_type_ids = np.zeros(shape, dtype=np.int64) if examples.token_type_ids is not None else None
    word_mask = np.zeros(shape, dtype=bool)
    token_labels = np.full(shape, -100, dtype=np.int64)
    for row, (i, n) in enumerate(zip(indices, lengths)):
        span = slice(examples.starts[i], examples.starts[i] + n)
        input_ids[row, :n] = examples.input_ids[span]
        attention_mask[row, :n] = 1
        if token_type_ids is not None:
            token_type_ids[row, :n] = examples.token_type_ids[span]
        if examples.kind == "token_classification":
            word_mask[row, :n] = examples.word_mask[span]
            token_labels[row, :n] = examples.token_labels[span]
    if examples.kind == "token_classification":
        labels = token_labels
    else:
        labels = examples.labels[indices]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "example_ids": np.asarray(indices, dtype=np.int64),
             **task_rows(attention_mask, labels, examples.kind, word_mask)}
    if token_type_ids is not None:
        batch["token_type_ids"] = token_type_ids
    if examples.kind == "token_classification":
        batch["word_mask"] = word_mask
    return batch


class TaskBatches(torch.utils.data.Dataset):
    """Micro-batch number m of one rank's run, counted across epochs: a pure function of m (the
    order of data.epoch_batches, so a resumed run, or the same global batch on other ranks, sees the
    same batches), for micro_batch_loader's DataLoader."""

    def __init__(self, examples, pad_id, batch_size, seed, n_batches, rank=0, world_size=1):
        self.examples, self.pad_id, self.batch_size, self.seed = examples, pad_id, batch_size, seed
        self.n_batches, self.rank, self.world_size = n_batches, rank, world_size
        self._epoch = self._batches = None

    def __getitem__(self, m):
        epoch, i = divmod(m, self.n_batches)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.examples, self.batch_size, self.seed, epoch,
                                                              self.rank, self.world_size)
        return task_batch(self.examples, self._batches[i], self.pad_id)


def valid_task_batches(examples, pad_id, batch_size, rank=0, world_size=1):
    """Every example once, in order; rank r takes batches r, r + world_size, ..."""
    starts = range(0, len(examples.starts), batch_size)
    for b in list(starts)[rank::world_size]:
        yield task_batch(examples, np.arange(b, min(b + batch_size, len(examples.starts))), pad_id)


# ---------------------------------------------------------------------------------------------
# 4. Predictions and scores
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
