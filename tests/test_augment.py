"""TinyBERT's data augmentation (augment.py) and the teacher's logits computed once (teacher_cache.py).

Tiny and offline, as tests/test_tasks.py: task teachers and a masked LM built from configs over the
same WordPiece vocabulary (in which "catdog" is split into cat ##d ##o ##g), labelled files written here.
"""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import augment
import teacher_cache
from conftest import WORDS, make_bert_teacher, write_bert_vocab
from distil import DistilConfig
from losses import cross_entropy_loss
from precision import autocast_for
from student import StudentError
from tasks import load_examples, task_batch, task_step
from test_tasks import (MULTI, SINGLE, TAGS, TOKEN, load_tok, make_task_teacher, metrics, multi_label_jsonl,
                        run_main, sentences, single_label_csv, to_tensors, token_jsonl, write_csv)
from token_cache import DataError
import test_sync

task_setup = test_sync.task_setup  # test_sync's tiny task teacher and texts, a module fixture here too
CPU = torch.device("cpu")
FP32 = autocast_for(CPU, torch.float32)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment_models")
    return {SINGLE: make_task_teacher(str(root / "single"), SINGLE, **NO_DROPOUT),
            TOKEN: make_task_teacher(str(root / "token"), TOKEN, labels=TAGS, **NO_DROPOUT),
            MULTI: make_task_teacher(str(root / "multi"), MULTI, labels=("cat", "dog", "bird"), **NO_DROPOUT),
            "other": make_task_teacher(str(root / "other"), SINGLE, seed=1, **NO_DROPOUT),
            "mlm": make_bert_teacher(str(root / "mlm"), n_layers=2, **NO_DROPOUT)}


def examples_of(path, teacher_folder, tmp_path, kind=SINGLE, labels=("neg", "pos"), seq_len=32, tokenizer=None,
                **columns):
    tokenizer = tokenizer or load_tok(teacher_folder)
    return load_examples(str(path), tokenizer, kind, dict(enumerate(labels)), seq_len, str(tmp_path / "cache"),
                         columns.get("text", "tokens" if kind == TOKEN else "text"),
                         columns.get("label", "ner_tags" if kind == TOKEN else "label"))


def other_vocabulary(folder):
    """`folder`'s tokenizer replaced by one of as many words, two of them new and first in id order: every
    later id moves by two."""
    from transformers import BertTokenizer
    words = ["aardvark", "abacus"] + [w for w in WORDS if w not in ("warm", "was")]
    write_bert_vocab(os.path.join(folder, "vocab.txt"), words)
    os.remove(os.path.join(folder, "tokenizer.json"))
    BertTokenizer(vocab=os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    return folder


def rewrites_of(examples, models, cache, n=3, seed=0, prob=augment.REPLACE_PROB):
    model, own = augment.load_augment_model(models["mlm"], load_tok(models["mlm"]))
    return augment.load_rewrites(examples, model, own, n, seed, str(cache), "t", CPU, FP32, prob=prob)[0]


def record(arrays, r):
    return arrays["input_ids"][arrays["starts"][r]:arrays["starts"][r] + arrays["lengths"][r]]


# ---------------------------------------------------------------------------------------------
# 1. Rewrites
# ---------------------------------------------------------------------------------------------

def test_rewrites_are_deterministic_by_seed(models, tmp_path):
    ex = examples_of(single_label_csv(tmp_path / "t.csv", 24, 1), models[SINGLE], tmp_path)
    a = rewrites_of(ex, models, tmp_path / "a", seed=1)
    b = rewrites_of(ex, models, tmp_path / "b", seed=1)  # another cache: made again, the same
    c = rewrites_of(ex, models, tmp_path / "c", seed=2)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["input_ids"], c["input_ids"]) or not np.array_equal(a["source"], c["source"])
    assert 0 < len(a["lengths"]) <= 3 * 24
    for r, i in enumerate(a["source"]):  # each rewrite differs from its record, keeps its frame, one word for one
        old, new = ex.input_ids[ex.starts[i]:ex.starts[i] + ex.lengths[i]], record(a, r)
        assert not np.array_equal(old, new) and len(new) == len(old)  # (no word of this data has two pieces)
        assert new[0] == old[0] and new[-1] == old[-1]  # [CLS] ... [SEP]
    # distinct rewrites of each record, as TinyBERT keeps them
    for i in np.unique(a["source"]):
        rows = [record(a, r).tobytes() for r in np.flatnonzero(a["source"] == i)]
        assert len(rows) == len(set(rows))


def test_words_of_several_pieces_are_masked_whole(models, tmp_path):
    tokenizer = load_tok(models[SINGLE])
    assert tokenizer.tokenize("catdog") == ["cat", "##d", "##o", "##g"]
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [("catdog sat on a mat", "pos"), ("the dog ran", "neg")])
    ex = examples_of(path, models[SINGLE], tmp_path)
    arrays = rewrites_of(ex, models, tmp_path / "c", n=2, prob=1.0)  # every word replaced
    first = np.flatnonzero(arrays["source"] == 0)
    assert len(first) >= 1
    for r in first:  # five words, each now one whole-word piece: [CLS] + 5 + [SEP]
        new = tokenizer.convert_ids_to_tokens(record(arrays, r).tolist())
        assert len(new) == 7 and not any(t.startswith("##") for t in new[1:-1])
        assert all(t.isalpha() for t in new[1:-1])  # candidates: whole words of letters only


def test_rewrites_carry_no_label_and_the_label_loss_does_not_read_them(models, tmp_path):
    ex = examples_of(single_label_csv(tmp_path / "t.csv", 16, 1), models[SINGLE], tmp_path)
    both = augment.with_rewrites(ex, rewrites_of(ex, models, tmp_path / "c"))
    n = len(ex.starts)
    assert len(both.starts) > n and (both.labels[n:] == -100).all() and np.array_equal(both.labels[:n], ex.labels)
    assert both.meta["augmented"] == len(both.starts) - n and both.meta["labelled"] == ex.meta["labelled"]
    student = tasks_model(models[SINGLE])
    cfg = DistilConfig(alpha_kd=0.0, alpha_mlm=0.0, alpha_cos=0.0, alpha_label=1.0)
    originals, mixed = np.arange(4), np.array([0, n, 1, n + 1, 2, n + 2, 3])
    rewrites_only = to_tensors(task_batch(both, np.arange(n, n + 4), 0))
    assert len(rewrites_only["label_rows"]) == 0 and len(rewrites_only["kd_rows"]) == 4
    with torch.no_grad():
        alone = task_step(student, None, to_tensors(task_batch(both, originals, 0)), cfg, SINGLE)[1]["label"]
        with_rewrites = task_step(student, None, to_tensors(task_batch(both, mixed, 0)), cfg, SINGLE)[1]["label"]
        expected = cross_entropy_loss(student(**{k: torch.as_tensor(v) for k, v in task_batch(
            both, originals, 0).items() if k in ("input_ids", "attention_mask")}).logits, torch.as_tensor(ex.labels[:4]), 4)
    torch.testing.assert_close(with_rewrites, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone, expected, rtol=1e-5, atol=1e-6)


def tasks_model(folder):
    from transformers import AutoModelForSequenceClassification
    return AutoModelForSequenceClassification.from_pretrained(folder).eval()


def test_multi_label_rewrites_are_unlabelled(models, tmp_path):
    ex = examples_of(multi_label_jsonl(tmp_path / "m.jsonl", 12, 1), models[MULTI], tmp_path, MULTI,
                     ("cat", "dog", "bird"))
    both = augment.with_rewrites(ex, rewrites_of(ex, models, tmp_path / "c"))
    n = len(ex.starts)
    assert np.isnan(both.labels[n:]).all() and both.labels.shape[1] == 3
    assert len(task_batch(both, np.arange(n, len(both.starts)), 0)["label_rows"]) == 0


def test_token_classification_rewrites_keep_every_word(models, tmp_path):
    ex = examples_of(token_jsonl(tmp_path / "t.jsonl", 12, 1), models[TOKEN], tmp_path, TOKEN, TAGS)
    arrays = rewrites_of(ex, models, tmp_path / "c")
    both = augment.with_rewrites(ex, arrays)
    n = len(ex.starts)
    for r, i in enumerate(arrays["source"]):
        old = ex.word_mask[ex.starts[i]:ex.starts[i] + ex.lengths[i]]
        new = both.word_mask[both.starts[n + r]:both.starts[n + r] + both.lengths[n + r]]
        assert old.sum() == new.sum()  # one word for one: the teacher's per-word rows stay aligned
    assert (both.token_labels[both.starts[n]:] == -100).all()
    batch = task_batch(both, np.arange(n, len(both.starts)), 0)
    assert len(batch["label_rows"]) == 0 and len(batch["kd_rows"]) == batch["word_mask"].sum() > 0


def test_rewrites_are_cached_and_reused(models, tmp_path, monkeypatch):
    ex = examples_of(single_label_csv(tmp_path / "t.csv", 16, 1), models[SINGLE], tmp_path)
    first = rewrites_of(ex, models, tmp_path / "c", seed=3)

    def no_model(*args, **kwargs):
        raise AssertionError("the masked LM ran again: the cached rewrites were not reused")
    monkeypatch.setattr(augment, "candidates", no_model)
    again = rewrites_of(ex, models, tmp_path / "c", seed=3)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    with pytest.raises(AssertionError, match="ran again"):  # another N is another cache
        rewrites_of(ex, models, tmp_path / "c", n=2, seed=3)


def test_augment_model_must_be_a_masked_lm_of_the_teachers_vocabulary(models, tmp_path):
    tokenizer = load_tok(models[SINGLE])
    with pytest.raises(StudentError, match="not a masked LM"):
        augment.load_augment_model(models[SINGLE], tokenizer)
    other = str(tmp_path / "other_vocab")
    other_vocabulary(make_bert_teacher(other, n_layers=1))
    with pytest.raises(StudentError, match="vocabulary is not the teacher's"):
        augment.load_augment_model(other, tokenizer)


# ---------------------------------------------------------------------------------------------
# 2. The teacher's logits, computed once
# ---------------------------------------------------------------------------------------------

def cache_args(tmp_path, train="t.csv", **extra):
    return SimpleNamespace(dtype="fp32", train=str(train), cache_dir=str(tmp_path / "logits"), batch_size=5,
                           progress=False, **extra)


def cached_logits(teacher, ex, tmp_path, pad_id=0):
    return teacher_cache.teacher_logits_for_run(cache_args(tmp_path), teacher, ex, pad_id, CPU, FP32, False)


@pytest.mark.parametrize("kind", [SINGLE, MULTI, TOKEN])
def test_cached_teacher_gives_the_live_teachers_losses(models, tmp_path, kind):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    auto = AutoModelForTokenClassification if kind == TOKEN else AutoModelForSequenceClassification
    labels = {SINGLE: ("neg", "pos"), MULTI: ("cat", "dog", "bird"), TOKEN: TAGS}[kind]
    path = {SINGLE: lambda: single_label_csv(tmp_path / "t.csv", 20, 1),
            MULTI: lambda: multi_label_jsonl(tmp_path / "t.jsonl", 20, 1),
            TOKEN: lambda: token_jsonl(tmp_path / "t.jsonl", 20, 1)}[kind]()
    ex = examples_of(path, models[kind], tmp_path, kind, labels)
    ex = augment.with_rewrites(ex, rewrites_of(ex, models, tmp_path / "c", n=2))
    teacher = auto.from_pretrained(models[kind]).eval()
    torch.manual_seed(5)
    student = auto.from_pretrained(models[kind]).eval()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a student that is not the teacher: KD is not zero
    logits = cached_logits(teacher, ex, tmp_path)
    cfg = DistilConfig(alpha_kd=0.5, alpha_mlm=0.0, alpha_cos=0.0, alpha_mse=0.3, alpha_label=0.5)
    indices = np.array([3, len(ex.starts) - 1, 0, 7, len(ex.starts) - 2, 11])  # records and rewrites, any order
    live = to_tensors(task_batch(ex, indices, 0))
    from_cache = to_tensors(task_batch(ex, indices, 0, logits))
    assert from_cache["teacher_logits"].shape == (len(live["kd_rows"]), len(labels))
    with torch.no_grad():
        a = task_step(student, teacher, live, cfg, kind)
        b = task_step(student, None, from_cache, cfg, kind)  # no teacher: the cache alone
    assert a[1].keys() == b[1].keys() and {"kd", "mse", "label"} <= set(a[1])
    for k in a[1]:
        torch.testing.assert_close(b[1][k], a[1][k], rtol=1e-5, atol=1e-6)
    assert a[1]["kd"] > 0


def test_teacher_cache_is_keyed_by_teacher_data_and_tokens(models, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification
    teacher = AutoModelForSequenceClassification.from_pretrained(models[SINGLE]).eval()
    rows = [(t + " " + t, "pos") for t in sentences(12, 1, low=8, high=12)]  # long enough to be cut below
    path = write_csv(tmp_path / "t.csv", ["text", "label"], rows)
    ex = examples_of(path, models[SINGLE], tmp_path)
    first = cached_logits(teacher, ex, tmp_path).path
    calls = []
    real = teacher_cache.compute_logits
    monkeypatch.setattr(teacher_cache, "compute_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert cached_logits(teacher, ex, tmp_path).path == first and not calls  # the same: reused, not computed
    other_teacher = AutoModelForSequenceClassification.from_pretrained(models["other"]).eval()
    moved = AutoModelForSequenceClassification.from_pretrained(models[SINGLE]).eval()
    with torch.no_grad():
        moved.classifier.bias[0] += 1e-3  # one weight changed
    other_data = examples_of(write_csv(tmp_path / "u.csv", ["text", "label"], rows[:-1]), models[SINGLE], tmp_path)
    shorter = examples_of(path, models[SINGLE], tmp_path, seq_len=12)
    assert shorter.meta["truncated"] > 0
    reordered = str(tmp_path / "reordered")
    other_vocabulary(make_task_teacher(reordered, SINGLE, **NO_DROPOUT))  # as many tokens, other ids
    other_tokens = examples_of(path, models[SINGLE], tmp_path, tokenizer=load_tok(reordered))
    assert not np.array_equal(other_tokens.input_ids, ex.input_ids)
    keys = {first}
    for model, examples in ((other_teacher, ex), (moved, ex), (teacher, other_data), (teacher, shorter),
                            (teacher, other_tokens)):
        keys.add(cached_logits(model, examples, tmp_path).path)
    assert len(keys) == 6 and len(calls) == 5
    stored = np.load(first)
    assert stored.dtype == np.float32 and stored.shape == (12, 2)


def test_bf16_logits_are_stored_as_their_bits(models, tmp_path):
    from transformers import AutoModelForSequenceClassification
    teacher = AutoModelForSequenceClassification.from_pretrained(models[SINGLE]).eval()
    ex = examples_of(single_label_csv(tmp_path / "t.csv", 8, 1), models[SINGLE], tmp_path)
    args = cache_args(tmp_path)
    args.dtype = "bf16"
    logits = teacher_cache.teacher_logits_for_run(args, teacher, ex, 0, CPU, autocast_for(CPU, torch.bfloat16), False)
    batch = to_tensors(task_batch(ex, np.arange(4), 0, logits))
    assert batch["teacher_logits"].dtype == torch.int16
    values = teacher_cache.as_logits(batch["teacher_logits"])
    assert values.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        live = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    torch.testing.assert_close(values.float(), live.float(), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# 3. train.py: refusals, and a run end to end
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment_data")
    return single_label_csv(root / "train.csv", 48, 1), single_label_csv(root / "valid.csv", 16, 2)


@pytest.mark.parametrize("flags,error,match", [
    (["--teacher-cache", "--alpha-cos", "1"], DataError, "--alpha-cos read its hidden states"),
    (["--teacher-cache", "--alpha-hidden", "1"], DataError, "--alpha-hidden read its hidden states"),
    (["--teacher-cache", "--alpha-kd", "0", "--alpha-label", "1"], DataError, "no loss reads the teacher's logits"),
    (["--augment", "2"], DataError, "--augment needs --augment-model"),
    (["--augment-model", "X"], DataError, "without --augment N"),
    (["--augment", "2", "--augment-model", "MLM", "--alpha-kd", "0", "--alpha-label", "1"], DataError,
     "learn from the teacher's predictions alone"),
])
def test_task_runs_refuse_in_one_line(models, rt, tmp_path, flags, error, match):
    flags = [models["mlm"] if f == "MLM" else f for f in flags]
    with pytest.raises(error, match=match) as e:
        run_main(tmp_path, "refused", *flags, teacher=models[SINGLE], train=rt[0])
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "refused" / "metrics.jsonl")


@pytest.mark.parametrize("flag", ["--augment", "--teacher-cache"])
def test_masked_lm_runs_refuse_augment_and_teacher_cache(models, tiny_corpus, tmp_path, flag):
    flags = ["--augment", "2", "--augment-model", models["mlm"]] if flag == "--augment" else [flag]
    with pytest.raises(DataError, match="masked-LM") as e:
        run_main(tmp_path, "mlm", *flags, teacher=models["mlm"], train=tiny_corpus[0])
    assert "\n" not in str(e.value)


def test_augmented_run_with_teacher_cache_end_to_end(models, rt, tmp_path, capsys):
    from transformers import pipeline
    out = run_main(tmp_path, "augmented", "--augment", "2", "--augment-model", models["mlm"], "--teacher-cache",
                   teacher=models[SINGLE], train=rt[0], valid=rt[1], eval_every=3)
    said = capsys.readouterr().out
    assert "--augment 2:" in said and "rewrites" in said and "--teacher-cache: the teacher's logits of" in said
    records = metrics(out)
    losses = [r for r in records if "loss" in r]
    assert len(losses) == 6 and all(np.isfinite(r["loss"]) and "kd" in r and "label" in r for r in losses)
    assert any("valid_accuracy" in r for r in records)
    classify = pipeline("text-classification", model=out)
    assert classify("the cat sat on a mat")[0]["label"] in ("neg", "pos")
    cache = os.listdir(tmp_path / "cache")
    assert any(".augment." in f for f in cache) and any(".logits." in f and f.endswith(".npy") for f in cache)
    # the same run again reads both caches: the masked LM and the teacher's precomputation do not run
    run_main(tmp_path, "again", "--augment", "2", "--augment-model", models["mlm"], "--teacher-cache",
             teacher=models[SINGLE], train=rt[0])
    assert "read from" in capsys.readouterr().out


def test_two_ranks_equal_one_with_augment_and_teacher_cache(models, rt, tmp_path):
    from test_resume import flags, ok, run, weights
    base = dict(teacher=models[SINGLE], train=rt[0], cache_dir=str(tmp_path / "c"), seq_len=32, max_steps=4,
                dtype="fp32", log_every=1, no_progress=True, augment=2, augment_model=models["mlm"],
                teacher_cache=True)
    two = ok(run(flags(base, out=str(tmp_path / "two"), batch_size=4), nproc=2))
    assert two.stdout.count("--teacher-cache: the teacher's logits of") == 1  # said by rank 0 only
    ok(run(flags(base, out=str(tmp_path / "one"), batch_size=8)))
    one, theirs = weights(str(tmp_path / "one")), weights(str(tmp_path / "two"))
    assert theirs.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(theirs[k], one[k], rtol=1e-5, atol=1e-5 * max(1.0, one[k].abs().max().item()))
    logits = [f for f in os.listdir(tmp_path / "c") if f.endswith(".npy")]
    assert len(logits) == 1  # both ranks, then the one-rank run, read the one file


def test_a_cached_teacher_step_reads_nothing_back(task_setup):
    """The cached rows come with the batch (gathered on the host when it is built): the step indexes
    nothing on the device, and a step that does not log reads nothing back, as with the live teacher."""
    from test_sync import count_reads, reads_per_step
    base, folder = task_setup  # computed once first, so that the runs compared all read the cache
    count_reads(base + ["--out", str(folder / "cached-warm-up"), "--max-steps", "1", "--teacher-cache"])
    one = reads_per_step(task_setup, "cached-accum1", "--teacher-cache")
    assert one == {}, one
    four = reads_per_step(task_setup, "cached-accum4", "--teacher-cache", "--grad-accum", "4")
    assert four == {}, four


def test_checkpoints_from_before_the_flags_resume():
    """A run.json or checkpoint written before --augment and --teacher-cache existed has none of their
    keys: resuming it with them off is the same run; other rewrites are refused as another corpus."""
    from checkpoint import CheckpointError, check_same_corpus, config_differences
    old = {"lr": 5e-5, "train_corpus": {"tokens": 10, "sequences": 2, "sha256": "a"}}
    new = {**old, "augment": 0, "augment_model": None, "augment_seed": None, "augment_top_k": 15,
           "augment_prob": 0.4, "teacher_cache": False}
    assert config_differences(old, new) == []
    augmented = {**new, "augment": 2, "train_corpus": {"tokens": 18, "sequences": 4, "sha256": "b"}}
    with pytest.raises(CheckpointError, match="training corpus"):
        check_same_corpus(new, augmented, "step-1.pt")
