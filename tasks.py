"""Task distillation: labelled records in, batches out, and the task's distillation step.

A task is what a fine-tuned teacher predicts (KINDS): one label per text or text pair
(single_label_classification), any number of labels per text (multi_label_classification), one or
more numbers per text (regression), or one label per word (token_classification). The task and its
label names come from the teacher's class and config (pretrained.task_kind, config.id2label); for
fine-tuning without a task teacher (--task), from the training data.

The pipeline, top to bottom:
1. `load_examples` reads a .csv, .jsonl or dataset (token_cache.read_records), maps each label to
   its id, tokenizes once (text pairs as the tokenizer frames them; word lists with each word's
   label on its first sub-token, as transformers' token-classification example does) and caches the
   result as numpy arrays, keyed on the file, the tokenizer and every reading option. A record
   without a label is kept: the teacher's soft targets teach on it.
2. `TaskBatches` serves micro-batch m of the run as a pure function of m (epoch order from
   data.epoch_batches), padded to its longest sequence, with `task_rows`' host indices.
3. `task_step`: the losses of one micro-batch, KD on the task's logits plus the hard-label loss
   (DistilBERT (D)'s recipe), and the layer losses shared with the masked-LM step (distil.py).

A task run end to end, file by file: pretrained.task_kind reads the task from the teacher's config;
flags.RECIPES["task"] gives its defaults (KD 0.5 + labels 0.5, AdamW 5e-5); run_inputs.load_data
calls load_examples; train.pick_run puts task_step, count_task_rows and TaskBatches into the loop;
heldout.evaluate_task_model and heldout.task_metrics score it (accuracy, F1, correlations, entity
F1, agreement with the teacher); modelcard.task_model_card describes the saved student.
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
from distil import at_rows, layer_terms, prepare_layer_losses, prepared_mask, unwrap, weighted
from losses import binary_cross_entropy_loss, cross_entropy_loss, kd_loss, mse_loss, multi_label_kd_loss, regression_loss

# KINDS: what the task head predicts, as transformers' problem_type names it, and token classification.
KINDS = ("single_label_classification", "multi_label_classification", "regression", "token_classification")
CACHE_VERSION = 1


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

def task_rows(attention_mask, labels, kind, word_mask=None):
    """Where a task's losses read, decided on the host from numpy arrays in transformers' layouts:

        labels: (B,) int64, -100 = no label         single_label_classification
                (B, C) or (B,) float, NaN = no label multi_label_classification (1.0/0.0), regression
                (B, L) int64, -100 = no label        token_classification
        word_mask: (B, L) bool, token_classification only: the positions predicted (each word's
                   first sub-token), labelled or not; default: where labels != -100

    Returns numpy int64 indices: real_rows (flat into B * L, the layer losses), kd_rows (the
    teacher's soft targets: every sequence, or every predicted token, flat), label_rows (those
    with a label) and row_labels (the labels there: int64, or float32 (n, C)), and `padded`.
    """
    attention_mask = np.asarray(attention_mask)
    real = np.flatnonzero(attention_mask.reshape(-1))
    rows = {"real_rows": real, "padded": len(real) < attention_mask.size}
    labels = np.asarray(labels)
    if kind == "token_classification":
        word_mask = labels != -100 if word_mask is None else np.asarray(word_mask, dtype=bool)
        flat = labels.reshape(-1)
        labelled = np.flatnonzero(flat != -100)
        return {**rows, "kd_rows": np.flatnonzero(word_mask.reshape(-1)), "label_rows": labelled,
                "row_labels": flat[labelled].astype(np.int64)}
    rows["kd_rows"] = np.arange(len(labels), dtype=np.int64)
    if kind == "single_label_classification":
        labelled = np.flatnonzero(labels != -100)
        return {**rows, "label_rows": labelled, "row_labels": labels[labelled].astype(np.int64)}
    values = labels.reshape(len(labels), -1).astype(np.float32)
    labelled = np.flatnonzero(~np.isnan(values).any(axis=1))
    return {**rows, "label_rows": labelled, "row_labels": values[labelled]}


def task_batch(examples, indices, pad_id):
    """Examples `indices` as a batch of numpy arrays, padded to the longest: input_ids,
    attention_mask (and token_type_ids for text pairs), the labels in transformers' layout, and
    task_rows' indices, computed here on the host so that the step never looks for them."""
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
# 4. The task step
# ---------------------------------------------------------------------------------------------

def count_task_rows(batch, cfg):
    """How many rows each task loss reads in `batch` (host ints): the denominators' parts."""
    return {"kd": len(batch["kd_rows"]), "label": len(batch["label_rows"]), "cos": len(batch["real_rows"])}


def task_step(student, teacher, batch, cfg, kind, denominators=None):
    """Losses of one (micro-)batch of a task. Returns (weighted total, {term name: detached value}).

        loss = alpha_kd * KD + alpha_label * LABEL + alpha_mse * MSE + the layer losses (layer_terms)

    KD: the teacher's softened predictions, one row per sequence (per predicted word for token
    classification): kd_loss (T^2 KL) for single-label and token classification, multi_label_kd_loss
    for multi-label, regression_loss to the teacher's prediction for regression. LABEL: the gold
    labels where a row has one: cross-entropy, binary cross-entropy (multi-label) or squared error
    (regression). Rows without a label still learn from the teacher (KD). MSE: squared error of the
    logits (alpha_mse). `kind` is one of KINDS; student and teacher are models of that task (the
    teacher may be None when no loss reads it). `batch` holds input_ids and attention_mask (B, L)
    (and token_type_ids for text pairs, when the model has them) and task_rows' index tensors, on
    the models' device; `denominators` maps "kd", "label", "cos" to row counts (None: this batch's).
    """
    denominators = denominators or count_task_rows(batch, cfg)
    attention_mask = batch["attention_mask"] if batch["padded"] else None
    real_rows = batch["real_rows"] if batch["padded"] else None
    inputs = {"input_ids": batch["input_ids"], "output_hidden_states": cfg.needs_hidden_states()}
    if "token_type_ids" in batch:  # the segment of each token of a text pair (BERT-style models)
        inputs["token_type_ids"] = batch["token_type_ids"]
    prepare_layer_losses(student, teacher, cfg)
    # token classification's logits are (B, L, C): the rows are the predicted tokens' flat positions
    at = at_rows if kind == "token_classification" else (lambda logits, rows: logits.index_select(0, rows))
    teacher_out = None
    if cfg.needs_teacher():
        with torch.no_grad():
            teacher_out = teacher(**inputs, attention_mask=prepared_mask(teacher, attention_mask))
    student_out = student(**inputs, attention_mask=prepared_mask(student, attention_mask))
    student_logits = student_out.logits
    terms = {}
    if cfg.needs_teacher_logits():
        s, t = at(student_logits, batch["kd_rows"]), at(teacher_out.logits, batch["kd_rows"])
        if cfg.alpha_kd > 0:
            if kind == "regression":
                terms["kd"] = regression_loss(s, t, denominators["kd"])
            elif kind == "multi_label_classification":
                terms["kd"] = multi_label_kd_loss(s, t, cfg.temperature, denominators["kd"])
            else:
                terms["kd"] = kd_loss(s, t, cfg.temperature, denominators["kd"])
        if cfg.alpha_mse > 0:
            terms["mse"] = mse_loss(s, t, denominators["kd"])
    if cfg.alpha_label > 0:
        s, y = at(student_logits, batch["label_rows"]), batch["row_labels"]
        if kind == "regression":
            terms["label"] = regression_loss(s, y, denominators["label"])
        elif kind == "multi_label_classification":
            terms["label"] = binary_cross_entropy_loss(s, y, denominators["label"])
        else:
            terms["label"] = cross_entropy_loss(s, y, denominators["label"])
    teacher_hidden = teacher_out.hidden_states if teacher_out is not None else None
    terms.update(layer_terms(student, teacher, student_out.hidden_states, teacher_hidden, attention_mask,
                             real_rows, denominators["cos"], cfg))
    return weighted(terms, cfg)


def task_probe_batch(student, kind, length=8):
    """A short batch of one sequence, every token predicted and labelled, on the student's device:
    what a task step reads everywhere (distil.freeze_unreached's probe)."""
    device = next(student.parameters()).device
    input_ids = (torch.arange(length, device=device) % unwrap(student).get_input_embeddings().num_embeddings)[None]
    n_labels = unwrap(student).config.num_labels
    labels = {"single_label_classification": np.zeros(1, dtype=np.int64),
              "token_classification": np.zeros((1, length), dtype=np.int64)}.get(kind, np.zeros((1, n_labels)))
    rows = {k: torch.as_tensor(v, device=device) if isinstance(v, np.ndarray) else v
            for k, v in task_rows(np.ones((1, length)), labels, kind).items()}
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **rows}
