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
flags.RECIPES["task"] gives its defaults (KD 0.5 + labels 0.5, AdamW 1e-4); run_inputs.load_data
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

from data import epoch_batches, static_length
from token_cache import DataError, dataset_fingerprint, is_dataset, open_dataset, plain_backend, read_records
from distil import at_rows, layer_terms, pad_rows, prepare_layer_losses, prepared_mask, unwrap, weighted
from losses import binary_cross_entropy_loss, cross_entropy_loss, kd_loss, mse_loss, multi_label_kd_loss, regression_loss
from teacher_cache import as_logits

# KINDS: what the task head predicts, as transformers' problem_type names it, and token classification.
KINDS = ("single_label_classification", "multi_label_classification", "regression", "token_classification")
CACHE_VERSION = 2  # 2: ClassLabel names, --label-map, multi-hot vectors, pairs without a second text


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

def _label_key(value):
    """A label as --label-map and the data spell it, compared as text: stripped, whole numbers without
    a decimal point (1, "1", 1.0 and "1.0" are all "1")."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() and not isinstance(value, bool) else text


def _teacher_id_by_name(name, id2label):
    """The teacher's id of the label named `name`: exactly, else ignoring case when only one label
    matches so; None otherwise."""
    exact = [i for i, n in id2label.items() if str(n) == name]
    folded = [i for i, n in id2label.items() if str(n).casefold() == name.casefold()]
    return (exact or folded)[0] if exact or len(folded) == 1 else None


def _teacher_id(name, id2label):
    """The teacher's id of `name`: by name (_teacher_id_by_name), else a whole number read as an id;
    None when it is neither."""
    by_name = _teacher_id_by_name(name, id2label)
    if by_name is not None:
        return by_name
    key = _label_key(name)
    return int(key) if key.isdigit() and int(key) in id2label else None


def parse_label_map(text, id2label):
    """--label-map "DATA:TEACHER,DATA:TEACHER,..." as {data label (_label_key): teacher id}, or None.

    DATA is a label as the data writes it (an id, or a name; a dataset's ClassLabel name or id); TEACHER
    a name of the teacher's id2label (case ignored) or its id. Every label of the data must be mapped,
    one to one. Raises a one-line DataError for a malformed map."""
    if not text:
        return None
    id2label = {int(i): str(n) for i, n in id2label.items()}
    example = "e.g. 0:2,1:0,2:1 (the data's id 0 is the teacher's 2, ...) or entailment:ENTAILMENT"
    mapping = {}
    for pair in str(text).split(","):
        if not pair.strip():
            continue
        data, sep, target = pair.rpartition(":")
        if not sep or not data.strip() or not target.strip():
            raise DataError(f"--label-map {text}: give DATA:TEACHER pairs separated by commas, {example}")
        teacher_id = _teacher_id(target.strip(), id2label)
        if teacher_id is None:
            raise DataError(f"--label-map {text}: '{target.strip()}' is none of the teacher's labels "
                            f"({', '.join(id2label.values())[:200]}) nor an id 0-{len(id2label) - 1}")
        key = _label_key(data)
        if key in mapping:
            raise DataError(f"--label-map {text}: the data's label '{key}' is mapped twice")
        mapping[key] = teacher_id
    if not mapping:
        raise DataError(f"--label-map {text}: no pairs; {example}")
    targets = sorted(mapping.values())
    twice = next((t for t in targets if targets.count(t) > 1), None)
    if twice is not None:
        raise DataError(f"--label-map {text}: two of the data's labels map to the teacher's '{id2label[twice]}'; "
                        "a label map is one to one")
    return mapping


def _zero_one(x):
    """0 or 1 for the entries of a multi-hot vector (0, 1, 0.0, 1.0, True, False, "0", "1", "1.0"), else None."""
    try:
        number = float(x.strip()) if isinstance(x, str) else float(x)
    except (TypeError, ValueError):
        return None
    return int(number) if number in (0.0, 1.0) else None


def _as_list(value, kind):
    """A label value as a list the way label_ids splits it: a CSV cell of names or ids separated by
    commas or semicolons (multi-label) or spaces (tags), a JSON list as it is, anything else alone."""
    if isinstance(value, str):
        value = value.strip()
        if kind == "token_classification":
            return value.split()
        return [x.strip() for x in value.replace(";", ",").split(",") if x.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def is_multi_hot(values, n_labels):
    """Whether a multi-label file writes its labels as multi-hot vectors ([1, 0, 1]: one 0/1 per label,
    the layout BCEWithLogitsLoss takes) rather than as lists of names or ids ([0, 2]): every non-empty
    label of `values` (the file's raw label values, missing ones left out) has one entry per label,
    each 0 or 1. (Two labels whose every list is [0, 1] or [1, 0] could be either: read as multi-hot,
    and load_examples says so in its note.)"""
    lists = [x for x in (_as_list(v, "multi_label_classification") for v in values) if x]
    return n_labels > 1 and bool(lists) and all(len(x) == n_labels and all(_zero_one(v) is not None for v in x)
                                                for x in lists)


class LabelReader:
    """Reads one file's labels into the teacher's ids (see label_ids), and remembers how it read them,
    so that load_examples can say so in one line.

    - names are matched exactly, else ignoring case when that is unambiguous (glue/mnli writes
      "entailment" where roberta-large-mnli says "ENTAILMENT");
    - whole numbers that are no name are ids, taken as the teacher's ids (nothing can tell otherwise:
      label_order looks for the sign of another order in the teacher's predictions);
    - `class_names`: a dataset's ClassLabel names, in the dataset's id order: the dataset's ids are
      read as those names, then matched to the teacher's by name (never by id alone);
    - `label_map` (parse_label_map): the user's own map from the data's labels to the teacher's ids;
      every label must then be in it;
    - `multi_hot`: multi-label lists are 0/1 vectors, one entry per teacher label, in its order.
    """

    def __init__(self, kind, id2label, path, label_map=None, class_names=None, multi_hot=False):
        self.kind, self.path, self.label_map, self.class_names, self.multi_hot = kind, path, label_map, \
            class_names, multi_hot
        self.id2label = {int(i): str(n) for i, n in id2label.items()}
        self.label2id = {n: i for i, n in self.id2label.items()}
        self.forms = set()  # how labels were given: "name", "id", "mapped"
        self.folded = {}    # names matched only ignoring case: {the data's: the teacher's}

    def one_id(self, x, where):
        n = len(self.id2label)
        if self.class_names is not None and not isinstance(x, (str, bool)) and _label_key(x).isdigit() \
                and int(_label_key(x)) < len(self.class_names):
            raw, x = x, self.class_names[int(_label_key(x))]  # a ClassLabel id: its name is what it means
        else:
            raw = x
        if self.label_map is not None:
            for key in dict.fromkeys((_label_key(x), _label_key(raw))):
                if key in self.label_map:
                    self.forms.add("mapped")
                    return self.label_map[key]
            raise DataError(f"{self.path} {where}: label {raw!r} is not in --label-map; map every label of the data")
        name = x.strip() if isinstance(x, str) else None if isinstance(x, bool) else str(x)
        if name in self.label2id:  # a name (also a number used as a name: star ratings "1".."5")
            self.forms.add("name")
            return self.label2id[name]
        if name is not None and not _label_key(name).lstrip("-").isdigit():
            folded = [i for t, i in self.label2id.items() if t.casefold() == name.casefold()]
            if len(folded) == 1:
                self.forms.add("name")
                self.folded[name] = self.id2label[folded[0]]
                return folded[0]
        try:  # an id: 1, "1", or 1.0 (pandas writes an integer column holding NaNs as floats)
            number = float(x) if not isinstance(x, bool) else None
            i = int(number) if number is not None and number.is_integer() else None
        except (TypeError, ValueError):
            i = None
        if i is None or not 0 <= i < n:
            if isinstance(x, (list, tuple)) and self.kind == "single_label_classification":
                raise DataError(f"{self.path} {where}: the label {str(x)[:60]} is a list, but the teacher predicts one "
                                "label per text (single_label_classification); if it is multi-label, set "
                                '"problem_type": "multi_label_classification" in its config.json')
            raise DataError(f"{self.path} {where}: unknown label {x!r}; the labels are "
                            f"{', '.join(self.label2id)[:200]} (or their ids 0-{n - 1}); fix the record, or train a "
                            "teacher with these labels")
        self.forms.add("id")
        return i

    def __call__(self, value, where):
        n = len(self.id2label)
        missing = value is None or (isinstance(value, str) and not value.strip())
        # datasets' ClassLabel writes -1 for "no label" (GLUE's test splits): the schema says so
        missing = missing or (self.class_names is not None and not isinstance(value, bool) and value == -1)
        if self.kind == "token_classification":
            if missing:
                return None
            if isinstance(value, str):  # a CSV cell: tags separated by spaces, as the words are
                value = value.split()
            if not isinstance(value, (list, tuple)):
                raise DataError(f"{self.path} {where}: token labels must be a list with one tag per word, got {value!r}")
            return [self.one_id(x, where) for x in value]
        if self.kind == "single_label_classification":
            return -100 if missing else self.one_id(value.strip() if isinstance(value, str) else value, where)
        if self.kind == "multi_label_classification":
            if missing:
                return np.full(n, np.nan, dtype=np.float32)
            value = _as_list(value, self.kind)
            if self.multi_hot and value:  # one 0/1 per label, in the teacher's order
                bits = [_zero_one(v) for v in value]
                if len(bits) != n or None in bits:
                    raise DataError(f"{self.path} {where}: {str(value)[:60]} is not a multi-hot vector of {n} 0/1 "
                                    "values, as the file's other labels are; write every label the same way")
                self.forms.add("multi-hot")
                return np.array(bits, dtype=np.float32)
            targets = np.zeros(n, dtype=np.float32)
            targets[[self.one_id(x, where) for x in value]] = 1.0
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
            raise DataError(f"{self.path} {where}: a regression label must be {n} finite number(s), got {value!r}")
        return numbers

    def notes(self):
        """What reading guessed, each as a phrase for examples_note (none when nothing was guessed)."""
        out = []
        if self.folded and self.class_names is None:  # (ClassLabel names: match_class_names' note says it all)
            pairs = ", ".join(f"{a} -> {b}" for a, b in list(self.folded.items())[:4])
            out.append(f"label names matched to the teacher's ignoring case ({pairs})")
        if "multi-hot" in self.forms:
            out.append(f"labels read as multi-hot vectors, one 0/1 per teacher label ({', '.join(self.id2label.values())[:80]})")
        return out


def label_ids(value, where, kind, label2id, path):
    """One record's label as training uses it: an id (-100 when there is none), a float vector
    (NaN when there is none), or for token classification a list of ids. Names are matched to
    label2id first (ignoring case when unambiguous); whole numbers (or their strings, as CSV holds
    them) are taken as ids. LabelReader reads a whole file, with a dataset's ClassLabel names, a
    --label-map or multi-hot vectors."""
    return LabelReader(kind, {i: name for name, i in label2id.items()}, path)(value, where)


def class_label_names(path, label_column):
    """A dataset's ClassLabel names for `label_column` (also inside a Sequence: token tags, multi-label), or None."""
    if not is_dataset(path):
        return None
    feature = open_dataset(path).features.get(label_column)
    feature = getattr(feature, "feature", feature)  # a Sequence of ClassLabel (token tags, multi-label)
    return list(feature.names) if hasattr(feature, "names") else None


def match_class_names(class_names, id2label, path, label_column):
    """How a dataset's ClassLabel ids become the teacher's: (class names to read ids as, a note or None).

    Every ClassLabel name is matched to a teacher name (exactly, else ignoring case). When none can be
    (the teacher's labels are unnamed, LABEL_0 ...), the ids are taken as the teacher's ids and the
    note says so. Names that match partly, or not at all while the teacher's labels have names, are a
    one-line DataError naming them."""
    id2label = {int(i): str(n) for i, n in id2label.items()}
    found = {name: _teacher_id_by_name(str(name).strip(), id2label) for name in class_names}
    found = {name: i for name, i in found.items() if i is not None}
    if len(found) == len(class_names):
        moved = [f"{d} {name} -> {found[name]} {id2label[found[name]]}" for d, name in enumerate(class_names)
                 if found[name] != d]
        note = f"the dataset's ClassLabel ids mapped to the teacher's by name ({', '.join(moved[:4])}" \
               f"{', ...' if len(moved) > 4 else ''})" if moved else None
        return class_names, note
    unnamed = all(n == f"LABEL_{i}" for i, n in id2label.items())
    if not found and unnamed and len(class_names) == len(id2label):
        return None, (f"the teacher's labels have no names (LABEL_0 ...): the dataset's ClassLabel ids are taken as "
                      f"its ids ({', '.join(f'{d} {n}' for d, n in enumerate(class_names[:4]))}"
                      f"{', ...' if len(class_names) > 4 else ''})")
    missing = [name for name in class_names if name not in found]
    raise DataError(f"{path}: the ClassLabel names of '{label_column}' ({', '.join(class_names)[:120]}) are not the "
                    f"teacher's ({', '.join(id2label.values())[:120]}): {', '.join(missing[:4])} match none; pass "
                    "--label-map DATA:TEACHER pairs (names or ids), or a teacher trained on these labels")


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
    if kind == "multi_label_classification":  # multi-hot vectors: as many labels as entries, unnamed
        values = [r.get(label_column) for _, r in read_records(path, [text_column, label_column])]
        lengths = {len(x) for x in (_as_list(v, kind) for v in values if v is not None) if x}
        if len(lengths) == 1 and is_multi_hot([v for v in values if v is not None], max(lengths)):
            return {i: f"LABEL_{i}" for i in range(max(lengths))}
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
                  pair_column=None, label_map=None):
    """The labelled records of `path`, tokenized (from the cache when it is there). See Examples.

    Text is truncated to seq_len tokens, special tokens included (text pairs: the longer of the two
    first); how many records were cut is counted in meta["truncated"]. Records whose text is empty
    (or, for pairs, whose second text is) are skipped and counted. A file without the label column
    is read as unlabelled text (meta["labelled"] is 0: the caller refuses it where labels are
    needed). `label_map`: parse_label_map's {data label: teacher id}. What reading had to guess is in
    meta["notes"] (examples_note prints it). Under torchrun, every rank calls this before the process
    group starts: the first builds the cache while the others wait on its lock.
    """
    assert kind in KINDS, kind
    options = dict(kind=kind, labels=[id2label[i] for i in sorted(id2label)], seq_len=seq_len, text=text_column,
                   label=label_column, pair=pair_column, label_map=sorted((label_map or {}).items()))
    os.makedirs(cache_dir, exist_ok=True)
    key = os.path.join(cache_dir, f"{os.path.basename(path.rstrip('/'))}.task.{_cache_key(path, tokenizer, options)}")
    with open(key + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(key + ".npz"):
            arrays = _tokenize(path, tokenizer, kind, id2label, seq_len, text_column, label_column, pair_column,
                               label_map)
            with open(key + ".tmp.npz", "wb") as f:
                np.savez(f, **arrays)
            os.replace(key + ".tmp.npz", key + ".npz")  # complete or absent, never half-written
    z = np.load(key + ".npz")
    meta = json.loads(str(z["meta"]))
    get = lambda name: z[name] if z[name].size or name in ("input_ids", "labels") else None
    return Examples(kind, z["input_ids"], z["starts"], z["lengths"], get("token_type_ids"), get("word_mask"),
                    get("token_labels"), z["labels"], meta)


def _columns(path):
    """The columns of a .csv (its header) or a dataset; None for a .jsonl, whose records name their own."""
    if is_dataset(path):
        return list(open_dataset(path).column_names)
    if path.lower().endswith(".csv"):
        import csv
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                return next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError, csv.Error):
            return None  # read_records says what is wrong with the file
    return None


def _tokenize(path, tokenizer, kind, id2label, seq_len, text_column, label_column, pair_column, label_map=None):
    columns = _columns(path)
    # no label column at all: unlabelled text (a transfer set), which the teacher alone teaches on
    has_labels = columns is None or label_column in columns
    wanted = [text_column] + ([label_column] if has_labels else []) + ([pair_column] if pair_column else [])
    flags = ["--text-column"] + (["--label-column"] if has_labels else []) + ["--text-pair-column"]
    records = list(read_records(path, wanted, flags[:len(wanted)]))
    notes, found_fields = [], set()
    class_names = class_label_names(path, label_column) if has_labels else None
    if class_names is not None and label_map is None:  # (a --label-map may name the dataset's ids or names)
        class_names, note = match_class_names(class_names, id2label, path, label_column)
        notes += [note] if note else []
    multi_hot = kind == "multi_label_classification" and has_labels and is_multi_hot(
        [r.get(label_column) for _, r in records if r.get(label_column) is not None], len(id2label))
    read_label = LabelReader(kind, id2label, path, label_map, class_names, multi_hot)
    texts, pairs, labels, skipped, no_pair, split_texts = [], [], [], 0, 0, 0
    for where, record in records:
        if len(found_fields) < 50:
            found_fields.update(record)
        text = record.get(text_column)
        if kind == "token_classification":
            if isinstance(text, str):  # a CSV cell or a string: words separated by spaces
                text = text.split()
                split_texts += 1
            if not isinstance(text, (list, tuple)) or not all(isinstance(w, str) for w in text):
                raise DataError(f"{path} {where}: '{text_column}' must be a list of words (the layout of the "
                                f"CoNLL datasets: tokens and ner_tags), got {str(text)[:60]!r}")
            tags = read_label(record.get(label_column), where)
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
        if pair_column:
            # a pair without its second text (field absent, null, empty cell) is no pair: skipped as a record
            # without its first text is, rather than trained on as a pair with an empty second segment
            pair = record.get(pair_column)
            if pair is not None and not isinstance(pair, str):
                raise DataError(f"{path} {where}: '{pair_column}' holds {type(pair).__name__}, not text")
            if pair is None or not pair.strip():
                no_pair += 1
                continue
            pairs.append(pair.strip())
        texts.append(text.strip())
        labels.append(read_label(record.get(label_column), where))
    if not texts:
        raise DataError(f"{path} holds no text in '{text_column}' ({skipped} empty records"
                        f"{f', {no_pair} without a second text in {pair_column!r}' if no_pair else ''})")

    encode = lambda **kw: tokenizer(texts, pairs or None, is_split_into_words=kind == "token_classification",
                                    return_token_type_ids=bool(pair_column), **kw)
    full = encode(truncation=False)
    full_lengths = [len(x) for x in full["input_ids"]]
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
    words_cut = words_empty = 0
    if kind == "token_classification":
        word_mask, token_labels = [], []
        for i, tags in enumerate(labels):
            word_ids = enc.word_ids(i)
            first = [w is not None and (j == 0 or word_ids[j - 1] != w) for j, w in enumerate(word_ids)]
            word_mask.append(np.array(first, dtype=bool))
            token_labels.append(np.array([tags[w] if f and tags is not None else -100
                                          for f, w in zip(first, word_ids)], dtype=np.int64))
            # a word with no token even uncut (empty, a zero-width space, a soft hyphen alone) is not "cut"
            present = {w for w in full.word_ids(i) if w is not None}
            words_empty += len(texts[i]) - len(present)
            words_cut += len(present) - sum(first)
        arrays.update(word_mask=np.concatenate(word_mask), token_labels=np.concatenate(token_labels),
                      labels=np.zeros(0, dtype=np.int64))
    elif kind == "single_label_classification":
        arrays["labels"] = np.array(labels, dtype=np.int64)
    else:
        arrays["labels"] = np.stack(labels).astype(np.float32)
    notes += read_label.notes()
    if split_texts and not path.lower().endswith(".csv"):  # (a CSV cell can only hold them so)
        notes.append(f"the words of {split_texts} records were one string in '{text_column}', split on spaces")
    meta = {"records": len(texts), "labelled": n_labelled, "skipped": skipped, "no_pair": no_pair,
            "truncated": int(sum(n > seq_len for n in full_lengths)), "seq_len": seq_len,
            "label_column": label_column, "has_label_column": has_labels, "pair_column": pair_column,
            "columns": columns if columns is not None else sorted(found_fields),
            # how the labels were given: only as ids (then label_order may look for another order), or not
            "labels_as_ids": read_label.forms == {"id"}, "notes": notes}
    if kind == "token_classification":
        meta["words_lost"] = int(words_cut)  # words past the truncation carry no label
        meta["words_empty"] = int(words_empty)  # words that tokenize to nothing carry none either
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
    """One line on what reading `path` found: records, unlabelled ones, truncation, and what reading
    had to guess (label names matched ignoring case, ClassLabel ids mapped by name, multi-hot vectors)."""
    m = examples.meta
    parts = [f"{path}: {m['records']} records, {m['labelled']} labelled"]
    if m.get("has_label_column") is False:
        parts.append(f"no column '{m['label_column']}': all without a label (taught by the teacher only)")
    elif m["records"] > m["labelled"]:
        parts.append(f"{m['records'] - m['labelled']} without a label (taught by the teacher only)")
    if m["truncated"]:
        parts.append(f"{m['truncated']} cut to --seq-len {m['seq_len']}")
    if m.get("words_lost"):
        parts.append(f"{m['words_lost']} words past the cut carry no prediction")
    if m.get("words_empty"):
        parts.append(f"{m['words_empty']} words that tokenize to nothing (empty, or only invisible characters such as "
                     "a zero-width space) carry no label or prediction")
    if m["skipped"]:
        parts.append(f"{m['skipped']} empty records skipped")
    if m.get("no_pair"):
        parts.append(f"{m['no_pair']} records without a second text in '{m['pair_column']}' skipped")
    parts += m.get("notes", [])
    return "; ".join(parts)


def check_labelled(examples, path, flag, alpha_label=None):
    """Refuse, in one line, a --train file without a single label when the hard-label loss is on, and a
    --valid file without one (there is nothing to score): a misspelt --label-column would otherwise
    train on the teacher alone, or report scores over no example, without a word."""
    m = examples.meta
    if m["labelled"] or (flag == "--train" and not alpha_label):
        return
    where = f"no column '{m['label_column']}'" if m.get("has_label_column") is False else \
        f"no label in '{m['label_column']}' in any record"
    columns = f" (columns: {', '.join(map(str, m.get('columns') or []))[:120]})" if m.get("columns") else ""
    if flag == "--train":
        raise DataError(f"{path} has {where}{columns}; pass --label-column with the labels' column, or --alpha-label 0 "
                        "to distil from the teacher alone on unlabelled text")
    raise DataError(f"{flag} {path} has {where}{columns}: held-out scores need labels; pass --label-column with the "
                    "labels' column")


# ---------------------------------------------------------------------------------------------
# 3. Batches
# ---------------------------------------------------------------------------------------------

def task_rows(attention_mask, labels, kind, word_mask=None, static=False):
    """Where a task's losses read, decided on the host from numpy arrays in transformers' layouts:

        labels: (B,) int64, -100 = no label         single_label_classification
                (B, C) or (B,) float, NaN = no label multi_label_classification (1.0/0.0), regression
                (B, L) int64, -100 = no label        token_classification
        word_mask: (B, L) bool, token_classification only: the positions predicted (each word's
                   first sub-token), labelled or not; default: where labels != -100

    Returns numpy int64 indices: real_rows (flat into B * L, the layer losses), kd_rows (the
    teacher's soft targets: every sequence, or every predicted token, flat), label_rows (those
    with a label) and row_labels (the labels there: int64, or float32 (n, C)), `padded`, and the
    counts n_real, n_kd, n_label (Python ints). `static` (a compiled step): each index padded to
    its largest size (B * L positions, or B sequences) with rows that weigh zero (distil.pad_rows;
    the weights in real_weight, kd_weight, label_weight), so that every batch of a shape has the same.
    """
    rows = _task_rows(attention_mask, labels, kind, word_mask)
    rows.update(n_real=len(rows["real_rows"]), n_kd=len(rows["kd_rows"]), n_label=len(rows["label_rows"]))
    if not static:
        return rows
    positions, n_sequences = np.asarray(attention_mask).size, len(np.asarray(attention_mask))
    rows["real_rows"], rows["real_weight"] = pad_rows(rows["real_rows"], positions)
    size = positions if kind == "token_classification" else n_sequences
    rows["kd_rows"], rows["kd_weight"] = pad_rows(rows["kd_rows"], size)
    rows["label_rows"], rows["label_weight"] = pad_rows(rows["label_rows"], size)
    fill = -100 if rows["row_labels"].dtype == np.int64 else 0.0  # 0.0, not NaN: 0 x NaN is NaN
    widths = [(0, size - rows["n_label"])] + [(0, 0)] * (rows["row_labels"].ndim - 1)  # (n,) or (n, C)
    rows["row_labels"] = np.pad(rows["row_labels"], widths, constant_values=fill)
    return rows


def _task_rows(attention_mask, labels, kind, word_mask):
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


def task_batch(examples, indices, pad_id, teacher_logits=None, max_length=None):
    """Examples `indices` as a batch of numpy arrays, padded to the longest: input_ids,
    attention_mask (and token_type_ids for text pairs), the labels in transformers' layout, and
    task_rows' indices, computed here on the host so that the step never looks for them.
    `teacher_logits` (teacher_cache.TeacherLogits): the batch also holds "teacher_logits", the
    teacher's cached logits at the KD rows (kd_rows, num_labels), gathered here on the host.
    `max_length` (the run's --seq-len, for a compiled step): the length is data.static_length's and
    the row indices task_rows' static ones, so that batches keep few shapes."""
    lengths = examples.lengths[indices]
    longest = int(lengths.max())
    shape = (len(indices), longest if max_length is None else static_length(longest, max_length))
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
             **task_rows(attention_mask, labels, examples.kind, word_mask, static=max_length is not None)}
    if token_type_ids is not None:
        batch["token_type_ids"] = token_type_ids
    if examples.kind == "token_classification":
        batch["word_mask"] = word_mask
    if teacher_logits is not None:
        cached = teacher_logits.at(examples, indices)
        if max_length is not None:  # as kd_rows: padded with rows that weigh zero
            cached = np.pad(cached, [(0, len(batch["kd_rows"]) - len(cached)), (0, 0)])
        batch["teacher_logits"] = cached
    return batch


class TaskBatches(torch.utils.data.Dataset):
    """Micro-batch number m of one rank's run, counted across epochs: a pure function of m (the
    order of data.epoch_batches, so a resumed run, or the same global batch on other ranks, sees the
    same batches), for micro_batch_loader's DataLoader. `teacher_logits` (--teacher-cache): each
    batch carries the teacher's cached logits (task_batch)."""

    def __init__(self, examples, pad_id, batch_size, seed, n_batches, rank=0, world_size=1, teacher_logits=None,
                 max_length=None):
        self.examples, self.pad_id, self.batch_size, self.seed = examples, pad_id, batch_size, seed
        self.max_length = max_length  # static shapes for a compiled step (task_batch)
        self.n_batches, self.rank, self.world_size = n_batches, rank, world_size
        self.teacher_logits = teacher_logits
        self._epoch = self._batches = None

    def __getitem__(self, m):
        epoch, i = divmod(m, self.n_batches)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.examples, self.batch_size, self.seed, epoch,
                                                              self.rank, self.world_size)
        return task_batch(self.examples, self._batches[i], self.pad_id, self.teacher_logits, self.max_length)


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
    count = lambda name: batch.get(f"n_{name}", len(batch[f"{name}_rows"]))
    return {"kd": count("kd"), "label": count("label"), "cos": count("real")}


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
    A batch holding "teacher_logits" (--teacher-cache: the teacher's logits at kd_rows, (rows, C), read
    from teacher_cache) is taught from them, and the teacher is not run.
    """
    denominators = denominators or count_task_rows(batch, cfg)
    attention_mask = batch["attention_mask"] if batch["padded"] else None
    real_rows = batch["real_rows"] if batch["padded"] else None
    # rows of weight 0 pad a compiled step's row indices to fixed sizes (task_rows); None: every row counts
    real_weight = batch.get("real_weight") if batch["padded"] else None
    kd_weight, label_weight = batch.get("kd_weight"), batch.get("label_weight")
    inputs = {"input_ids": batch["input_ids"], "output_hidden_states": cfg.needs_hidden_states()}
    if "token_type_ids" in batch:  # the segment of each token of a text pair (BERT-style models)
        inputs["token_type_ids"] = batch["token_type_ids"]
    prepare_layer_losses(student, teacher, cfg)
    # token classification's logits are (B, L, C): the rows are the predicted tokens' flat positions
    at = at_rows if kind == "token_classification" else (lambda logits, rows: logits.index_select(0, rows))
    teacher_out, cached = None, batch.get("teacher_logits")
    if cfg.needs_teacher() and cached is None:
        with torch.no_grad():
            teacher_out = teacher(**inputs, attention_mask=prepared_mask(teacher, attention_mask))
    student_out = student(**inputs, attention_mask=prepared_mask(student, attention_mask))
    student_logits = student_out.logits
    terms = {}
    if cfg.needs_teacher_logits():
        s = at(student_logits, batch["kd_rows"])
        t = as_logits(cached) if cached is not None else at(teacher_out.logits, batch["kd_rows"])
        if cfg.alpha_kd > 0:
            if kind == "regression":
                terms["kd"] = regression_loss(s, t, denominators["kd"], kd_weight)
            elif kind == "multi_label_classification":
                terms["kd"] = multi_label_kd_loss(s, t, cfg.temperature, denominators["kd"], kd_weight)
            else:
                terms["kd"] = kd_loss(s, t, cfg.temperature, denominators["kd"], kd_weight)
        if cfg.alpha_mse > 0:
            terms["mse"] = mse_loss(s, t, denominators["kd"], kd_weight)
    if cfg.alpha_label > 0:
        s, y = at(student_logits, batch["label_rows"]), batch["row_labels"]
        if kind == "regression":
            terms["label"] = regression_loss(s, y, denominators["label"], label_weight)
        elif kind == "multi_label_classification":
            terms["label"] = binary_cross_entropy_loss(s, y, denominators["label"], label_weight)
        else:  # padded rows have label -100, which cross-entropy skips
            terms["label"] = cross_entropy_loss(s, y, denominators["label"])
    teacher_hidden = teacher_out.hidden_states if teacher_out is not None else None
    terms.update(layer_terms(student, teacher, student_out.hidden_states, teacher_hidden, attention_mask,
                             real_rows, denominators["cos"], cfg, real_weight))
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
