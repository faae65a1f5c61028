"""Data augmentation for task distillation, as TinyBERT's task stage does it: each training record is
rewritten N times by a masked LM, and the rewrites, which carry no label, are taught by the teacher
alone (`--augment N --augment-model FOLDER`).

Source: Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural Language Understanding", Sec. 3.1 and
Algorithm 1 (the authors' data_augmentation.py: K = 15 candidates, p_t = 0.4, N = 20). For a record x
of words w_1 .. w_n:

    for each word w_i:  C_i = the K words the masked LM ranks highest at w_i's place, w_i masked
    repeat N times:     x' = x; each word w_i, with probability p_t, becomes a word drawn uniformly from C_i
                        x' is kept unless it equals x or a rewrite kept before

The candidates are computed once per word, so N rewrites cost the masked-LM forwards of one: one
forward per rewritable word of the data (its length: the record's), made in length-sorted batches on
the run's device, with only the masked position projected onto the vocabulary.

What is decided here, and why:
- **Words** are the tokenizer's own: a WordPiece token and the "##" pieces after it; for byte-level BPE
  and SentencePiece vocabularies (RoBERTa, XLM-R), a token that starts with the word marker ("Ġ", "▁")
  and the pieces after it; for token classification, the data's own words (each word's first sub-token,
  Examples.word_mask). Only words made of letters alone are rewritten (punctuation, numbers and words
  with digits stay), as TinyBERT's `_is_valid` does. TinyBERT also leaves an English stop-word list
  alone; here no word list is kept, so that any language works the same: a rewrite that changes the
  meaning ("not" -> "very") costs no wrong label, since the teacher labels every rewrite.
- **Words of several word pieces** ("catdog" = cat ##d ##o ##g) are masked whole: all their pieces
  become one mask token and their candidates are whole words of one piece. TinyBERT takes GloVe's
  nearest words for them instead. Masking them whole needs no second resource of the teacher's
  language (no GloVe for most languages), gives candidates that fit the context (GloVe's ignore it),
  and still rewrites the rare words that a small transfer set lacks most (leaving them would keep
  every name and rare adjective as it is). A rewrite is then never longer than its record (a word of k
  pieces becomes one), so it always fits --seq-len.
- **Context**: TinyBERT feeds "[CLS] masked sentence [SEP] original sentence [SEP]", so that the model
  also sees the word it replaces; here the record alone, with the one word masked: records of text
  pairs already fill both segments, and the copy would double the cost. The candidates are what fits
  the context (antonyms as well as synonyms): the teacher labels the rewrite, whatever it says.
- **Candidates** are the top K of the vocabulary's whole-word, letters-only, non-special tokens (the
  others' scores set to -inf before the top-k; TinyBERT drops "##" pieces after taking its top K,
  keeping fewer). The word itself may be one of them (as in TinyBERT): drawing it keeps the word.
- **Token classification**: supported. Rewrites carry no labels (-100 on every token), so word
  alignment of labels is moot; the word boundaries are kept exactly (each word becomes one word), and
  Examples.word_mask marks each rewritten word's first piece, where the teacher's per-word predictions
  (the KD rows) are read.
- **Text pairs**: both texts are rewritten; each piece keeps its segment (token_type_ids).
- **Randomness**: record i's rewrites come from numpy's generator seeded with (seed, i): they do not
  depend on the batching, on the order, or on the other records. The candidates come from the model
  in fixed length-sorted batches; on other hardware a tie in the top K could break otherwise, which is
  why the rewrites are cached (`load_rewrites`) and a run reads them back rather than recomputing them.
"""

import hashlib
import json
import os

import numpy as np
import torch
from tqdm import tqdm

from distil import at_rows, prepared_mask, unwrap
from student import StudentError
from tasks import Examples
from cluster import file_lock
from token_cache import LOCK_WAIT_S, DataError, unique_tmp

TOP_K, REPLACE_PROB = 15, 0.4  # TinyBERT's K and p_t (Jiao et al. 2020, Sec. 4.2; data_augmentation.py's M and p)
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# The vocabulary: which tokens begin a word, which are letters
# ---------------------------------------------------------------------------------------------

def vocab_classes(tokenizer, vocab_size):
    """What each token id is, as numpy bool arrays of shape (vocab_size,):

        starts:  the token begins a word (WordPiece: no "##" prefix; BPE/SentencePiece: the word marker)
        letters: its text, prefix or marker removed, is letters only (str.isalpha)
        special: a special token ([CLS], [SEP], [PAD], [MASK], [UNK], ...) or no token of the tokenizer
                 (embedding rows past its vocabulary)
    """
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
    model = tokenizer.backend_tokenizer.model
    prefix = getattr(model, "continuing_subword_prefix", None) if type(model).__name__ == "WordPiece" else None
    if prefix is None:  # BPE or Unigram: words begin with a marker; which one, the vocabulary says
        marker = max(("Ġ", "▁"), key=lambda m: sum(t.startswith(m) for t in tokens if t))
    starts, letters = np.zeros(vocab_size, dtype=bool), np.zeros(vocab_size, dtype=bool)
    special = np.ones(vocab_size, dtype=bool)
    special_ids = set(tokenizer.all_special_ids)
    for i, t in enumerate(tokens):
        if t is None or i in special_ids:
            continue
        special[i] = False
        if prefix is not None:
            starts[i] = not t.startswith(prefix)
            text = t if starts[i] else t[len(prefix):]
        else:
            starts[i] = t.startswith(marker)
            text = t[len(marker):] if starts[i] else t
        letters[i] = text.isalpha()
    return starts, letters, special


def word_spans(ids, starts, special, word_mask=None):
    """The words of one record: a list of (first, end) piece positions. ids: int (L,) token ids with the
    special tokens; `word_mask` (bool (L,), token classification): the data's words' first sub-tokens,
    used instead of the vocabulary's word starts. A piece after a special token always begins a word."""
    spans, first = [], None
    for j, token in enumerate(ids):
        if special[token]:
            if first is not None:
                spans.append((first, j))
            first = None
            continue
        begins = word_mask[j] if word_mask is not None else (starts[token] or first is None)
        if begins or first is None:
            if first is not None:
                spans.append((first, j))
            first = j
    if first is not None:
        spans.append((first, len(ids)))
    return spans


# ---------------------------------------------------------------------------------------------
# The masked LM: candidates for every rewritable word
# ---------------------------------------------------------------------------------------------

def load_augment_model(folder, tokenizer):
    """(model, its tokenizer): the fill-mask model of --augment-model, in float32 and eval mode. Its
    vocabulary must be the run's `tokenizer`'s: rewrites are made in the teacher's token ids. One-line
    StudentError otherwise."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer
    from pretrained import auto_class
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise StudentError(f"--augment-model {folder}: not a Hugging Face model folder ({str(e).splitlines()[0]})")
    if auto_class(config) is not AutoModelForMaskedLM:
        raise StudentError(f"--augment-model {folder} is a {(config.architectures or ['?'])[0]}, not a masked LM; pass "
                           "a fill-mask model of the teacher's tokenizer (e.g. the masked LM it was fine-tuned from)")
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
        own = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # missing or corrupt weights, no tokenizer files
        raise StudentError(f"--augment-model {folder}: cannot load it ({str(e).splitlines()[0][:200]})") from None
    base = model.base_model_prefix + "."
    if any(not k.startswith(base) for k in info["missing_keys"]):
        raise StudentError(f"--augment-model {folder} has no trained masked-LM head; pass a fill-mask model")
    if own.get_vocab() != tokenizer.get_vocab() or own.mask_token is None:
        raise StudentError(f"--augment-model {folder}: its vocabulary is not the teacher's (rewrites are made in the "
                           "teacher's tokens); pass a fill-mask model of the teacher's tokenizer, e.g. the masked LM "
                           "the teacher was fine-tuned from")
    return model.eval().requires_grad_(False), own


def _queries(examples, starts, letters, special):
    """Every rewritable word of the data: (record, first, end) rows, int64 (Q, 3), and each record's words."""
    token = examples.kind == "token_classification"
    rows, words = [], []
    for i in range(len(examples.starts)):
        span = slice(examples.starts[i], examples.starts[i] + examples.lengths[i])
        ids = examples.input_ids[span]
        spans = word_spans(ids, starts, special, examples.word_mask[span] if token else None)
        words.append(spans)
        rows += [(i, a, b) for a, b in spans if letters[ids[a:b]].all()]
    return np.array(rows, dtype=np.int64).reshape(-1, 3), words


@torch.no_grad()
def candidates(model, examples, queries, mask_id, allowed, top_k, device, autocast, batch_tokens=8192,
               progress=False):
    """The top_k candidates of each query word: int64 (Q, top_k) token ids.

    Query q = (record, first, end): the record with its pieces first..end-1 replaced by one mask token,
    through the model; only the mask's position goes through the MLM head (a forward hook cuts the
    encoder's output to those rows, as distil.forward_at_rows does), and tokens not `allowed` (bool (V,))
    are scored -inf before the top-k. Queries are batched by length (at most `batch_tokens` padded
    tokens a batch) on `device`, under `autocast`, with a tqdm bar when `progress`."""
    model.to(device)
    if len(queries) == 0:
        return np.zeros((0, top_k), dtype=np.int64)
    lengths = examples.lengths[queries[:, 0]] - (queries[:, 2] - queries[:, 1]) + 1
    order = np.argsort(lengths, kind="stable")
    blocked = torch.as_tensor(~allowed, device=device)
    out = np.zeros((len(queries), top_k), dtype=np.int64)
    pad = unwrap(model).config.pad_token_id or 0
    batches, b = [], 0
    while b < len(order):  # length-sorted: a batch's last query is its longest
        e = b + 1
        while e < len(order) and (e - b + 1) * int(lengths[order[e]]) <= batch_tokens:
            e += 1
        batches.append(order[b:e])
        b = e
    for batch in tqdm(batches, desc="augment: candidates", disable=not progress, dynamic_ncols=True):
        width = int(lengths[batch].max())
        input_ids = np.full((len(batch), width), pad, dtype=np.int64)
        token_types = np.zeros((len(batch), width), dtype=np.int64)
        attention = np.zeros((len(batch), width), dtype=np.int64)
        rows = np.zeros(len(batch), dtype=np.int64)
        for r, q in enumerate(batch):
            i, first, end = queries[q]
            start = examples.starts[i]
            ids = examples.input_ids[start:start + examples.lengths[i]]
            masked = np.concatenate([ids[:first], [mask_id], ids[end:]])
            input_ids[r, :len(masked)], attention[r, :len(masked)], rows[r] = masked, 1, r * width + first
            if examples.token_type_ids is not None:
                types = examples.token_type_ids[start:start + examples.lengths[i]]
                token_types[r, :len(masked)] = np.concatenate([types[:first + 1], types[end:]])
        logits = _logits_at(model, input_ids, attention, token_types if examples.token_type_ids is not None else None,
                            rows, device, autocast)
        out[batch] = logits.float().masked_fill(blocked, float("-inf")).topk(top_k, dim=-1).indices.cpu().numpy()
    return out


def _logits_at(model, input_ids, attention, token_types, rows, device, autocast):
    """The masked LM's logits (len(rows), V) at flat positions `rows` of a padded batch (numpy in)."""
    def keep_rows(module, args, output):
        output.last_hidden_state = at_rows(output.last_hidden_state, rows_t)
        return output
    rows_t = torch.as_tensor(rows, device=device)
    mask = torch.as_tensor(attention, device=device)
    inputs = {"input_ids": torch.as_tensor(input_ids, device=device),
              "attention_mask": prepared_mask(model, mask) if not attention.all() else None}
    if token_types is not None:
        inputs["token_type_ids"] = torch.as_tensor(token_types, device=device)
    handle = unwrap(model).base_model.register_forward_hook(keep_rows)
    try:
        with autocast():
            return model(**inputs).logits
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# Rewrites
# ---------------------------------------------------------------------------------------------

def rewrite(examples, words, queries, cands, n, seed, prob=REPLACE_PROB):
    """Algorithm 1's sampling: up to `n` rewrites of every record (see the module's docstring), from
    the candidates `cands` (int64 (Q, K)) of the `queries` (candidates()). Returns a dict of numpy
    arrays in Examples' flat layout: input_ids int32, starts and lengths int64, token_type_ids int8
    (empty without pairs), word_mask bool (empty but for token classification), and source int64 (R,):
    the record each rewrite was made from."""
    token = examples.kind == "token_classification"
    by_record = {}
    for q, (i, first, _) in enumerate(queries):
        by_record.setdefault(int(i), {})[int(first)] = q
    pieces, types, masks, lengths, source = [], [], [], [], []
    for i, spans in enumerate(words):
        at = by_record.get(i)
        if not at:  # nothing to rewrite
            continue
        start, length = examples.starts[i], examples.lengths[i]
        ids = examples.input_ids[start:start + length]
        tt = examples.token_type_ids[start:start + length] if examples.token_type_ids is not None else None
        wm = examples.word_mask[start:start + length] if token else None
        firsts = sorted(at)
        rng = np.random.default_rng([seed, i])
        seen = {ids.tobytes()}
        for _ in range(n):
            # both draws always made, for every rewritable word: the stream does not depend on the outcome
            replace = rng.random(len(firsts)) < prob
            pick = rng.integers(0, cands.shape[1], len(firsts))
            choice = {f: int(cands[at[f], k]) for f, r, k in zip(firsts, replace, pick) if r}
            keep = np.ones(length, dtype=bool)
            new = ids.astype(np.int64).copy()
            for a, b in spans:
                if a in choice:
                    new[a], keep[a + 1:b] = choice[a], False
            new = new[keep].astype(np.int32)
            if new.tobytes() in seen:  # the record itself, or a rewrite kept before (TinyBERT keeps distinct ones)
                continue
            seen.add(new.tobytes())
            pieces.append(new)
            lengths.append(len(new))
            source.append(i)
            if tt is not None:
                types.append(tt[keep])
            if token:
                masks.append(wm[keep])
    lengths = np.array(lengths, dtype=np.int64)
    cat = lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype=dtype)
    return {"input_ids": cat(pieces, np.int32), "lengths": lengths,
            "starts": np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else
            np.zeros(0, dtype=np.int64),
            "token_type_ids": cat(types, np.int8), "word_mask": cat(masks, bool),
            "source": np.array(source, dtype=np.int64)}


def with_rewrites(examples, rewrites):
    """`examples` followed by the rewrites (rewrite()'s arrays) as one Examples: record i < N is
    examples' i, then the rewrites in order. The rewrites carry no label: -100 (single-label, and every
    token for token classification) or NaN (multi-label, regression), which task_rows leaves out of the
    label rows; the teacher's soft targets teach on them (KD rows: every sequence, or every word's
    first piece). meta gains "augmented" (the number of rewrites) and counts them in "records"."""
    n_new = len(rewrites["lengths"])
    kind = examples.kind
    lengths = np.concatenate([examples.lengths, rewrites["lengths"]])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    token_type_ids = None
    if examples.token_type_ids is not None:
        token_type_ids = np.concatenate([examples.token_type_ids, rewrites["token_type_ids"].astype(np.int8)])
    word_mask, token_labels = examples.word_mask, examples.token_labels
    if kind == "token_classification":
        word_mask = np.concatenate([examples.word_mask, rewrites["word_mask"]])
        token_labels = np.concatenate([examples.token_labels, np.full(len(rewrites["input_ids"]), -100, np.int64)])
        labels = examples.labels
    elif kind == "single_label_classification":
        labels = np.concatenate([examples.labels, np.full(n_new, -100, dtype=np.int64)])
    else:
        labels = np.concatenate([examples.labels, np.full((n_new,) + examples.labels.shape[1:], np.nan, np.float32)])
    meta = {**examples.meta, "records": examples.meta["records"] + n_new, "augmented": n_new}
    return Examples(kind, np.concatenate([examples.input_ids, rewrites["input_ids"]]), starts, lengths,
                    token_type_ids, word_mask, token_labels, labels, meta)


# ---------------------------------------------------------------------------------------------
# The run's entry point: rewrites made once, cached
# ---------------------------------------------------------------------------------------------

def check_augment_flags(args, kind, teacher):
    """One-line refusals of --augment/--augment-model where they cannot work: a masked-LM or
    sentence-embedding run (TinyBERT augments a task's transfer set; a masked-LM corpus is already
    unlabelled text that the teacher reads at every position: give more text to --train instead),
    fine-tuning without a teacher (rewrites carry no label, so nothing would teach on them), a loss
    that does not read the teacher's predictions, and a task teacher without --augment-model."""
    if not args.augment:
        if args.augment_model:
            raise DataError("--augment-model without --augment N: pass --augment N (the rewrites per record)")
        return
    if kind is None or kind == "embedding":
        what = "a masked-LM run" if kind is None else "a sentence-embedding run"
        raise DataError(f"--augment rewrites a task's labelled records (TinyBERT's task stage); {what} reads "
                        "unlabelled text already: give more text to --train instead, and drop --augment")
    if teacher is None:
        raise DataError("--augment: rewrites carry no label and --task fine-tunes without a teacher, so nothing would "
                        "teach on them; pass a fine-tuned --teacher, or drop --augment")
    if not args.alpha_kd and not args.alpha_mse:
        raise DataError("--augment: rewrites carry no label and learn from the teacher's predictions alone, which "
                        "--alpha-kd 0 (and --alpha-mse 0) turn off; turn KD on, or drop --augment")
    if not args.augment_model:
        raise DataError(f"--augment needs --augment-model FOLDER: {args.teacher} is a {kind} model, not a masked LM; "
                        "pass a fill-mask model of the teacher's tokenizer (e.g. the masked LM it was fine-tuned from)")


def rewrite_key(examples, model, n, seed, top_k, prob):
    """The rewrites' cache key: the data's tokens (ids, lengths, segments, word starts), the masked LM's
    weights and config (teacher_cache.model_digest), N, the seed, K and p."""
    from teacher_cache import model_digest
    h = hashlib.sha256()
    for array in (examples.input_ids, examples.lengths, examples.token_type_ids, examples.word_mask):
        if array is not None:
            h.update(np.ascontiguousarray(array).tobytes())
    h.update(model_digest(model).encode())
    h.update(json.dumps([CACHE_VERSION, examples.kind, n, seed, top_k, prob]).encode())
    return h.hexdigest()[:20]


def load_rewrites(examples, model, tokenizer, n, seed, cache_dir, name, device, autocast, top_k=TOP_K,
                  prob=REPLACE_PROB, progress=False):
    """Up to n rewrites of every record of `examples` (rewrite()'s arrays), from the cache under
    `cache_dir` when they are there (keyed by rewrite_key), else made (candidates on `device`) and
    written. Under torchrun every rank calls this before the process group starts: the first makes
    them while the others wait on the lock, then read them. Returns (arrays, the cache file's path)."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"{name}.augment.{rewrite_key(examples, model, n, seed, top_k, prob)}")
    with file_lock(path + ".lock", wait_s=LOCK_WAIT_S):  # flock, or a soft lock where the filesystem has none
        if not os.path.exists(path + ".npz"):
            vocab = unwrap(model).get_input_embeddings().num_embeddings
            starts, letters, special = vocab_classes(tokenizer, vocab)
            queries, words = _queries(examples, starts, letters, special)
            allowed = starts & letters & ~special
            k = int(min(top_k, allowed.sum()))
            if k < 1:
                raise DataError("--augment: the vocabulary has no whole-word tokens of letters to draw candidates from")
            cands = candidates(model, examples, queries, tokenizer.mask_token_id, allowed, k, device, autocast,
                               progress=progress)
            arrays = rewrite(examples, words, queries, cands, n, seed, prob)
            tmp = unique_tmp(path)
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path + ".npz")  # complete or absent, never half-written
    z = np.load(path + ".npz")
    return {k: z[k] for k in z.files}, path + ".npz"


def augment_examples(args, examples, tokenizer, device, autocast, master):
    """The run's training examples with --augment N rewrites of each record appended (with_rewrites),
    the masked LM loaded from --augment-model, the seed --augment-seed (default --seed). Says what
    it made in one line on the master rank."""
    model, own = load_augment_model(args.augment_model, tokenizer)
    seed = args.augment_seed if args.augment_seed is not None else args.seed
    name = os.path.basename(str(args.train).rstrip("/"))
    rewrites, path = load_rewrites(examples, model, own, args.augment, seed, args.cache_dir, name, device,
                                   autocast, args.augment_top_k, args.augment_prob, progress=master and args.progress)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the masked LM's memory goes back before the student and teacher arrive
    if master:
        made = len(rewrites["lengths"])
        print(f"--augment {args.augment}: {made} rewrites of {len(np.unique(rewrites['source']))} of the "
              f"{len(examples.starts)} records (top {args.augment_top_k} of {args.augment_model}, p {args.augment_prob},"
              f" seed {seed}), without labels: the teacher alone teaches on them; {path}")
    return with_rewrites(examples, rewrites)
