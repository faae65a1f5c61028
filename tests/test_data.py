"""The data pipeline: reading the three formats, the token cache, sequences, batches and BERT's masking."""

import csv
import json
import os

import numpy as np
import pytest
from transformers import AutoTokenizer, BertTokenizer

import token_cache
from conftest import WORDS, write_bert_vocab, write_corpus
from data import collate, epoch_batches, make_batch, make_sequences, mask_spec, mask_tokens
from token_cache import DataError, load_corpus


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    return AutoTokenizer.from_pretrained(tiny_teacher)


@pytest.fixture(scope="module")
def corpus(tiny_corpus, tokenizer, tmp_path_factory):
    return load_corpus(tiny_corpus[0], tokenizer, str(tmp_path_factory.mktemp("cache")), progress=False)


def special_ids(tokenizer):
    return set(tokenizer.all_special_ids)


# ---- masking ---------------------------------------------------------------------------------

def test_masking_rates(tokenizer):
    """15% of the non-special tokens are chosen; of those 80% [MASK], 10% random, 10% unchanged."""
    spec = mask_spec(tokenizer)
    rng = np.random.default_rng(0)
    n_seqs, length = 2000, 64
    input_ids = rng.choice(spec.random_ids, size=(n_seqs, length))
    attention_mask = np.ones_like(input_ids)
    lengths = rng.integers(10, length + 1, n_seqs)
    for row, n in enumerate(lengths):  # [CLS] text [SEP] text [SEP] [PAD]...
        input_ids[row, [0, n // 2, n - 1]] = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.sep_token_id]
        input_ids[row, n:], attention_mask[row, n:] = tokenizer.pad_token_id, 0
    masked, labels = mask_tokens(input_ids, attention_mask, np.arange(n_seqs), seed=1, epoch=0, spec=spec)

    maskable = (attention_mask == 1) & ~np.isin(input_ids, spec.special_ids)
    chosen = labels != -100
    assert not (chosen & ~maskable).any()
    n_chosen = chosen.sum()
    # each sequence masks floor(0.15 m + U) tokens: the total is within a few sqrt(n_seqs) of 15%
    assert abs(n_chosen - 0.15 * maskable.sum()) < 5 * np.sqrt(n_seqs)
    assert (labels[chosen] == input_ids[chosen]).all()
    assert (masked[~chosen] == input_ids[~chosen]).all()

    n_random_ids = len(spec.random_ids)  # a random replacement may draw the original token back
    p_mask, p_random, p_same = 0.8, 0.1 * (1 - 1 / n_random_ids), 0.1 * (1 + 1 / n_random_ids)
    is_mask = masked[chosen] == tokenizer.mask_token_id
    is_same = masked[chosen] == input_ids[chosen]
    is_random = ~is_mask & ~is_same
    for observed, p in ((is_mask.mean(), p_mask), (is_random.mean(), p_random), (is_same.mean(), p_same)):
        assert abs(observed - p) < 6 * np.sqrt(p * (1 - p) / n_chosen), (observed, p)
    # the random replacements are spread over the whole non-special vocabulary
    assert len(set(masked[chosen][is_random].tolist())) > 0.9 * n_random_ids


def test_special_tokens_never_masked_nor_inserted(corpus, tokenizer):
    seqs = make_sequences(corpus, 24)
    spec = mask_spec(tokenizer, corpus, smoothing=0.7)
    specials = np.array(sorted(special_ids(tokenizer)))
    assert {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id,
            tokenizer.unk_token_id} <= set(specials.tolist())
    n_chosen = 0
    for epoch in range(3):
        for indices in epoch_batches(seqs, 16, seed=0, epoch=epoch):
            batch = make_batch(seqs, indices, tokenizer, spec, seed=0, epoch=epoch)
            original, _ = collate(seqs, indices, tokenizer)
            chosen = batch["labels"] != -100
            was_special = np.isin(original, specials)
            assert was_special[:, 0].all() and (original[:, 0] == tokenizer.cls_token_id).all()
            assert not (chosen & was_special).any()  # [CLS], inner and final [SEP] are never chosen
            assert (batch["input_ids"][was_special] == original[was_special]).all()
            inserted = batch["input_ids"][chosen & (batch["input_ids"] != tokenizer.mask_token_id)]
            assert not np.isin(inserted, specials).any()
            n_chosen += chosen.sum()
    assert n_chosen > 1000


def masked_rows(seqs, indices, tokenizer, spec, seed, epoch):
    """{sequence index: (masked ids, labels)} with the padding cut off."""
    batch = make_batch(seqs, np.asarray(indices), tokenizer, spec, seed, epoch)
    n = batch["attention_mask"].sum(1)
    return {int(i): (batch["input_ids"][r, :n[r]], batch["labels"][r, :n[r]]) for r, i in enumerate(indices)}


def test_mask_is_a_pure_function_of_seed_epoch_and_sequence(corpus, tokenizer):
    seqs = make_sequences(corpus, 32, pack=False)  # unequal lengths: each batch pads differently
    spec = mask_spec(tokenizer)
    one_rank = {}
    for indices in epoch_batches(seqs, 8, seed=3, epoch=1):
        one_rank.update(masked_rows(seqs, indices, tokenizer, spec, 3, 1))
    np.random.seed(123)  # no global RNG enters
    two_ranks = {}
    for rank in (0, 1):
        for indices in epoch_batches(seqs, 4, seed=3, epoch=1, rank=rank, world_size=2, group_by_length=True):
            two_ranks.update(masked_rows(seqs, indices, tokenizer, spec, 3, 1))
    assert one_rank.keys() == two_ranks.keys() and len(one_rank) > 200
    for i in one_rank:
        assert all(np.array_equal(a, b) for a, b in zip(one_rank[i], two_ranks[i])), i
    alone = masked_rows(seqs, [17], tokenizer, spec, 3, 1)[17]
    assert all(np.array_equal(a, b) for a, b in zip(alone, one_rank[17]))

    next_epoch = masked_rows(seqs, sorted(one_rank), tokenizer, spec, 3, 2)
    other_seed = masked_rows(seqs, sorted(one_rank), tokenizer, spec, 4, 1)
    for other in (next_epoch, other_seed):
        differ = sum(not np.array_equal(one_rank[i][1], other[i][1]) for i in one_rank)
        assert differ > 0.9 * len(one_rank)


def masking_rate(seqs, tokenizer, spec, token_id, epochs=4):
    hits = total = 0
    for epoch in range(epochs):
        for indices in epoch_batches(seqs, 32, seed=0, epoch=epoch):
            batch = make_batch(seqs, indices, tokenizer, spec, seed=0, epoch=epoch)
            original, _ = collate(seqs, indices, tokenizer)
            is_token = original == token_id if token_id is not None else ~np.isin(original, spec.special_ids)
            hits += (is_token & (batch["labels"] != -100)).sum()
            total += is_token.sum()
    return hits / total


def test_mlm_smoothing_masks_rare_tokens_more(tokenizer, tmp_path):
    rng = np.random.default_rng(0)
    rare = [w for w in WORDS if w != "the"]
    with open(tmp_path / "skewed.txt", "w") as f:
        for _ in range(300):
            f.write("the the the the " + " ".join(rng.choice(rare, 2)) + "\n")
    corpus = load_corpus(str(tmp_path / "skewed.txt"), tokenizer, str(tmp_path / "cache"), progress=False)
    seqs = make_sequences(corpus, 64)
    the = tokenizer.convert_tokens_to_ids("the")
    uniform, smoothed = mask_spec(tokenizer, corpus), mask_spec(tokenizer, corpus, smoothing=0.7)
    # uniform: "the" is masked at the overall rate; smoothed: far less often, and the rest more
    assert abs(masking_rate(seqs, tokenizer, uniform, the) - 0.15) < 0.02
    assert masking_rate(seqs, tokenizer, smoothed, the) < 0.05
    assert abs(masking_rate(seqs, tokenizer, smoothed, None) - 0.15) < 0.01  # the overall rate stays 15%


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_token_counts_in_chunks_equal_one_bincount_and_are_counted_once(dtype, tmp_path, monkeypatch):
    """Counts of a memory-mapped cache (uint16 or uint32, ids above 65535 in the latter) read in chunks
    of 64 ids, the last one short, equal np.bincount of the whole array; the counts file is written
    once and read by the next call, which does not count again."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000 if dtype == np.uint16 else 70000, size=1000).astype(dtype)
    key = str(tmp_path / "corpus.txt.0123")
    ids.tofile(key + ".tokens")
    corpus = token_cache.Corpus(np.memmap(key + ".tokens", dtype=dtype, mode="r", shape=(len(ids),)),
                         np.array([0, len(ids)]), "corpus.txt", cache_key=key)
    monkeypatch.setattr(token_cache, "CHUNK_TOKENS", 64)
    expected = np.bincount(ids.astype(np.int64), minlength=80000)
    assert np.array_equal(token_cache.token_counts(corpus, minlength=80000), expected)
    stat = os.stat(key + ".counts.npy")
    assert not os.path.exists(key + ".counts.npy.tmp")

    def no_counting(corpus):
        raise AssertionError("the corpus was counted again")
    monkeypatch.setattr(token_cache, "_count", no_counting)
    assert np.array_equal(token_cache.token_counts(corpus, minlength=80000), expected)
    assert (os.stat(key + ".counts.npy").st_mtime_ns, os.stat(key + ".counts.npy").st_ino) == \
        (stat.st_mtime_ns, stat.st_ino)
    monkeypatch.undo()
    monkeypatch.setattr(token_cache, "CHUNK_TOKENS", 64)
    in_memory = token_cache.Corpus(ids, corpus.doc_starts, "corpus.txt")  # not from a cache: counted, nothing kept
    assert np.array_equal(token_cache.token_counts(in_memory, minlength=80000), expected)


def test_corpus_digest_follows_the_tokens_not_the_file(tokenizer, tmp_path):
    """The same text at another path (another cache key) has the same digest; one word changed, another."""
    a = write_corpus(str(tmp_path / "a.txt"), 30)
    b = str(tmp_path / "b.txt")
    with open(b, "w") as f:
        f.write(open(a).read())
    cache = str(tmp_path / "cache")
    corpus_a, corpus_b = (load_corpus(p, tokenizer, cache, progress=False) for p in (a, b))
    assert corpus_a.cache_key != corpus_b.cache_key
    assert token_cache.corpus_digest(corpus_a) == token_cache.corpus_digest(corpus_b) == open(corpus_a.cache_key + ".sha256").read()
    with open(b, "w") as f:
        f.write(open(a).read().replace("cat", "dog", 1))
    assert token_cache.corpus_digest(load_corpus(b, tokenizer, cache, progress=False)) != token_cache.corpus_digest(corpus_a)


# ---- the cache -------------------------------------------------------------------------------

def cache_state(cache_dir):
    return {name: (os.stat(os.path.join(cache_dir, name)).st_mtime_ns, os.stat(os.path.join(cache_dir, name)).st_ino)
            for name in os.listdir(cache_dir) if not name.endswith(".lock")}


def test_cache_is_reused(tokenizer, tmp_path, monkeypatch):
    path = write_corpus(str(tmp_path / "train.txt"), 50)
    cache = str(tmp_path / "cache")
    first = load_corpus(path, tokenizer, cache, progress=False)
    state = cache_state(cache)
    assert state and not any(name.endswith(".tmp") for name in state)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the corpus was tokenized again")
    monkeypatch.setattr(token_cache, "_build_cache", no_tokenizing)
    second = load_corpus(path, tokenizer, cache, progress=False)
    assert cache_state(cache) == state
    assert np.array_equal(first.tokens, second.tokens) and np.array_equal(first.doc_starts, second.doc_starts)


def expected_tokens(tokenizer, documents):
    return [t for doc in documents for t in tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]]


def test_cache_rebuilt_when_the_file_changes(tokenizer, tmp_path):
    path, cache = tmp_path / "train.txt", str(tmp_path / "cache")
    path.write_text("the cat sat on a mat\nthe dog ran to the park\n")
    assert load_corpus(str(path), tokenizer, cache, progress=False).tokens.tolist() == \
        expected_tokens(tokenizer, ["the cat sat on a mat", "the dog ran to the park"])
    stat = os.stat(path)
    path.write_text("the cat sat on a mat\nthe big ran to the park\n")  # same size...
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))           # ...and same modification time
    assert load_corpus(str(path), tokenizer, cache, progress=False).tokens.tolist() == \
        expected_tokens(tokenizer, ["the cat sat on a mat", "the big ran to the park"])


def test_cache_rebuilt_when_the_tokenizer_changes(tokenizer, tmp_path):
    path, cache = tmp_path / "train.txt", str(tmp_path / "cache")
    path.write_text("the cat sat on a mat\n")
    before = load_corpus(str(path), tokenizer, cache, progress=False)
    write_bert_vocab(str(tmp_path / "vocab.txt"), [w for w in WORDS if w != "cat"])
    other = BertTokenizer(vocab=str(tmp_path / "vocab.txt"))  # "cat" becomes c ##a ##t
    after = load_corpus(str(path), other, cache, progress=False)
    assert after.tokens.tolist() == expected_tokens(other, ["the cat sat on a mat"])
    assert len(after.tokens) == len(before.tokens) + 2
    assert load_corpus(str(path), tokenizer, cache, progress=False).tokens.tolist() == before.tokens.tolist()


def test_seq_len_cuts_the_cached_documents_anew(corpus):
    stream = np.asarray(corpus.tokens)
    for seq_len in (16, 40):
        seqs = make_sequences(corpus, seq_len)
        assert seqs.lengths.max() == seq_len - 2
        content = np.concatenate([stream[s:s + n] for s, n in zip(seqs.starts, seqs.lengths)])
        assert np.array_equal(content, stream)
    assert len(make_sequences(corpus, 16).starts) > len(make_sequences(corpus, 40).starts)


def test_uint16_cache_for_a_small_vocabulary(corpus, tokenizer):
    assert corpus.tokens.dtype == np.uint16
    assert int(corpus.tokens.max()) < len(tokenizer)


# ---- formats and sequences -------------------------------------------------------------------

DOCS = ["the cat sat on a mat, and the dog ran.", 'the old man said "every day" to a bird',
        "a small green park near the river", "blue sky"]


def test_three_formats_give_the_same_tokens(tokenizer, tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(DOCS) + "\n\n")
    with open(tmp_path / "c.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows([i, doc] for i, doc in enumerate(DOCS))
    with open(tmp_path / "other.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["body", "label"])
        writer.writerows([doc, i] for i, doc in enumerate(DOCS))
    with open(tmp_path / "c.jsonl", "w") as f:
        f.writelines(json.dumps({"id": i, "text": doc}) + "\n" for i, doc in enumerate(DOCS))
    with open(tmp_path / "bom.csv", "w", encoding="utf-8-sig", newline="") as f:  # as Excel writes it
        f.write("text,id\n" + "".join(f'"{doc.replace(chr(34), 2 * chr(34))}",{i}\n' for i, doc in enumerate(DOCS)))
    with open(tmp_path / "bom.jsonl", "w", encoding="utf-8-sig") as f:
        f.writelines(json.dumps({"text": doc}) + "\n" for doc in DOCS)
    cache = str(tmp_path / "cache")
    expected = expected_tokens(tokenizer, DOCS)
    for name, column in (("c.txt", "text"), ("c.csv", "text"), ("other.csv", "body"), ("c.jsonl", "text"),
                         ("bom.csv", "text"), ("bom.jsonl", "text")):
        corpus = load_corpus(str(tmp_path / name), tokenizer, cache, text_column=column, progress=False)
        assert corpus.tokens.tolist() == expected, name
        assert len(corpus.doc_starts) == len(DOCS) + 1, name


def test_long_document_split_without_packing(tokenizer, tmp_path):
    long_doc = " ".join(WORDS * 3)
    (tmp_path / "long.txt").write_text(f"the cat sat\n{long_doc}\nthe dog ran\n")
    corpus = load_corpus(str(tmp_path / "long.txt"), tokenizer, str(tmp_path / "cache"), progress=False)
    seq_len = 16
    seqs = make_sequences(corpus, seq_len, pack=False)
    long_ids = tokenizer(long_doc, add_special_tokens=False)["input_ids"]
    assert len(seqs.starts) == 2 + -(-len(long_ids) // (seq_len - 2))
    input_ids, attention_mask = collate(seqs, np.arange(len(seqs.starts)), tokenizer)
    pieces = []
    for row, mask in zip(input_ids, attention_mask):
        n = mask.sum()
        assert n <= seq_len and row[0] == tokenizer.cls_token_id and row[n - 1] == tokenizer.sep_token_id
        assert (row[n:] == tokenizer.pad_token_id).all()
        assert tokenizer.sep_token_id not in row[1:n - 1]  # one document per sequence
        pieces.append(row[1:n - 1].tolist())
    assert pieces[0] == tokenizer("the cat sat", add_special_tokens=False)["input_ids"]
    assert sum(pieces[1:-1], []) == long_ids
    assert pieces[-1] == tokenizer("the dog ran", add_special_tokens=False)["input_ids"]


def test_packing_fills_every_sequence_but_the_last(corpus, tokenizer):
    seq_len = 24
    seqs = make_sequences(corpus, seq_len)
    input_ids, attention_mask = collate(seqs, np.arange(len(seqs.starts)), tokenizer)
    n = attention_mask.sum(1)
    assert (n[:-1] == seq_len).all() and 3 <= n[-1] <= seq_len
    assert (input_ids[:, 0] == tokenizer.cls_token_id).all()
    assert (input_ids[np.arange(len(n)), n - 1] == tokenizer.sep_token_id).all()
    assert input_ids.shape[1] == seq_len


def test_rank_shards_together_make_the_one_rank_batches(corpus):
    seqs = make_sequences(corpus, 16)
    for epoch in (0, 1):
        one = epoch_batches(seqs, 8, seed=5, epoch=epoch)
        shards = [epoch_batches(seqs, 4, seed=5, epoch=epoch, rank=r, world_size=2) for r in (0, 1)]
        assert len(one) == len(shards[0]) == len(shards[1]) > 10
        for b in range(len(one)):
            assert sorted(np.concatenate([shards[0][b], shards[1][b]]).tolist()) == sorted(one[b].tolist())
        assert not set(np.concatenate(shards[0]).tolist()) & set(np.concatenate(shards[1]).tolist())
    first, second = epoch_batches(seqs, 8, seed=5, epoch=0), epoch_batches(seqs, 8, seed=5, epoch=1)
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))  # reshuffled every epoch


# ---- bad input -------------------------------------------------------------------------------

BAD_INPUTS = {
    "missing": (None, "no such file"),
    "empty": (b"", "is empty"),
    "blank": (b"\n  \n\n", "holds no text"),
    "binary": (b"the cat\x00\x01\x02 sat\n", "binary"),
    "latin1": ("the caf\u00e9 sat\n".encode("latin-1"), "not UTF-8"),
    "nocolumn": (b"body,label\nthe cat sat,1\n", "no column 'text'"),
    "badjson": (b'{"text": "the cat"}\n{"text": "a dog"}\n{"text": oops}\n', "line 3"),
    "nofield": (b'{"text": "the cat"}\n{"body": "a dog"}\n', "line 2 has no field 'text' (found: body)"),
    "short": (b"the cat\nthe dog\n", "shorter than --min-tokens"),
    "parquet": (b"PAR1", "unsupported"),
}
EXTENSIONS = {"nocolumn": ".csv", "badjson": ".jsonl", "nofield": ".jsonl", "parquet": ".parquet"}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_data_error(case, tokenizer, tmp_path):
    content, words = BAD_INPUTS[case]
    path = tmp_path / f"{case}{EXTENSIONS.get(case, '.txt')}"
    if content is not None:
        path.write_bytes(content)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        load_corpus(str(path), tokenizer, str(cache), min_tokens=10 if case == "short" else 1, progress=False)
    message = str(info.value)
    assert words in message and path.name in message and "\n" not in message, message
    # nothing that a later run could take for a finished cache, and no half-written files
    left = [name for name in os.listdir(cache) if not name.endswith(".lock")] if cache.exists() else []
    assert left == [], left


# ---- structured input: never a silent merge or drop (issue 12, items 3 and 4) ----------------

def rows_csv(path, rows, header="id,text"):
    path.write_text(header + "\n" + "".join(row + "\n" for row in rows))
    return str(path)


def read_error(path, tokenizer, tmp_path, **kwargs):
    with pytest.raises(DataError) as info:
        load_corpus(path, tokenizer, str(tmp_path / "cache"), progress=False, **kwargs)
    message = str(info.value)
    assert "\n" not in message and os.path.basename(path) in message, message
    return message


@pytest.mark.parametrize("later_rows_quoted", [False, True])
def test_csv_unclosed_quote_names_its_line(later_rows_quoted, tokenizer, tmp_path):
    """1000 rows, row 3 (line 4) opens a quote it never closes: it would swallow the rows after it."""
    rows = [f'{i},"the cat sat {i}"' if later_rows_quoted else f"{i},the cat sat {i}" for i in range(1000)]
    rows[2] = '2,"the dog ran'
    message = read_error(rows_csv(tmp_path / "c.csv", rows), tokenizer, tmp_path)
    assert "line 4: malformed CSV" in message and "quote opened on line 4" in message, message
    assert ("runs to line 5 " if later_rows_quoted else "runs to line 1001 ") in message, message


@pytest.mark.parametrize("rows,header,words", [
    (["0,the cat", "1,the dog, and a bird", "2,a mat"], "id,text", ["line 3: 3 fields where the header has 2"]),
    (["0,the cat,1", "1,the dog", "2,a mat,0"], "id,text,label", ["line 3: 2 fields where the header has 3"]),
    (['0,"the cat" sat', "1,the dog"], "id,text", ["line 2: malformed CSV", "double the quotes"]),
    (['0,"the cat\nsat on",1,2', "1,the dog,0"], "id,text,label", ["lines 2-3: 4 fields where the header has 3"]),
    (["0,the cat"], "text,text", ["2 columns are named 'text'"]),
], ids=["extra field", "missing field", "text after a closing quote", "multi-line record of too many fields",
        "two text columns"])
def test_csv_records_with_the_wrong_shape_are_refused(rows, header, words, tokenizer, tmp_path):
    message = read_error(rows_csv(tmp_path / "c.csv", rows, header), tokenizer, tmp_path)
    for word in words:
        assert word in message, message


def test_csv_quoted_line_breaks_are_one_document_and_counted(tokenizer, tmp_path):
    """RFC 4180: a quoted field may hold line breaks (a document of paragraphs) and doubled quotes."""
    path = rows_csv(tmp_path / "c.csv", ['0,"the cat sat.\n\nthe dog ran."', '1,"the old man said ""hi"""',
                                         '2,he said "hi" to a bird', "3,", '4,"a mat\non\nthe\nmat"', "5,  "])
    counts = {}
    texts = [text for text, _ in token_cache.read_documents(path, counts=counts)]
    assert texts == ["the cat sat.\n\nthe dog ran.", 'the old man said "hi"', 'he said "hi" to a bird',
                     "a mat\non\nthe\nmat"]
    assert counts == {"skipped": 2, "multiline": 2, "longest": (8, 11)}
    corpus = load_corpus(path, tokenizer, str(tmp_path / "cache"), progress=False)
    assert len(corpus.doc_starts) == 5
    assert (corpus.meta["n_docs_skipped"], corpus.meta["n_records_multiline"]) == (2, 2)
    assert token_cache.corpus_note(corpus) == ("c.csv: 4 documents kept; 2 empty or null texts skipped; 2 records span "
                                        "several lines (quoted line breaks; the longest: lines 8-11)")


def test_jsonl_null_and_empty_texts_are_skipped_and_counted(tokenizer, tmp_path):
    lines = [{"id": 0, "text": "the cat sat"}, {"id": 1, "text": None}, {"id": 2, "text": ""},
             {"id": 3, "text": "  \n "}, {"id": 4, "text": "the dog ran"}]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    corpus = load_corpus(str(path), tokenizer, str(tmp_path / "cache"), progress=False)
    assert corpus.tokens.tolist() == expected_tokens(tokenizer, ["the cat sat", "the dog ran"])
    assert corpus.meta["n_docs_skipped"] == 3
    assert token_cache.corpus_note(corpus) == "c.jsonl: 2 documents kept; 3 empty or null texts skipped"
    # a clean file has nothing to say
    path.write_text(json.dumps({"text": "the cat sat"}) + "\n")
    assert token_cache.corpus_note(load_corpus(str(path), tokenizer, str(tmp_path / "cache"), progress=False)) is None
    # only nulls: no text at all, and the message says why
    path.write_text('{"text": null}\n{"text": ""}\n')
    assert "holds no text (only blank lines or empty fields (2 empty or null texts))" in \
        read_error(str(path), tokenizer, tmp_path)


@pytest.mark.parametrize("line,words", [
    ('{"id": 7, "body": "a dog"}', "line 2 has no field 'text' (found: id, body); pass --text-column"),
    ("{}", "line 2 has no field 'text' (found: none)"),
    ('{"text": 5}', "line 2: field 'text' holds a JSON number (5), not a string"),
    ('{"text": true}', "line 2: field 'text' holds a JSON boolean (true), not a string"),
    ('{"text": ["the", "cat"]}', "line 2: field 'text' holds a JSON array ([\"the\", \"cat\"]), not a string"),
    ('{"text": {"en": "cat"}}', "line 2: field 'text' holds a JSON object"),
    ('["the cat"]', "line 2 holds a JSON array, not an object"),
    ('"the cat"', "line 2 holds a JSON string, not an object"),
], ids=["missing field", "empty object", "number", "boolean", "array", "object", "array line", "string line"])
def test_jsonl_bad_records_name_line_field_and_type(line, words, tokenizer, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "the cat sat"}\n' + line + "\n")
    assert words in read_error(str(path), tokenizer, tmp_path)


def test_train_says_what_reading_skipped(tiny_teacher, tmp_path, capsys):
    import train
    path = tmp_path / "c.jsonl"
    texts = [" ".join((WORDS * 2)[i:i + 12]) for i in range(40)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" + '{"text": null}\n' for t in texts))
    assert train.main(["--teacher", tiny_teacher, "--train", str(path), "--out", str(tmp_path / "out"),
                       "--cache-dir", str(tmp_path / "cache"), "--seq-len", "16", "--batch-size", "4",
                       "--max-steps", "1", "--no-progress", "--dtype", "fp32"]) == 1
    assert "c.jsonl: 40 documents kept; 40 empty or null texts skipped" in capsys.readouterr().out
