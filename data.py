"""Corpora in, masked batches out: read, tokenize once into a numpy cache, cut into sequences, mask.

The pipeline, top to bottom:
1. `read_documents` yields one document per line of a .txt, per row of a .csv (a text column),
   per line of a .jsonl (a text field) or per row of a Hugging Face dataset (a saved folder or a
   Hub name), and turns bad input into one-line `DataError`s.
2. `load_corpus` tokenizes the documents once, in batches, with the teacher's fast tokenizer and
   caches the ids as a flat numpy array (uint16 where the vocabulary fits), each document followed
   by one separator token. The cache is keyed on the file, the tokenizer and the reading options,
   built by one process while any others wait on a file lock, and memory-mapped on later runs.
3. `make_sequences` cuts the ids into sequences of at most seq_len - 2 tokens (room for the
   tokenizer's own [CLS]/<s> and [SEP]/</s>): packed across documents by default, so no compute
   goes to padding (RoBERTa's FULL-SENTENCES), or one document per sequence with `pack=False`.
4. `epoch_batches` orders, shards and batches the sequences for one rank and one epoch, and
   `mask_tokens` applies BERT's dynamic masking to each batch.

Everything random here is a pure function of (seed, epoch, sequence index): the order of an
epoch, and each sequence's mask. No global RNG, rank or worker enters, so a resumed run, or the
same data on another number of GPUs, sees the same masks.
"""

import copy
import csv
import fcntl
import hashlib
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from distil import batch_rows

CACHE_VERSION = 1


class DataError(ValueError):
    """A corpus that cannot be used: the message names the file and what to do."""


def first_line(error):
    """The first line of an exception's message (its type's name if it has none): what a one-line
    error quotes of a library's multi-line message. (student.py keeps its own copy: it stands alone.)"""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# 1. Reading documents
# ---------------------------------------------------------------------------------------------

def check_corpus_file(path):
    """Fail early, in one line, on a missing, empty, binary or unsupported file (a dataset: when it is opened)."""
    if is_dataset(path):  # opened once, by load_corpus's fingerprint, which says in one line what is wrong
        return
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder; pass one .txt, .csv or .jsonl file (join text files first, e.g. "
                        f"cat {os.path.join(path, '*.txt')} > train.txt) or a folder written by save_to_disk")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file; pass an existing .txt, .csv or .jsonl corpus")
    if os.path.splitext(path)[1].lower() not in (".txt", ".csv", ".jsonl"):
        raise DataError(f"{path}: unsupported corpus type; use .txt (one document per line), "
                        ".csv (a text column) or .jsonl (a text field)")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path} is empty; pass a corpus with text in it")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if b"\x00" in head:
        raise DataError(f"{path} looks binary (it contains NUL bytes); pass a UTF-8 text corpus")


def read_documents(path, text_column="text"):
    """Yield (document text, bytes read so far) from a .txt, .csv or .jsonl corpus (or a dataset)."""
    if is_dataset(path):
        yield from read_dataset_documents(path, text_column)
        return
    check_corpus_file(path)
    kind = os.path.splitext(path)[1].lower()
    line_no = 0
    try:
        # utf-8-sig: drop the byte-order mark that Excel and Notepad write, or it sticks to the first column name
        with open(path, encoding="utf-8-sig", newline="" if kind == ".csv" else None) as f:
            if kind == ".txt":
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        yield line.strip(), len(line)
            elif kind == ".csv":
                csv.field_size_limit(sys.maxsize)
                reader = csv.DictReader(f)
                if not reader.fieldnames or text_column not in reader.fieldnames:
                    columns = ", ".join(reader.fieldnames or []) or "none"
                    raise DataError(f"{path} has no column '{text_column}' (columns: {columns}); "
                                    "pass --text-column with the name of the text column")
                for row in reader:
                    line_no = reader.line_num
                    text = row.get(text_column) or ""
                    if text.strip():
                        yield text.strip(), len(text) + 1
            else:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path} line {line_no} is not valid JSON ({e.msg}); "
                                        "a .jsonl corpus holds one JSON object per line") from None
                    if not isinstance(record, dict) or not isinstance(record.get(text_column), str):
                        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                        raise DataError(f"{path} line {line_no} has no string field '{text_column}' "
                                        f"(found: {keys}); pass --text-column with the name of the text field")
                    if record[text_column].strip():
                        yield record[text_column].strip(), len(line)
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text (line {_first_undecodable_line(path)}); "
                        "convert it first, e.g. iconv -f latin1 -t utf-8") from None
    except csv.Error as e:
        raise DataError(f"{path} line {line_no + 1}: malformed CSV ({e}); fix the quoting or use .jsonl") from None


# Hugging Face datasets (optional: `pip install datasets`): a folder written by save_to_disk, or a
# Hub name NAME[:CONFIG[:SPLIT]] (split "train" by default). They go into the same token cache as
# files, so sharding, masks and resume cannot tell the difference.

def is_dataset(path):
    """A saved dataset folder, or a name that is neither a local path nor a corpus file's name."""
    if os.path.isdir(path):
        return any(os.path.exists(os.path.join(path, name))
                   for name in ("state.json", "dataset_info.json", "dataset_dict.json"))
    return not (os.path.exists(path) or path.startswith((".", "/", "~"))
                or os.path.splitext(path)[1].lower() in (".txt", ".csv", ".jsonl"))


def open_dataset(path):
    """The datasets.Dataset that `path` names, or a one-line DataError."""
    try:
        import datasets
    except ImportError:
        what = "is a saved Hugging Face dataset" if os.path.isdir(path) else \
            "is no file; to read it as a Hugging Face dataset name"
        raise DataError(f"{path} {what}, install the datasets package: pip install datasets") from None
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")):
            splits = json.load(open(os.path.join(path, "dataset_dict.json")))["splits"]
            raise DataError(f"{path} holds the splits {', '.join(splits)}; pass one of them, "
                            f"e.g. {os.path.join(path, splits[0])}")
        return datasets.load_from_disk(path)
    name, config, split = (path.split(":") + ["", ""])[:3]
    try:
        return datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # offline, unknown name, missing config: all say the same thing to the user
        raise DataError(f"{path}: cannot load it as a Hugging Face dataset ({first_line(e)}); offline, run "
                        "load_dataset(...).save_to_disk(FOLDER) where the Hub is reachable and pass the folder, "
                        "or pass a .txt, .csv or .jsonl file") from None


def dataset_fingerprint(path):
    """The names, sizes and modification times of the dataset's arrow files (and a saved
    folder's state.json, which holds the fingerprint datasets computed for its content)."""
    files = [c["filename"] for c in open_dataset(path).cache_files]
    state = os.path.join(path, "state.json")
    return json.dumps([open(state).read() if os.path.isfile(state) else path] +
                      [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files])


def read_dataset_documents(path, text_column="text"):
    """Yield (document text, its length) for each row of a dataset's text column."""
    dataset = open_dataset(path)
    if text_column not in dataset.column_names:
        raise DataError(f"{path} has no column '{text_column}' (columns: {', '.join(dataset.column_names)}); "
                        "pass --text-column with the name of the text column")
    if getattr(dataset.features[text_column], "dtype", None) not in ("string", "large_string"):
        raise DataError(f"{path}: column '{text_column}' holds {dataset.features[text_column]}, not text; "
                        "pass --text-column with the name of the text column")
    for batch in dataset.select_columns([text_column]).iter(batch_size=1000):
        for text in batch[text_column]:
            if text and text.strip():
                yield text.strip(), len(text) + 1


def _first_undecodable_line(path):
    """The line holding the first byte that is not UTF-8 (text is decoded in chunks, so the reader's own
    line count stops at the chunk, not at the line)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return line_no
    return "?"


# ---------------------------------------------------------------------------------------------
# 2. Tokenizing once, into a cache
# ---------------------------------------------------------------------------------------------

def default_cache_dir():
    """~/.cache/bert-distil, or under $XDG_CACHE_HOME."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bert-distil")


@dataclass
class Corpus:
    tokens: np.ndarray      # every document's ids, each document followed by one sep id
    doc_starts: np.ndarray  # int64, n_docs + 1 offsets into tokens
    path: str


def _plain_backend(tokenizer):
    """The tokenizer's backend without padding or truncation. A fast tokenizer keeps the padding and
    truncation of its last call (tokenizer(texts, padding=True, ...)) in its backend, where they
    would pad or cut every document tokenized here."""
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    return backend


def _fingerprint(path, tokenizer, text_column, min_tokens):
    """A key that changes when the file, the tokenizer or the reading options change."""
    h = hashlib.sha256()
    if is_dataset(path):  # its arrow files (names, sizes, times) stand for the file's bytes
        identity = [dataset_fingerprint(path)]
    else:
        stat = os.stat(path)
        with open(path, "rb") as f:  # size and mtime can survive an edit (cp -p): hash both ends too
            h.update(f.read(1 << 20))
            f.seek(max(0, stat.st_size - (1 << 20)))
            h.update(f.read(1 << 20))
        identity = [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]
    h.update(json.dumps([CACHE_VERSION, *identity, text_column, min_tokens, tokenizer.sep_token_id]).encode())
    h.update(_plain_backend(tokenizer).to_str().encode())
    return h.hexdigest()[:20]


def load_corpus(path, tokenizer, cache_dir, text_column="text", min_tokens=1, batch_docs=1000,
                progress=True):
    """Token ids of every document in `path`, from the cache when it is there, else tokenized now.

    Documents with fewer than `min_tokens` tokens are dropped. Under torchrun, call this before
    the process group starts: one process builds the cache while the others wait on the lock, so a
    long tokenization cannot hit a collective's timeout.
    """
    check_corpus_file(path)
    os.makedirs(cache_dir, exist_ok=True)
    key = os.path.join(cache_dir, f"{os.path.basename(path)}.{_fingerprint(path, tokenizer, text_column, min_tokens)}")
    with open(key + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(key + ".json"):
            _build_cache(path, tokenizer, key, text_column, min_tokens, batch_docs, progress)
    meta = json.load(open(key + ".json"))
    tokens = np.memmap(key + ".tokens", dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
    return Corpus(tokens, np.load(key + ".docs.npy"), path)


def _build_cache(path, tokenizer, key, text_column, min_tokens, batch_docs, progress):
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    sep = tokenizer.sep_token_id
    backend = _plain_backend(tokenizer)
    lengths, n_docs_seen = [], 0
    bar = tqdm(total=os.path.getsize(path) if os.path.isfile(path) else None, unit="B", unit_scale=True,
               disable=not progress, desc=f"tokenizing {os.path.basename(path)}", file=sys.stderr,
               delay=1)  # quiet if quick

    def flush(texts, out):
        nonlocal n_docs_seen
        n_docs_seen += len(texts)
        ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        ids = [x for x in ids if len(x) >= min_tokens]
        if ids:
            flat = np.fromiter((t for x in ids for t in (*x, sep)), dtype=dtype,
                               count=sum(len(x) + 1 for x in ids))
            out.write(flat.tobytes())
            lengths.extend(len(x) + 1 for x in ids)

    try:
        with open(key + ".tokens.tmp", "wb") as out:
            texts = []
            for text, n_bytes in read_documents(path, text_column):
                texts.append(text)
                bar.update(n_bytes)
                if len(texts) == batch_docs:
                    flush(texts, out)
                    texts = []
            flush(texts, out)
    except BaseException:  # bad input found mid-file, or Ctrl-C: leave no half-written file behind
        os.remove(key + ".tokens.tmp")
        bar.leave = False  # and no half-drawn bar above the one-line error
        raise
    finally:
        bar.close()
    if n_docs_seen == 0:
        os.remove(key + ".tokens.tmp")
        raise DataError(f"{path} holds no text (only blank lines or empty fields)")
    if not lengths:
        os.remove(key + ".tokens.tmp")
        raise DataError(f"{path}: all {n_docs_seen} documents are shorter than --min-tokens {min_tokens} "
                        "tokens; lower --min-tokens or pass a corpus of longer documents")
    doc_starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    np.save(key + ".docs.tmp.npy", doc_starts)
    os.replace(key + ".docs.tmp.npy", key + ".docs.npy")
    os.replace(key + ".tokens.tmp", key + ".tokens")
    meta = {"source": os.path.abspath(path), "dtype": np.dtype(dtype).name, "n_tokens": int(doc_starts[-1]),
            "n_docs": len(lengths), "n_docs_dropped": n_docs_seen - len(lengths)}
    with open(key + ".json.tmp", "w") as f:
        json.dump(meta, f)
    os.replace(key + ".json.tmp", key + ".json")  # written last: its presence means the cache is whole


# ---------------------------------------------------------------------------------------------
# 3. Sequences
# ---------------------------------------------------------------------------------------------

@dataclass
class Sequences:
    tokens: np.ndarray   # the corpus ids (memory-mapped)
    starts: np.ndarray   # int64, where each sequence's content starts in tokens
    lengths: np.ndarray  # int64, its content length (without the two special tokens)


def make_sequences(corpus, seq_len, pack=True):
    """Cut the corpus into sequences of at most seq_len tokens, [CLS] and [SEP] included.

    pack=True: consecutive windows over the whole stream, documents separated by [SEP], so every
    sequence but the last is full. pack=False: one document per sequence, long documents split
    into several.
    """
    content = seq_len - 2
    if content < 1:
        raise DataError(f"--seq-len {seq_len} leaves no room for text; use at least 8")
    if pack:
        starts = np.arange(0, len(corpus.tokens), content, dtype=np.int64)
        return Sequences(corpus.tokens, starts, np.minimum(content, len(corpus.tokens) - starts))
    doc_len = np.diff(corpus.doc_starts) - 1  # without the document's trailing separator
    pieces = -(-doc_len // content)
    doc = np.repeat(np.arange(len(doc_len)), pieces)
    piece = np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    starts = corpus.doc_starts[doc] + piece * content
    return Sequences(corpus.tokens, starts, np.minimum(content, doc_len[doc] - piece * content))


def collate(seqs, indices, tokenizer):
    """Sequences `indices` as (input_ids, attention_mask), padded only to the longest of them."""
    lengths = seqs.lengths[indices] + 2
    input_ids = np.full((len(indices), lengths.max()), tokenizer.pad_token_id, dtype=np.int64)
    attention_mask = np.zeros_like(input_ids)
    for row, (i, n) in enumerate(zip(indices, lengths)):
        input_ids[row, 0] = tokenizer.cls_token_id
        input_ids[row, 1:n - 1] = seqs.tokens[seqs.starts[i]:seqs.starts[i] + n - 2]
        input_ids[row, n - 1] = tokenizer.sep_token_id
        attention_mask[row, :n] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------
# 4. Dynamic masking and batches
# ---------------------------------------------------------------------------------------------

@dataclass
class MaskSpec:
    mask_id: int
    special_ids: np.ndarray        # never masked, never drawn as the random replacement
    random_ids: np.ndarray         # candidates for the "random token" replacement
    weights: np.ndarray | None     # per-id weight of being chosen (mlm smoothing), or None: uniform
    prob: float = 0.15


def mask_spec(tokenizer, corpus=None, smoothing=0.0, prob=0.15):
    special = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    random_ids = np.setdiff1d(np.arange(len(tokenizer)), special)
    weights = None
    if smoothing > 0:
        # XLM / DistilBERT: a token's chance to be masked ~ count^-smoothing, so frequent
        # tokens (the, of, punctuation) are masked less and rare ones more.
        counts = np.bincount(np.asarray(corpus.tokens), minlength=len(tokenizer)).astype(np.float64)
        weights = np.maximum(counts, 1.0) ** -smoothing
    return MaskSpec(tokenizer.mask_token_id, special, random_ids, weights, prob)


def mask_tokens(input_ids, attention_mask, seq_ids, seed, epoch, spec):
    """BERT's masking: choose 15% of the non-special tokens, then 80% [MASK], 10% random, 10% kept.

    Returns (masked input_ids, labels) with labels = -100 where nothing is predicted. A sequence's
    mask depends only on (seed, epoch, its index) and its own tokens, never on the batch it sits
    in. Each sequence masks round(15% x its maskable tokens) positions (rounded at random so the
    rate is exact on average), drawn without replacement, uniformly or by `spec.weights`.
    """
    input_ids = input_ids.copy()
    labels = np.full_like(input_ids, -100)
    for row, seq_id in enumerate(seq_ids):
        n = int(attention_mask[row].sum())
        ids = input_ids[row, :n]
        rng = np.random.default_rng([seed, epoch, int(seq_id)])
        u_count, u_pick, u_action, u_token = rng.random(1), rng.random(n), rng.random(n), rng.random(n)
        maskable = ~np.isin(ids, spec.special_ids)
        k = int(np.floor(spec.prob * maskable.sum() + u_count[0]))
        if k == 0:
            continue
        # Gumbel top-k: the k largest of log(w) + Gumbel noise are a weighted draw without replacement
        weights = spec.weights[ids] if spec.weights is not None else np.ones(n)
        keys = np.where(maskable, np.log(weights) - np.log(-np.log(u_pick + 1e-12) + 1e-12), -np.inf)
        chosen = np.argsort(-keys, kind="stable")[:k]
        labels[row, chosen] = ids[chosen]
        action = u_action[chosen]
        ids[chosen[action < 0.8]] = spec.mask_id
        random_pos = chosen[(action >= 0.8) & (action < 0.9)]
        ids[random_pos] = spec.random_ids[(u_token[random_pos] * len(spec.random_ids)).astype(np.int64)]
    return input_ids, labels


def batches_per_epoch(n_seqs, batch_size, world_size):
    """Full batches each rank gets per epoch (the tail that would make batches uneven is dropped)."""
    return n_seqs // world_size // batch_size


def epoch_batches(seqs, batch_size, seed, epoch, rank=0, world_size=1, group_by_length=False):
    """The list of sequence-index batches of one rank for one epoch.

    The epoch's order is a permutation seeded by (seed, epoch); rank r takes every world_size-th
    entry from r, so the b first sequences of every rank together are the world_size*b first
    sequences of the order: one rank with batch 2b sees the same global batch as two ranks with
    batch b. With group_by_length (for unpacked data), the rank's sequences are sorted by length
    within groups of 50 batches and the batches shuffled, so padding is small.
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(seqs.starts))
    n_batches = batches_per_epoch(len(order), batch_size, world_size)
    mine = order[rank::world_size][:n_batches * batch_size]
    if group_by_length:
        group = 50 * batch_size
        mine = np.concatenate([g[np.argsort(seqs.lengths[g], kind="stable")]
                               for g in np.split(mine, range(group, len(mine), group))])
        batches = mine.reshape(n_batches, batch_size)
        return list(batches[np.random.default_rng([seed, epoch, rank]).permutation(n_batches)])
    return list(mine.reshape(n_batches, batch_size))


def make_batch(seqs, indices, tokenizer, spec, seed, epoch):
    """The tensors-to-be of one batch, as numpy arrays: input_ids, attention_mask and labels (B, L),
    and where each loss reads them (distil.batch_rows: flat int64 indices of the real and the
    masked positions, the labels there, and whether anything is padded), so that the training
    step never has to find them on the device."""
    input_ids, attention_mask = collate(seqs, indices, tokenizer)
    input_ids, labels = mask_tokens(input_ids, attention_mask, indices, seed, epoch, spec)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            **batch_rows(attention_mask, labels)}


# ---------------------------------------------------------------------------------------------
# 5. Batches off the critical path: DataLoader workers
# ---------------------------------------------------------------------------------------------

class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch number m of one rank's run, counted across epochs: a pure function of m.

    Item m is batch m % n_batches of epoch m // n_batches (epoch_batches), collated and masked
    (make_batch). A DataLoader then builds the batches in worker processes, ahead of the loop,
    and the order and content do not depend on the number of workers.
    """

    def __init__(self, seqs, tokenizer, spec, batch_size, seed, n_batches, rank=0, world_size=1,
                 group_by_length=False):
        self.seqs, self.tokenizer, self.spec, self.seed = seqs, tokenizer, spec, seed
        self.batch_size, self.n_batches, self.rank, self.world_size = batch_size, n_batches, rank, world_size
        self.group_by_length = group_by_length
        self._epoch = self._batches = None  # the last epoch's order, cached per process

    def __getitem__(self, m):
        epoch, i = divmod(m, self.n_batches)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.seqs, self.batch_size, self.seed, epoch, self.rank,
                                                              self.world_size, self.group_by_length)
        return make_batch(self.seqs, self._batches[i], self.tokenizer, self.spec, self.seed, epoch)


def micro_batch_loader(dataset, start, stop, num_workers=0, pin_memory=False):
    """Micro-batches start, start + 1, ..., stop - 1 of `dataset`, in order, as CPU tensors.

    num_workers > 0 builds them in that many processes, up to 4 batches each ahead of the loop;
    pin_memory (on a GPU) puts them in page-locked memory, so that .to(device, non_blocking=True)
    copies them while the GPU computes.
    """
    # fork, where there is one: a worker then shares the memory-mapped corpus with its parent, where a
    # spawned one (Python 3.14's default on Linux is forkserver) would be sent a pickled copy of it.
    context = "fork" if num_workers and sys.platform != "win32" else None
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, stop), num_workers=num_workers,
                                       pin_memory=pin_memory, prefetch_factor=4 if num_workers else None,
                                       multiprocessing_context=context)
