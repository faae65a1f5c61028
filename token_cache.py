"""Files in, token ids out: read a corpus or a labelled file, tokenize it once, cache the ids.

1. `read_documents` yields one document per line of a .txt, per row of a .csv (a text column),
   per line of a .jsonl (a text field) or per row of a Hugging Face dataset (a saved folder or a
   Hub name), and turns bad input into one-line `DataError`s; `read_records` reads the labelled
   files of a task (tasks.py) with the same strict readers.
2. `load_corpus` tokenizes the documents once, in batches, with the teacher's fast tokenizer and
   caches the ids as a flat numpy array (uint16 where the vocabulary fits), each document followed
   by one separator token. The cache is keyed on the file, the tokenizer and the reading options,
   built by one process while any others wait on a file lock (cluster.file_lock: flock, or a soft
   lock where the filesystem has none), and memory-mapped on later runs. Its files are written under
   names unique to the host and process and renamed into place, so two nodes that build the same
   cache at once (node-local locks on a shared folder) never mix their bytes, and a reader never maps
   a half-written file.

What happens to the ids next (sequences, BERT's masking, batches) is data.py.
"""

import csv
import hashlib
import json
import os
import socket
import sys
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from cluster import file_lock

CACHE_VERSION = 2  # 2: special-token strings in the text are tokenized as text


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


def read_documents(path, text_column="text", counts=None):
    """Yield (document text, bytes read so far) from a .txt, .csv or .jsonl corpus (or a dataset).

    Blank lines of a .txt are skipped. Records of a .csv, .jsonl or dataset whose text is empty,
    blank or null are skipped and counted in `counts["skipped"]` (a dict the caller passes, or
    None); .csv records that span several lines (a quoted field holding line breaks) are counted
    in `counts["multiline"]`, and the longest one's lines in `counts["longest"]`, so that a quote
    left open, which swallows the records after it, shows up (see _read_csv for the rules).
    Any other malformed record is a DataError naming its line: a record is never silently merged
    with the next, cut short or dropped.
    """
    counts = {} if counts is None else counts
    counts.setdefault("skipped", 0)
    if is_dataset(path):
        yield from read_dataset_documents(path, text_column, counts)
        return
    check_corpus_file(path)
    kind = os.path.splitext(path)[1].lower()
    try:
        # utf-8-sig: drop the byte-order mark that Excel and Notepad write, or it sticks to the first column name
        with open(path, encoding="utf-8-sig", newline="" if kind == ".csv" else None) as f:
            if kind == ".txt":
                for line in f:
                    if line.strip():
                        yield line.strip(), len(line)
            elif kind == ".csv":
                yield from _read_csv(path, f, text_column, counts)
            else:
                yield from _read_jsonl(path, f, text_column, counts)
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text (line {_first_undecodable_line(path)}); "
                        "convert it first, e.g. iconv -f latin1 -t utf-8") from None


def _read_csv(path, f, text_column, counts):
    """The documents of a CSV file: the text column of each record (_csv_records); empty ones are counted."""
    for _, row in _csv_records(path, f, [text_column], counts):
        text = row[text_column]
        if text.strip():
            yield text.strip(), len(text) + 1
        else:
            counts["skipped"] += 1


def _csv_records(path, f, columns, counts, flags=None):
    """Yield (the line the record starts on, {column: field}) for each record of a CSV file, read by
    RFC 4180's rules, strictly; `columns` must be in the header (the first is named in errors).

    A field holding a comma, a quote or a line break is enclosed in double quotes, and a quote
    inside it is doubled (""), as Excel, pandas and Python's csv module write. A quoted field may
    therefore span lines: a document with paragraphs is one record. What is refused, naming the
    line where the record starts: a quote left open to the end of the file (it would swallow every
    later record), text after a closing quote other than a comma or the line's end (a quote that
    closed where it should not have), and a record with more or fewer fields than the header (a
    comma in an unquoted field, or records run together). The records that do span lines are
    counted, so that a quote closing far from where it opened is visible in the summary.
    """
    csv.field_size_limit(sys.maxsize)
    reader = csv.reader(f, strict=True)
    start = 1  # the line the current record starts on
    try:
        header = next(reader, None)
        for column, flag in zip(columns, flags or ["--text-column"] + ["the matching --*-column flag"] * len(columns)):
            if not header or column not in header:
                raise DataError(f"{path} has no column '{column}' (columns: {', '.join(header or []) or 'none'}); "
                                f"pass {flag} with the name of the column")
            if header.count(column) > 1:
                raise DataError(f"{path}: {header.count(column)} columns are named '{column}'; rename all but one")
        n_fields = len(header)
        start = reader.line_num + 1
        for row in reader:
            end = reader.line_num
            lines = f"line {start}" if end == start else f"lines {start}-{end}"
            if row and len(row) != n_fields:
                raise DataError(f"{path} {lines}: {len(row)} fields where the header has {n_fields}; "
                                "quote a field that holds a comma (\"a, b\"), or fix the record")
            if end > start:
                counts["multiline"] = counts.get("multiline", 0) + 1
                longest = counts.get("longest")
                if longest is None or end - start > longest[1] - longest[0]:
                    counts["longest"] = (start, end)
            record_start, start = start, end + 1
            if row:  # (a blank line between records is no record)
                yield record_start, dict(zip(header, row))
    except csv.Error as e:
        if reader.line_num > start:
            raise DataError(f"{path} line {start}: malformed CSV: the record starting there runs to line "
                            f"{reader.line_num} and fails there ({e}); a quote opened on line {start} is probably "
                            "not closed: close it, and double every quote inside a quoted field (\"\")") from None
        raise DataError(f"{path} line {start}: malformed CSV ({e}); enclose a field that holds quotes in quotes "
                        "and double the quotes inside it (\"say \"\"hi\"\"\"), or use .jsonl") from None


def read_records(path, columns, flags=None):
    """Yield ("line N" or "row N", record dict) for each record of a .csv, a .jsonl or a dataset that
    has the first of `columns` (the others may be missing from a .jsonl record); CSV fields are
    strings, JSON values keep their types. Malformed input is a one-line DataError naming the line;
    `flags` name the flag that sets each column, for the error about a missing one."""
    flags = dict(zip(columns, flags or ["--text-column"] + ["the matching --*-column flag"] * len(columns)))
    if is_dataset(path):
        dataset = open_dataset(path)
        missing = [c for c in columns if c not in dataset.column_names]
        if missing:
            raise DataError(f"{path} has no column '{missing[0]}' (columns: {', '.join(dataset.column_names)}); "
                            f"pass {flags[missing[0]]} with the name of the column")
        for i, record in enumerate(dataset.select_columns(list(dict.fromkeys(columns)))):
            yield f"row {i}", record
        return
    check_corpus_file(path)
    kind = os.path.splitext(path)[1].lower()
    if kind == ".txt":
        raise DataError(f"{path}: a .txt file holds no labels; pass a .csv, a .jsonl or a dataset with a label column")
    try:
        with open(path, encoding="utf-8-sig", newline="" if kind == ".csv" else None) as f:
            if kind == ".csv":
                for line, record in _csv_records(path, f, list(flags), {}, list(flags.values())):
                    yield f"line {line}", record
                return
            for line_no, record, _ in _jsonl_objects(path, f, columns[0]):
                if columns[0] not in record:
                    raise DataError(f"{path} line {line_no} has no field '{columns[0]}' (found: "
                                    f"{', '.join(record) or 'none'}); pass --text-column with the field's name")
                yield f"line {line_no}", record
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text (line {_first_undecodable_line(path)}); "
                        "convert it first, e.g. iconv -f latin1 -t utf-8") from None


def _json_type(value):
    """JSON's name for a parsed value's type."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}[type(value)]


def _jsonl_objects(path, f, text_column):
    """(line number, object, the line's length) for each non-blank line of a JSON Lines file; anything
    else is a DataError."""
    for line_no, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {line_no} is not valid JSON ({e.msg}); "
                            "a .jsonl file holds one JSON object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {line_no} holds a JSON {_json_type(record)}, not an object; a .jsonl "
                            f"file holds one object per line, e.g. {{\"{text_column}\": \"the text\"}}")
        yield line_no, record, len(line)


def _read_jsonl(path, f, text_column, counts):
    """Records of a JSON Lines file: one object per line, its `text_column` a string (null: skipped)."""
    for line_no, record, line_length in _jsonl_objects(path, f, text_column):
        if text_column not in record:
            raise DataError(f"{path} line {line_no} has no field '{text_column}' (found: "
                            f"{', '.join(record) or 'none'}); pass --text-column with the name of the text field")
        text = record[text_column]
        if text is None:
            counts["skipped"] += 1
            continue
        if not isinstance(text, str):
            raise DataError(f"{path} line {line_no}: field '{text_column}' holds a JSON {_json_type(text)} "
                            f"({json.dumps(text)[:40]}), not a string; write the text as a string "
                            "(or null to skip the record)")
        if text.strip():
            yield text.strip(), line_length
        else:
            counts["skipped"] += 1


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


def read_dataset_documents(path, text_column="text", counts=None):
    """Yield (document text, its length) for each row of a dataset's text column; rows whose text is
    None, empty or blank are skipped and counted in counts["skipped"]."""
    counts = {"skipped": 0} if counts is None else counts
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
            else:
                counts["skipped"] = counts.get("skipped", 0) + 1


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
    meta: dict = None       # the cache's record of the reading: counts of documents kept, skipped, dropped
    cache_key: str | None = None  # the token cache's path without suffix; None: not cached (built in memory)

    @property
    def cache_name(self):
        return os.path.basename(self.cache_key) if self.cache_key else None


def corpus_note(corpus):
    """One line saying what reading the corpus skipped or found unusual, or None when nothing was.

    Empty and null texts are skipped, as documents shorter than --min-tokens are dropped; a run
    says how many, so that a column of nulls or a quote left open cannot pass unnoticed."""
    meta, name = corpus.meta or {}, os.path.basename(corpus.path.rstrip("/"))
    parts = []
    if meta.get("n_docs_skipped"):
        parts.append(f"{meta['n_docs_skipped']} empty or null texts skipped")
    if meta.get("n_docs_dropped"):
        parts.append(f"{meta['n_docs_dropped']} documents shorter than --min-tokens dropped")
    if meta.get("n_records_multiline"):
        start, end = meta["longest_record_lines"]
        parts.append(f"{meta['n_records_multiline']} records span several lines (quoted line breaks; the "
                     f"longest: lines {start}-{end})")
    if not parts:
        return None
    return f"{name}: {meta.get('n_docs', '?')} documents kept; " + "; ".join(parts)


# A special token renamed to this is in the vocabulary under a name no text can spell (see plain_backend).
_UNREACHABLE = "\x00\ufffe"


def plain_backend(tokenizer):
    """The tokenizer's backend as the corpus is tokenized with it: no padding, no truncation, and
    special-token strings in the text read as text.

    - A fast tokenizer keeps the padding and truncation of its last call (tokenizer(texts,
      padding=True, ...)) in its backend, where they would pad or cut every document.
    - Corpus text is text: a line that says "type [MASK] to hide a word" must not put a [MASK] id
      without a label into the batch, nor "<pad>" a pad id with attention 1. Two routes lead from
      text to a special id: the added-token matcher, which splits "[MASK]" out of the text before
      the model sees it (turned off by the backend's encode_special_tokens), and the model itself,
      whose vocabulary holds the special tokens too: a SentencePiece-style Unigram model (XLM-R,
      CamemBERT, DeBERTa-v3) segments "<pad>" as its own piece of score 0, a WordPiece or
      WordLevel vocabulary behind a whitespace pre-tokenizer matches "[MASK]" as a word, a BPE
      merge may build "<mask>". So each special token's vocabulary entry is renamed to a string no
      text holds (its id is kept), and BPE merges that build or use it are dropped. Text such as
      "[MASK]" is then tokenized as the characters it is made of ("[", "mask", "]", or the unknown
      token where the vocabulary cannot spell them). The one special id text can still yield is
      the unknown token's, which stands for text, is never masked and is never predicted.
    """
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state["padding"] = state["truncation"] = None
    special = set(tokenizer.all_special_tokens) | {t["content"] for t in state.get("added_tokens", [])
                                                    if t.get("special")}
    renamed = {token: _UNREACHABLE + token for token in special}
    model = state["model"]
    if isinstance(model.get("vocab"), dict):  # WordPiece, WordLevel, BPE: token -> id
        model["vocab"] = {renamed.get(token, token): i for token, i in model["vocab"].items()}
    elif isinstance(model.get("vocab"), list):  # Unigram: [piece, score] in id order (unk_id is an id)
        model["vocab"] = [[renamed.get(piece, piece), score] for piece, score in model["vocab"]]
    if model.get("unk_token") in renamed:  # WordPiece, WordLevel and BPE name their unknown token
        model["unk_token"] = renamed[model["unk_token"]]
    if "merges" in model:  # pairs, or "a b" strings in older files
        pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
        model["merges"] = [m for m, (a, b) in zip(model["merges"], pairs)
                           if not {a, b, a + b} & special]
    backend = Tokenizer.from_str(json.dumps(state))
    backend.encode_special_tokens = True
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
    h.update(plain_backend(tokenizer).to_str().encode())
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
    with file_lock(key + ".lock", wait_s=LOCK_WAIT_S):
        if not os.path.exists(key + ".json"):
            _build_cache(path, tokenizer, key, text_column, min_tokens, batch_docs, progress)
    meta = json.load(open(key + ".json"))
    tokens = np.memmap(key + ".tokens", dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
    return Corpus(tokens, np.load(key + ".docs.npy"), path, meta, key)


# How long a process waits for another's cache lock before building the cache itself: only a soft lock
# (no flock) can outlive its holder, on another host; building twice is safe, only slower.
LOCK_WAIT_S = 1800


def unique_tmp(path):
    """A temporary name for `path` that no other process, on this host or another, uses."""
    return f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"


def _build_cache(path, tokenizer, key, text_column, min_tokens, batch_docs, progress):
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    sep = tokenizer.sep_token_id
    backend = plain_backend(tokenizer)
    # plain_backend reads special-token strings as text; this holds it to that for any tokenizer:
    # no special id but the unknown token's may come out of text (the separators are added below)
    forbidden = np.array(sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}), dtype=np.int64)
    lengths, n_docs_seen, counts = [], 0, {"skipped": 0}
    bar = tqdm(total=os.path.getsize(path) if os.path.isfile(path) else None, unit="B", unit_scale=True,
               disable=not progress, desc=f"tokenizing {os.path.basename(path)}", file=sys.stderr,
               delay=1)  # quiet if quick

    def flush(texts, out):
        nonlocal n_docs_seen
        n_docs_seen += len(texts)
        ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        kept = [(text, x) for text, x in zip(texts, ids) if len(x) >= min_tokens]
        if kept:
            flat = np.fromiter((t for _, x in kept for t in (*x, sep)), dtype=dtype,
                               count=sum(len(x) + 1 for _, x in kept))
            if np.isin(flat, forbidden).sum() != len(kept):  # more special ids than the separators
                text, x = next((text, x) for text, x in kept if np.isin(x, forbidden).any())
                token = tokenizer.convert_ids_to_tokens(int(np.asarray(x)[np.isin(x, forbidden)][0]))
                raise DataError(f"{path}: the tokenizer turns the text {text[:60]!r} into its special token "
                                f"{token!r}, which text must not give; report it with the tokenizer's name "
                                "(data.plain_backend does not handle its kind of model)")
            out.write(flat.tobytes())
            lengths.extend(len(x) + 1 for _, x in kept)

    tokens_tmp, docs_tmp, meta_tmp = unique_tmp(key + ".tokens"), unique_tmp(key + ".docs") + ".npy", \
        unique_tmp(key + ".json")
    try:
        with open(tokens_tmp, "wb") as out:
            texts = []
            for text, n_bytes in read_documents(path, text_column, counts):
                texts.append(text)
                bar.update(n_bytes)
                if len(texts) == batch_docs:
                    flush(texts, out)
                    texts = []
            flush(texts, out)
    except BaseException:  # bad input found mid-file, or Ctrl-C: leave no half-written file behind
        os.remove(tokens_tmp)
        bar.leave = False  # and no half-drawn bar above the one-line error
        raise
    finally:
        bar.close()
    if n_docs_seen == 0:
        os.remove(tokens_tmp)
        skipped = f" ({counts['skipped']} empty or null texts)" if counts["skipped"] else ""
        raise DataError(f"{path} holds no text (only blank lines or empty fields{skipped})")
    if not lengths:
        os.remove(tokens_tmp)
        raise DataError(f"{path}: all {n_docs_seen} documents are shorter than --min-tokens {min_tokens} "
                        "tokens; lower --min-tokens or pass a corpus of longer documents")
    doc_starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    with open(tokens_tmp, "rb+") as f:  # on disk before the name points at it (a crash after the rename)
        os.fsync(f.fileno())
    np.save(docs_tmp, doc_starts)
    os.replace(docs_tmp, key + ".docs.npy")
    os.replace(tokens_tmp, key + ".tokens")
    meta = {"source": os.path.abspath(path), "dtype": np.dtype(dtype).name, "n_tokens": int(doc_starts[-1]),
            "n_docs": len(lengths), "n_docs_dropped": n_docs_seen - len(lengths),
            "n_docs_skipped": counts["skipped"], "n_records_multiline": counts.get("multiline", 0),
            "longest_record_lines": counts.get("longest")}
    with open(meta_tmp, "w") as f:
        json.dump(meta, f)
    os.replace(meta_tmp, key + ".json")  # written last: its presence means the cache is whole


# Summaries of the cached ids, each computed once in one pass of bounded memory and kept beside the
# token cache: the counts of each id (for --mlm-smoothing) and a digest (what a resume checks).

CHUNK_TOKENS = 1 << 20  # ids read at a time: np.bincount widens them to int64, 8 MiB per chunk


def _chunks(tokens):
    """The ids in chunks of CHUNK_TOKENS. A memory-mapped cache is read through the file, not the map,
    so a pass over a corpus of billions of tokens leaves no mapped pages in the process's memory."""
    if isinstance(tokens, np.memmap) and tokens.filename:
        with open(tokens.filename, "rb") as f:
            f.seek(tokens.offset)
            left = len(tokens)
            while left:
                chunk = np.fromfile(f, dtype=tokens.dtype, count=min(left, CHUNK_TOKENS))
                if len(chunk) == 0:
                    raise DataError(f"{tokens.filename} is shorter than its cache says; delete it to rebuild it")
                left -= len(chunk)
                yield chunk
    else:
        for i in range(0, len(tokens), CHUNK_TOKENS):
            yield np.asarray(tokens[i:i + CHUNK_TOKENS])


def _once_beside_cache(corpus, suffix, compute, load, save):
    """compute(corpus), or what an earlier call saved at the cache key + suffix. The cache's lock makes
    one process compute it while the others (torchrun ranks) wait and then read it; the file is
    written under a temporary name and renamed, so a killed process leaves no partial file."""
    if corpus.cache_key is None:
        return compute(corpus)
    path = corpus.cache_key + suffix
    with file_lock(corpus.cache_key + ".lock", wait_s=LOCK_WAIT_S):
        if not os.path.exists(path):
            tmp = unique_tmp(path) + (".npy" if path.endswith(".npy") else "")
            save(tmp, compute(corpus))
            os.replace(tmp, path)
    return load(path)


def _count(corpus):
    counts = np.zeros(0, dtype=np.int64)
    for chunk in _chunks(corpus.tokens):
        c = np.bincount(chunk)
        if len(c) > len(counts):
            counts = np.pad(counts, (0, len(c) - len(counts)))
        counts[:len(c)] += c
    return counts


def token_counts(corpus, minlength=0):
    """How often each id occurs in the corpus: int64 array of at least `minlength` entries.

    Counted once per token cache, chunk by chunk (about 10 MiB of memory whatever the corpus size),
    and kept as the cache key + ".counts.npy"; later calls and other ranks read that file."""
    def save(path, counts):
        with open(path, "wb") as f:
            np.save(f, counts)

    counts = _once_beside_cache(corpus, ".counts.npy", _count, np.load, save)
    return np.pad(counts, (0, max(0, minlength - len(counts))))


def _digest(corpus):
    h = hashlib.sha256(np.dtype(corpus.tokens.dtype).str.encode())
    for chunk in _chunks(corpus.tokens):
        h.update(chunk.tobytes())
    return h.hexdigest()


def corpus_digest(corpus):
    """SHA-256 of the corpus's ids (hex): equal iff the tokens a run trains on are. Unlike the cache's
    key, it does not depend on the file's path or modification time, which differ between the nodes
    of a cluster and after a copy. Hashed once per token cache (about 1.5 s per GB of ids), kept as the
    cache key + ".sha256"."""
    def save(path, digest):
        with open(path, "w") as f:
            f.write(digest)

    return _once_beside_cache(corpus, ".sha256", _digest, lambda path: open(path).read().strip(), save)
