"""Task distillation: a teacher fine-tuned for sequence or token classification teaches a student on
labelled data (tasks.py, tasks.task_rows / task_step, the task losses, train.py's task runs).

Everything is tiny and offline: BERT-family task models built from configs (hidden 32, 2 layers, 64
positions), a WordPiece vocabulary in which "catdog" is split into cat ##d ##o ##g, and labelled
.csv/.jsonl files written here. The losses and metrics are checked against closed forms and
against sklearn, scipy and seqeval; train.py end to end for every kind of task, for resume and for
two ranks, and for every family that has a sequence-classification head.
"""

import csv
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import heldout
import tasks
import train
from conftest import WORDS, make_bert_teacher, write_bert_vocab
from token_cache import DataError
from distil import DistilConfig
from tasks import task_rows, task_step
from losses import binary_cross_entropy_loss, cross_entropy_loss, kd_loss, multi_label_kd_loss, regression_loss
from student import StudentError

SINGLE, MULTI, REGRESSION, TOKEN = ("single_label_classification", "multi_label_classification", "regression",
                                    "token_classification")
TAGS = ("O", "B-ANIMAL", "I-ANIMAL")
ANIMALS = ("cat", "dog", "bird")


# ---------------------------------------------------------------------------------------------
# Helpers: tiny task teachers and labelled files
# ---------------------------------------------------------------------------------------------

def bert_config(vocab_size, labels, kind, **extra):
    from transformers import BertConfig
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, id2label=dict(enumerate(labels)),
                        label2id={name: i for i, name in enumerate(labels)}, **extra)
    if kind != TOKEN:
        config.problem_type = kind
    return config


def make_task_teacher(folder, kind=SINGLE, labels=("neg", "pos"), seed=0, **extra):
    """Save a tiny randomly initialised Bert*ForSequenceClassification/ForTokenClassification and its tokenizer."""
    from transformers import BertForSequenceClassification, BertForTokenClassification, BertTokenizer
    os.makedirs(folder, exist_ok=True)
    vocab = write_bert_vocab(os.path.join(folder, "vocab.txt"))
    tokenizer = BertTokenizer(vocab=os.path.join(folder, "vocab.txt"))
    torch.manual_seed(seed)
    cls = BertForTokenClassification if kind == TOKEN else BertForSequenceClassification
    cls(bert_config(len(vocab), labels, kind, **extra)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sentences(n, seed, words=WORDS, low=3, high=12):
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(low, high))) for _ in range(n)]


def rule(text):
    """The learnable rule of the tests' data: "pos" iff the word "cat" is in the text."""
    return "pos" if "cat" in text.split() else "neg"


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def single_label_csv(path, n, seed):
    return write_csv(path, ["text", "label"], [(t, rule(t)) for t in sentences(n, seed)])


def multi_label_jsonl(path, n, seed):
    return write_jsonl(path, [{"text": t, "label": [a for a in ANIMALS if a in t.split()]} for t in sentences(n, seed)])


def regression_csv(path, n, seed):
    return write_csv(path, ["text", "label"], [(t, len(t.split()) / 10) for t in sentences(n, seed)])


def token_jsonl(path, n, seed):
    records = []
    for t in sentences(n, seed):
        words = t.split()
        records.append({"tokens": words, "ner_tags": ["B-ANIMAL" if w in ANIMALS else "O" for w in words]})
    return write_jsonl(path, records)


def load_tok(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


def to_tensors(batch):
    return {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def run_main(tmp_path, name, *argv, **flags):
    """train.main with the flags every test run takes (fp32, no progress bar, cache and out under tmp_path)."""
    out = str(tmp_path / name)
    base = {"--out": out, "--cache-dir": str(tmp_path / "cache"), "--dtype": "fp32", "--seq-len": "32",
            "--batch-size": "8", "--max-steps": "6", "--log-every": "1"}
    base.update({"--" + k.replace("_", "-"): str(v) for k, v in flags.items()})
    args = [x for k, v in base.items() for x in (k, v)] + ["--no-progress", *argv]
    assert train.main(args) == int(base["--max-steps"])
    return out


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Tiny task teachers of every kind (dropout off, so runs can be compared) and an MLM checkpoint."""
    root = tmp_path_factory.mktemp("task_teachers")
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return {SINGLE: make_task_teacher(str(root / "single"), SINGLE, **no_dropout),
            MULTI: make_task_teacher(str(root / "multi"), MULTI, labels=ANIMALS, **no_dropout),
            REGRESSION: make_task_teacher(str(root / "regression"), REGRESSION, labels=("score",), **no_dropout),
            TOKEN: make_task_teacher(str(root / "token"), TOKEN, labels=TAGS, **no_dropout),
            "mlm": make_bert_teacher(str(root / "mlm"), n_layers=2, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("task_data")
    return {SINGLE: (single_label_csv(root / "single_train.csv", 64, 1), single_label_csv(root / "single_valid.csv", 16, 2)),
            MULTI: (multi_label_jsonl(root / "multi_train.jsonl", 48, 1), multi_label_jsonl(root / "multi_valid.jsonl", 16, 2)),
            REGRESSION: (regression_csv(root / "reg_train.csv", 48, 1), regression_csv(root / "reg_valid.csv", 16, 2)),
            TOKEN: (token_jsonl(root / "token_train.jsonl", 48, 1), token_jsonl(root / "token_valid.jsonl", 16, 2))}


# ---------------------------------------------------------------------------------------------
# 1. Losses against closed forms
# ---------------------------------------------------------------------------------------------

def binary_kl(p, q):
    return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_multi_label_kd_is_t_squared_mean_binary_kl(temperature):
    torch.manual_seed(0)
    s, t = torch.randn(5, 3, dtype=torch.float64) * 3, torch.randn(5, 3, dtype=torch.float64) * 3
    p, q = torch.sigmoid(t / temperature), torch.sigmoid(s / temperature)
    per_row = binary_kl(p, q).mean(-1)
    expected = temperature ** 2 * per_row.mean()
    torch.testing.assert_close(multi_label_kd_loss(s, t, temperature).double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(multi_label_kd_loss(s, t, temperature, denominator=7).double(),
                               temperature ** 2 * per_row.sum() / 7, rtol=1e-5, atol=1e-6)
    assert multi_label_kd_loss(t, t, temperature).abs().item() < 1e-6


def test_binary_cross_entropy_is_bce_with_logits_mean():
    torch.manual_seed(1)
    s, y = torch.randn(6, 4), (torch.rand(6, 4) > 0.5).float()
    torch.testing.assert_close(binary_cross_entropy_loss(s, y), torch.nn.BCEWithLogitsLoss()(s, y))
    torch.testing.assert_close(binary_cross_entropy_loss(s, y, denominator=10),
                               F.binary_cross_entropy_with_logits(s, y, reduction="none").mean(-1).sum() / 10)


def test_regression_loss_is_mse():
    torch.manual_seed(2)
    for shape in [(7, 1), (7, 3)]:
        s, y = torch.randn(shape), torch.randn(shape)
        torch.testing.assert_close(regression_loss(s, y), torch.nn.MSELoss()(s, y))
        torch.testing.assert_close(regression_loss(s, y, 3), ((s - y) ** 2).mean(-1).sum() / 3)


def test_cross_entropy_skips_unlabelled_rows():
    torch.manual_seed(3)
    s, y = torch.randn(5, 4), torch.tensor([1, -100, 3, -100, 0])
    torch.testing.assert_close(cross_entropy_loss(s, y), F.cross_entropy(s[[0, 2, 4]], y[[0, 2, 4]]))
    torch.testing.assert_close(cross_entropy_loss(s, y, denominator=4),
                               F.cross_entropy(s, y, ignore_index=-100, reduction="sum") / 4)
    # a denominator given as a device tensor (the loop's global count) divides the same way
    torch.testing.assert_close(cross_entropy_loss(s, y, denominator=torch.tensor(4.0)),
                               F.cross_entropy(s, y, ignore_index=-100, reduction="sum") / 4)


@pytest.mark.parametrize("loss", ["ce", "bce", "mlkd", "kd", "reg"])
@pytest.mark.parametrize("denominator", [None, 0, torch.tensor(0.0)])
def test_zero_rows_give_zero_with_a_gradient(loss, denominator):
    s = torch.zeros(0, 3, requires_grad=True)
    other = {"ce": torch.zeros(0, dtype=torch.long)}.get(loss, torch.zeros(0, 3))
    fn = {"ce": cross_entropy_loss, "bce": binary_cross_entropy_loss, "reg": regression_loss,
          "mlkd": lambda a, b, d: multi_label_kd_loss(a, b, 2.0, d), "kd": lambda a, b, d: kd_loss(a, b, 2.0, d)}[loss]
    value = fn(s, other, denominator)
    assert value.item() == 0.0 and torch.isfinite(value)
    value.backward()
    assert s.grad is not None and s.grad.shape == s.shape


# ---------------------------------------------------------------------------------------------
# 2. task_rows
# ---------------------------------------------------------------------------------------------

MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])


def test_task_rows_single_label():
    rows = task_rows(MASK, np.array([1, -100, 0]), SINGLE)
    assert rows["real_rows"].tolist() == np.flatnonzero(MASK.reshape(-1)).tolist() and rows["padded"]
    assert rows["kd_rows"].tolist() == [0, 1, 2]
    assert rows["label_rows"].tolist() == [0, 2] and rows["row_labels"].tolist() == [1, 0]
    assert rows["row_labels"].dtype == np.int64
    assert not task_rows(np.ones((2, 3)), np.array([0, 1]), SINGLE)["padded"]


def test_task_rows_multi_label():
    labels = np.array([[1, 0, 1], [np.nan] * 3, [0, 0, 0]], dtype=np.float32)
    rows = task_rows(MASK, labels, MULTI)
    assert rows["kd_rows"].tolist() == [0, 1, 2] and rows["label_rows"].tolist() == [0, 2]
    assert rows["row_labels"].dtype == np.float32 and rows["row_labels"].tolist() == [[1, 0, 1], [0, 0, 0]]


@pytest.mark.parametrize("labels", [np.array([0.5, np.nan, 2.0]), np.array([[0.5], [np.nan], [2.0]])])
def test_task_rows_regression(labels):
    rows = task_rows(MASK, labels, REGRESSION)
    assert rows["kd_rows"].tolist() == [0, 1, 2] and rows["label_rows"].tolist() == [0, 2]
    assert rows["row_labels"].shape == (2, 1) and rows["row_labels"][:, 0].tolist() == [0.5, 2.0]


def test_task_rows_token_classification():
    labels = np.array([[-100, 2, -100, -100], [-100, -100, -100, -100], [-100, 0, -100, -100]])
    word_mask = np.array([[0, 1, 1, 0], [0, 1, 0, 1], [0, 1, 0, 0]], dtype=bool)
    rows = task_rows(MASK, labels, TOKEN, word_mask)
    assert rows["kd_rows"].tolist() == [1, 2, 5, 7, 9]  # every predicted word, labelled or not
    assert rows["label_rows"].tolist() == [1, 9] and rows["row_labels"].tolist() == [2, 0]
    default = task_rows(MASK, labels, TOKEN)  # no word_mask: the labelled positions
    assert default["kd_rows"].tolist() == [1, 9]


# ---------------------------------------------------------------------------------------------
# 3. task_step
# ---------------------------------------------------------------------------------------------

def tiny_models(kind, labels, tmp_path):
    """Teacher and student of one task (different seeds), in eval mode so that their logits are exact."""
    from transformers import BertForSequenceClassification, BertForTokenClassification
    vocab = write_bert_vocab(str(tmp_path / "vocab.txt"))
    cls = BertForTokenClassification if kind == TOKEN else BertForSequenceClassification
    torch.manual_seed(0)
    teacher = cls(bert_config(len(vocab), labels, kind)).eval()
    torch.manual_seed(1)
    student = cls(bert_config(len(vocab), labels, kind)).eval()
    return teacher, student


def sequence_batch(labels, kind):
    torch.manual_seed(5)
    input_ids = torch.randint(5, 40, (3, 6))
    attention_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    rows = task_rows(attention_mask.numpy(), labels, kind)
    return {"input_ids": input_ids, "attention_mask": attention_mask, **to_tensors(rows)}


def logits_of(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_task_step_single_label(tmp_path):
    teacher, student = tiny_models(SINGLE, ("neg", "pos", "meh"), tmp_path)
    batch = sequence_batch(np.array([1, -100, 2]), SINGLE)
    cfg = DistilConfig(temperature=2.0, alpha_kd=1.0, alpha_mlm=0, alpha_cos=0, alpha_label=1.0)
    total, terms = task_step(student, teacher, batch, cfg, SINGLE)
    s, t = logits_of(student, batch), logits_of(teacher, batch)
    by_hand = 4.0 * (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1)
    torch.testing.assert_close(terms["kd"], by_hand.mean(), rtol=1e-5, atol=1e-6)  # all 3 rows, labelled or not
    torch.testing.assert_close(terms["kd"], kd_loss(s, t, 2.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["label"], F.cross_entropy(s[[0, 2]], torch.tensor([1, 2])), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, terms["kd"] + terms["label"])
    # the unlabelled row 1: KD reads it (its gradient reaches the student through it), the label term does not
    student.zero_grad()
    _, only_label = task_step(student, teacher, batch, DistilConfig(alpha_kd=0, alpha_mlm=0, alpha_cos=0,
                                                                    alpha_label=1.0), SINGLE)
    relabelled = sequence_batch(np.array([1, 0, 2]), SINGLE)
    _, with_row_1 = task_step(student, teacher, relabelled, cfg, SINGLE)
    assert not torch.allclose(only_label["label"], with_row_1["label"])
    torch.testing.assert_close(with_row_1["kd"], terms["kd"])
    # given denominators divide the sums
    _, halved = task_step(student, teacher, batch, cfg, SINGLE, {"kd": 6, "label": 4, "cos": 1})
    torch.testing.assert_close(halved["kd"], terms["kd"] / 2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(halved["label"], terms["label"] / 2, rtol=1e-5, atol=1e-7)


def test_task_step_multi_label(tmp_path):
    teacher, student = tiny_models(MULTI, ANIMALS, tmp_path)
    labels = np.array([[1, 0, 1], [np.nan] * 3, [0, 1, 0]], dtype=np.float32)
    batch = sequence_batch(labels, MULTI)
    cfg = DistilConfig(temperature=3.0, alpha_kd=1.0, alpha_mlm=0, alpha_cos=0, alpha_label=1.0)
    _, terms = task_step(student, teacher, batch, cfg, MULTI)
    s, t = logits_of(student, batch), logits_of(teacher, batch)
    torch.testing.assert_close(terms["kd"], 9 * binary_kl(torch.sigmoid(t / 3), torch.sigmoid(s / 3)).mean(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["label"], torch.nn.BCEWithLogitsLoss()(s[[0, 2]], torch.tensor(labels[[0, 2]])),
                               rtol=1e-5, atol=1e-6)


def test_task_step_regression(tmp_path):
    teacher, student = tiny_models(REGRESSION, ("score",), tmp_path)
    batch = sequence_batch(np.array([0.3, np.nan, -1.0], dtype=np.float32), REGRESSION)
    cfg = DistilConfig(alpha_kd=1.0, alpha_mlm=0, alpha_cos=0, alpha_label=1.0)
    _, terms = task_step(student, teacher, batch, cfg, REGRESSION)
    s, t = logits_of(student, batch), logits_of(teacher, batch)
    torch.testing.assert_close(terms["kd"], torch.nn.MSELoss()(s, t), rtol=1e-5, atol=1e-7)  # no temperature
    torch.testing.assert_close(terms["label"], torch.nn.MSELoss()(s[[0, 2], 0], torch.tensor([0.3, -1.0])),
                               rtol=1e-5, atol=1e-7)


def test_load_examples_puts_word_labels_on_first_sub_tokens(tmp_path):
    folder = make_task_teacher(str(tmp_path / "t"), TOKEN, labels=TAGS)
    tokenizer = load_tok(folder)
    assert tokenizer.tokenize("catdog") == ["cat", "##d", "##o", "##g"]
    path = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": ["the", "catdog", "sat"], "ner_tags": ["O", "B-ANIMAL", "O"]},
                                                {"tokens": ["a", "bird"]}])  # no tags: kept, taught by the teacher
    ex = tasks.load_examples(path, tokenizer, TOKEN, dict(enumerate(TAGS)), 32, str(tmp_path / "cache"), "tokens",
                             "ner_tags")
    first = slice(ex.starts[0], ex.starts[0] + ex.lengths[0])
    assert tokenizer.convert_ids_to_tokens(ex.input_ids[first].tolist()) == \
        ["[CLS]", "the", "cat", "##d", "##o", "##g", "sat", "[SEP]"]
    assert ex.token_labels[first].tolist() == [-100, 0, 1, -100, -100, -100, 0, -100]
    assert ex.word_mask[first].tolist() == [False, True, True, False, False, False, True, False]
    second = slice(ex.starts[1], ex.starts[1] + ex.lengths[1])
    assert ex.word_mask[second].tolist() == [False, True, True, False]
    assert (ex.token_labels[second] == -100).all()
    assert ex.meta["records"] == 2 and ex.meta["labelled"] == 1
    assert list(heldout.gold(ex)) == [0]


def test_task_step_token_classification_reads_first_sub_tokens(tmp_path):
    folder = make_task_teacher(str(tmp_path / "t"), TOKEN, labels=TAGS)
    tokenizer = load_tok(folder)
    path = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": ["the", "catdog", "sat"], "ner_tags": ["O", "B-ANIMAL", "O"]},
                                                {"tokens": ["a", "bird", "flew"]}])
    ex = tasks.load_examples(path, tokenizer, TOKEN, dict(enumerate(TAGS)), 32, str(tmp_path / "cache"), "tokens",
                             "ner_tags")
    batch = to_tensors(tasks.task_batch(ex, np.array([0, 1]), tokenizer.pad_token_id))
    teacher, student = tiny_models(TOKEN, TAGS, tmp_path)
    cfg = DistilConfig(alpha_kd=1.0, alpha_mlm=0, alpha_cos=0, alpha_label=1.0)
    _, terms = task_step(student, teacher, batch, cfg, TOKEN)
    s, t = logits_of(student, batch), logits_of(teacher, batch)
    words = batch["word_mask"]  # 3 words of row 0 (catdog once) and 3 of row 1
    assert words.sum().item() == 6
    torch.testing.assert_close(terms["kd"], kd_loss(s[words], t[words], 2.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["label"], F.cross_entropy(s[0][words[0]], torch.tensor([0, 1, 0])),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 4. load_examples
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(teachers):
    return load_tok(teachers[SINGLE])


NEG_POS = {0: "neg", 1: "pos"}


def load(path, tokenizer, tmp_path, kind=SINGLE, id2label=NEG_POS, seq_len=32, text="text", label="label", pair=None):
    return tasks.load_examples(str(path), tokenizer, kind, id2label, seq_len, str(tmp_path / "cache"), text, label, pair)


def test_csv_with_label_names_and_with_ids(tokenizer, tmp_path):
    names = write_csv(tmp_path / "names.csv", ["text", "label"], [("the cat sat", "pos"), ("a dog ran", "neg"),
                                                                 ("the cat ran", "pos")])
    ids = write_csv(tmp_path / "ids.csv", ["text", "label"], [("the cat sat", "1"), ("a dog ran", "0"),
                                                             ("the cat ran", "1")])
    a, b = load(names, tokenizer, tmp_path), load(ids, tokenizer, tmp_path)
    assert a.labels.tolist() == b.labels.tolist() == [1, 0, 1]
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.token_type_ids is None
    assert tokenizer.decode(a.input_ids[a.starts[1]:a.starts[1] + a.lengths[1]]) == "[CLS] a dog ran [SEP]"
    assert a.meta["records"] == a.meta["labelled"] == 3


def test_jsonl_labels(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "the cat", "label": "pos"}, {"text": "a dog", "label": 0},
                                              {"text": "red sky", "label": None}])
    ex = load(path, tokenizer, tmp_path)
    assert ex.labels.tolist() == [1, 0, -100] and ex.meta["labelled"] == 2
    multi = write_jsonl(tmp_path / "m.jsonl", [{"text": "the cat", "label": ["cat"]}, {"text": "a dog", "label": []},
                                               {"text": "birds", "label": ["dog", "bird"]}, {"text": "sky"}])
    ex = load(multi, tokenizer, tmp_path, MULTI, dict(enumerate(ANIMALS)))
    assert ex.labels[:3].tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1]] and np.isnan(ex.labels[3]).all()
    assert ex.meta["labelled"] == 3


def test_text_pairs_have_segments(tokenizer, tmp_path):
    path = write_csv(tmp_path / "pairs.csv", ["premise", "hypothesis", "label"],
                     [("the cat sat", "a cat", "pos"), ("a dog ran", "the bird flew", "neg")])
    ex = load(path, tokenizer, tmp_path, text="premise", pair="hypothesis")
    first = slice(ex.starts[0], ex.starts[0] + ex.lengths[0])
    assert tokenizer.decode(ex.input_ids[first]) == "[CLS] the cat sat [SEP] a cat [SEP]"
    assert ex.token_type_ids is not None and ex.token_type_ids[first].tolist() == [0] * 5 + [1] * 3
    batch = tasks.task_batch(ex, np.array([0, 1]), tokenizer.pad_token_id)
    assert "token_type_ids" in batch and batch["token_type_ids"].shape == batch["input_ids"].shape


def test_unknown_label_names_the_file_and_line(tokenizer, tmp_path):
    path = write_csv(tmp_path / "bad.csv", ["text", "label"], [("the cat", "pos"), ("a dog", "neutral")])
    with pytest.raises(DataError, match=r"bad\.csv line 3: unknown label 'neutral'") as e:
        load(path, tokenizer, tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"line 3: unknown label '2'"):  # an id out of range is unknown too
        load(write_csv(tmp_path / "bad2.csv", ["text", "label"], [("the cat", "1"), ("a dog", "2")]), tokenizer, tmp_path)


def test_unlabelled_records_are_kept_and_counted(tokenizer, tmp_path):
    path = write_csv(tmp_path / "partly.csv", ["text", "label"], [("the cat", "pos"), ("a dog", ""), ("red", "neg"),
                                                                 ("", "neg")])
    ex = load(path, tokenizer, tmp_path)
    assert ex.labels.tolist() == [1, -100, 0]
    assert ex.meta == {**ex.meta, "records": 3, "labelled": 2, "skipped": 1}
    note = tasks.examples_note(ex, path)
    assert "1 without a label" in note and "1 empty records skipped" in note


def test_truncation_is_counted(tokenizer, tmp_path):
    path = write_csv(tmp_path / "long.csv", ["text", "label"], [("the cat " * 10, "pos"), ("a dog", "neg")])
    ex = load(path, tokenizer, tmp_path, seq_len=8)
    assert ex.lengths.tolist() == [8, 4] and ex.meta["truncated"] == 1
    assert ex.input_ids[7] == tokenizer.sep_token_id  # cut, then closed with [SEP]
    assert "1 cut to --seq-len 8" in tasks.examples_note(ex, path)


def test_cache_is_reused_and_invalidated_when_the_file_changes(tokenizer, tmp_path, monkeypatch):
    path = write_csv(tmp_path / "c.csv", ["text", "label"], [("the cat", "pos"), ("a dog", "neg")])
    first = load(path, tokenizer, tmp_path)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(tasks, "_tokenize", no_tokenizing)
    again = load(path, tokenizer, tmp_path)
    assert again.input_ids.tolist() == first.input_ids.tolist() and again.labels.tolist() == first.labels.tolist()
    with pytest.raises(AssertionError, match="tokenized again"):  # another reading option: another cache
        load(path, tokenizer, tmp_path, seq_len=16)
    write_csv(path, ["text", "label"], [("the cat", "neg"), ("a dog", "neg")])
    with pytest.raises(AssertionError, match="tokenized again"):
        load(path, tokenizer, tmp_path)
    monkeypatch.undo()
    assert load(path, tokenizer, tmp_path).labels.tolist() == [0, 0]


def test_labels_from_data(tmp_path):
    names = write_csv(tmp_path / "n.csv", ["text", "label"], [("a", "pos"), ("b", "neg"), ("c", ""), ("d", "pos")])
    assert tasks.labels_from_data(names, SINGLE, "label", "text") == {0: "neg", 1: "pos"}
    ids = write_csv(tmp_path / "i.csv", ["text", "label"], [("a", "0"), ("b", "2")])
    assert tasks.labels_from_data(ids, SINGLE, "label", "text") == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert tasks.labels_from_data(names, SINGLE, "label", "text", ["pos", "neg"]) == {0: "pos", 1: "neg"}
    assert tasks.labels_from_data(names, REGRESSION, "label", "text") == {0: "score"}
    assert tasks.labels_from_data(names, REGRESSION, "label", "text", ["sim", "rel"]) == {0: "sim", 1: "rel"}
    tags = write_jsonl(tmp_path / "t.jsonl", [{"tokens": ["a", "b"], "ner_tags": ["O", "B-X"]}, {"tokens": ["c"]}])
    assert tasks.labels_from_data(tags, TOKEN, "ner_tags", "tokens") == {0: "B-X", 1: "O"}
    stars = write_csv(tmp_path / "s.csv", ["text", "label"], [("a", " 5 "), ("b", "1"), ("c", "10"), ("d", " ")])
    assert tasks.labels_from_data(stars, SINGLE, "label", "text") == {0: "1", 1: "5", 2: "10"}  # names, stripped
    label2id = {"1": 0, "5": 1, "10": 2}
    assert [tasks.label_ids(v, "line 2", SINGLE, label2id, "s.csv") for v in (5, "10", " 1 ")] == [1, 2, 0]
    assert tasks.label_ids(1.0, "line 2", SINGLE, {"neg": 0, "pos": 1}, "f.csv") == 1  # pandas' float ids
    assert tasks.label_ids("1.0", "line 2", SINGLE, {"neg": 0, "pos": 1}, "f.csv") == 1
    with pytest.raises(DataError, match="unknown label 1.5"):
        tasks.label_ids(1.5, "line 2", SINGLE, {"neg": 0, "pos": 1}, "f.csv")
    csv_tags = write_csv(tmp_path / "t.csv", ["tokens", "ner_tags"], [("the cat", "O B-X"), ("a", "")])
    assert tasks.labels_from_data(csv_tags, TOKEN, "ner_tags", "tokens") == {0: "B-X", 1: "O"}
    assert tasks.label_ids("O B-X", "line 2", TOKEN, {"B-X": 0, "O": 1}, "t.csv") == [1, 0]  # a CSV cell, split
    multi = write_csv(tmp_path / "m.csv", ["text", "label"], [("a", "x;y"), ("b", "z"), ("c", "")])
    assert tasks.labels_from_data(multi, MULTI, "label", "text") == {0: "x", 1: "y", 2: "z"}
    with pytest.raises(DataError, match="no labels in column 'label'"):
        tasks.labels_from_data(write_csv(tmp_path / "e.csv", ["text", "label"], [("a", "")]), SINGLE, "label", "text")


# ---------------------------------------------------------------------------------------------
# 5. Metrics against sklearn, scipy and seqeval
# ---------------------------------------------------------------------------------------------

def test_single_label_metrics_match_sklearn():
    pytest.importorskip("sklearn", reason="the metrics are compared with the optional scikit-learn's")
    from sklearn.metrics import accuracy_score, f1_score
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 3))
    true = rng.integers(0, 3, 40)
    pred = logits.argmax(-1)
    m = heldout.task_metrics(SINGLE, dict(enumerate(logits)), dict(enumerate(true)), {0: "a", 1: "b", 2: "c"})
    assert m["examples"] == 40
    assert m["accuracy"] == pytest.approx(accuracy_score(true, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(true, pred, average="macro"))
    # a label the teacher knows but that neither the gold labels nor the predictions hold
    four = {0: "a", 1: "b", 2: "c", 3: "d"}
    m = heldout.task_metrics(SINGLE, dict(enumerate(logits)), dict(enumerate(true)), four)
    assert m["macro_f1"] == pytest.approx(f1_score(true, pred, average="macro"))


def test_multi_label_metrics_match_sklearn():
    pytest.importorskip("sklearn", reason="the metrics are compared with the optional scikit-learn's")
    from sklearn.metrics import accuracy_score, f1_score
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(30, 4))
    true = (rng.random((30, 4)) > 0.6).astype(np.float32)
    m = heldout.task_metrics(MULTI, dict(enumerate(logits)), dict(enumerate(true)), dict(enumerate("abcd")))
    pred = (logits > 0).astype(int)
    assert m["micro_f1"] == pytest.approx(f1_score(true.astype(int), pred, average="micro"))
    assert m["exact_match"] == pytest.approx(accuracy_score(true.astype(int), pred))


@pytest.mark.parametrize("outputs", [1, 2])
def test_regression_metrics_match_scipy_with_ties(outputs):
    pytest.importorskip("scipy", reason="the correlations are compared with the optional scipy's")
    from scipy.stats import pearsonr, spearmanr
    rng = np.random.default_rng(2)
    true = np.round(rng.normal(size=(25, outputs)), 0).astype(np.float32)  # rounded: many ties
    pred = np.round(true + rng.normal(size=(25, outputs)), 1).astype(np.float32)
    pred[:5] = pred[0]  # ties in the predictions too
    m = heldout.task_metrics(REGRESSION, dict(enumerate(pred)), dict(enumerate(true)), {i: f"s{i}" for i in range(outputs)})
    assert m["pearson"] == pytest.approx(np.mean([pearsonr(pred[:, c], true[:, c])[0] for c in range(outputs)]), abs=1e-6)
    assert m["spearman"] == pytest.approx(np.mean([spearmanr(pred[:, c], true[:, c])[0] for c in range(outputs)]),
                                          abs=1e-6)


def test_token_metrics_match_seqeval():
    pytest.importorskip("seqeval", reason="entity F1 is the optional seqeval's")
    from seqeval.metrics import f1_score
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    rng = np.random.default_rng(3)
    true = {i: rng.integers(0, 5, rng.integers(2, 9)) for i in range(20)}
    logits = {i: rng.normal(size=(len(t), 5)) + 3 * np.eye(5)[t] * (rng.random((len(t), 1)) > 0.3)
              for i, t in true.items()}
    m = heldout.task_metrics(TOKEN, logits, true, dict(enumerate(names)))
    tags = lambda ids: [names[i] for i in ids]
    expected = f1_score([tags(true[i]) for i in range(20)], [tags(logits[i].argmax(-1)) for i in range(20)])
    assert 0 < expected < 1 and m["entity_f1"] == pytest.approx(expected)
    flat_t = np.concatenate(list(true.values()))
    flat_p = np.concatenate([logits[i].argmax(-1) for i in range(20)])
    assert m["accuracy"] == pytest.approx((flat_t == flat_p).mean())
    assert heldout.entity_f1([["B-PER", "I-PER", "O"]], [["B-PER", "I-PER", "O"]]) == 1.0
    assert "entity_f1" not in heldout.task_metrics(TOKEN, logits, true, dict(enumerate("abcde")))  # not IOB tags


def test_agreement():
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(10, 3)), rng.normal(size=(10, 3))
    t[:6] = s[:6] * 2  # same argmax on 6 rows at least
    m = heldout.task_metrics(SINGLE, dict(enumerate(s)), {}, {0: "a", 1: "b", 2: "c"}, dict(enumerate(t)))
    assert m["agreement"] == pytest.approx((s.argmax(-1) == t.argmax(-1)).mean()) and m["agreement"] >= 0.6
    m = heldout.task_metrics(MULTI, dict(enumerate(s)), {}, dict(enumerate("abc")), dict(enumerate(t)))
    assert m["agreement"] == pytest.approx(((s > 0) == (t > 0)).mean())
    a, b = rng.normal(size=(10, 1)), rng.normal(size=(10, 1))
    m = heldout.task_metrics(REGRESSION, dict(enumerate(a)), {}, {0: "s"}, dict(enumerate(b)))
    assert m["agreement"] == pytest.approx(np.corrcoef(a[:, 0], b[:, 0])[0, 1])


# ---------------------------------------------------------------------------------------------
# 6. train.py end to end
# ---------------------------------------------------------------------------------------------

def test_single_label_distillation_end_to_end(teachers, data, tmp_path):
    from transformers import pipeline
    out = run_main(tmp_path, "single", teacher=teachers[SINGLE], train=data[SINGLE][0], valid=data[SINGLE][1],
                   eval_every=3)
    records = metrics(out)
    assert any("teacher_accuracy" in r for r in records)
    last = [r for r in records if "valid_accuracy" in r][-1]
    assert {"valid_accuracy", "valid_macro_f1", "valid_agreement", "teacher_accuracy"} <= set(last)
    losses = [r for r in records if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(r["loss"]) and "kd" in r and "label" in r for r in losses)
    classify = pipeline("text-classification", model=out)
    assert classify("the cat sat on a mat")[0]["label"] in ("neg", "pos")
    card = open(os.path.join(out, "README.md")).read()
    assert "accuracy" in card


def test_token_classification_end_to_end(teachers, data, tmp_path):
    pytest.importorskip("seqeval", reason="entity F1 of IOB tags needs the optional seqeval package")
    from transformers import pipeline
    out = run_main(tmp_path, "token", teacher=teachers[TOKEN], train=data[TOKEN][0], valid=data[TOKEN][1],
                   eval_every=3, label_column="ner_tags", text_column="tokens")
    last = [r for r in metrics(out) if "valid_entity_f1" in r][-1]
    assert 0 <= last["valid_entity_f1"] <= 1 and "teacher_entity_f1" in last
    tagger = pipeline("token-classification", model=out)
    assert all(x["entity"] in TAGS for x in tagger("the cat sat on a mat"))
    assert os.path.isfile(os.path.join(out, "README.md"))


@pytest.mark.parametrize("kind,score", [(REGRESSION, "pearson"), (MULTI, "micro_f1")])
def test_regression_and_multi_label_train(teachers, data, tmp_path, kind, score):
    out = run_main(tmp_path, kind, teacher=teachers[kind], train=data[kind][0], valid=data[kind][1], eval_every=3)
    records = metrics(out)
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert any(f"valid_{score}" in r for r in records) and any(f"teacher_{score}" in r for r in records)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["problem_type"] == kind
    card = open(os.path.join(out, "README.md")).read()
    last = [r for r in records if f"valid_{score}" in r][-1]
    row = next(line for line in card.splitlines() if line.startswith("| held-out agreement"))
    shown = float(row.split("|")[3])
    # a regression's agreement is a correlation, shown as one; the classifications' scores are in %
    assert shown == pytest.approx(last["valid_agreement"] * (1 if kind == REGRESSION else 100), abs=1e-2)


def balanced_csv(path, n, seed):
    """Half the texts hold the word "cat" ("pos"), half do not ("neg"), and each half draws its other words
    from its own half of the vocabulary: a rule every token carries, which a tiny random encoder learns in
    tens of steps whatever its seed (the word "cat" alone takes a few hundred)."""
    rng, rows = random.Random(seed), []
    others = [w for w in WORDS if w != "cat"]
    halves = others[::2], others[1::2]
    for i in range(n):
        words = [rng.choice(halves[i % 2]) for _ in range(rng.randint(3, 10))]
        if i % 2:
            words.insert(rng.randint(0, len(words)), "cat")
        rows.append((" ".join(words), rule(" ".join(words))))
    return write_csv(path, ["text", "label"], rows)


def test_fine_tuning_without_a_teacher_learns_the_labels(teachers, tmp_path):
    train_csv, valid_csv = balanced_csv(tmp_path / "train.csv", 64, 1), balanced_csv(tmp_path / "valid.csv", 16, 2)
    out = run_main(tmp_path, "finetune", "--task", SINGLE, student=teachers["mlm"], train=train_csv,
                   valid=valid_csv, max_steps=30, lr=5e-3, batch_size=16, eval_every=30, log_every=5)
    records = metrics(out)
    losses = [r["loss"] for r in records if "loss" in r]
    assert all("kd" not in r for r in records if "loss" in r)
    assert losses[-1] < 0.5 * losses[0], losses
    assert [r for r in records if "valid_accuracy" in r][-1]["valid_accuracy"] >= 0.75
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["architectures"] == ["BertForSequenceClassification"]


def test_alpha_kd_zero_is_labels_only(teachers, data, tmp_path):
    out = run_main(tmp_path, "labels_only", teacher=teachers[SINGLE], train=data[SINGLE][0], alpha_kd=0)
    losses = [r for r in metrics(out) if "loss" in r]
    assert losses and all("kd" not in r and r["loss"] == pytest.approx(0.5 * r["label"], rel=1e-6) for r in losses)


def test_resumed_task_run_is_the_same_run(teachers, data, tmp_path):
    from test_resume import STOP_AT_STEP, flags, ok, run, same_weights, train_records, wrapper
    base = dict(teacher=teachers[SINGLE], train=data[SINGLE][0], valid=data[SINGLE][1], cache_dir=str(tmp_path / "c"),
                seq_len=32, batch_size=8, max_steps=8, dtype="fp32", log_every=1, eval_every=4, no_progress=True)
    reference, out = str(tmp_path / "reference"), str(tmp_path / "resumed")
    ok(run(flags(base, out=reference)))
    stop = wrapper(tmp_path, "stop", STOP_AT_STEP)
    # SIGTERM inside step 3's update: the flag travels with step 4's all-reduce and is read one step late,
    # in step 5 (train_step.StepCounters), so the run saves at step 5
    stopped = ok(run(flags(base, out=out, save_every=100), script=stop, env={"STOP_AFTER": "3"}))
    assert "stopped at step 5 as asked" in stopped.stdout
    resumed = ok(run(flags(base, out=out, resume=True)))
    assert "step-00000005.pt at step 5" in resumed.stdout
    assert same_weights(out, reference)
    assert train_records(out) == train_records(reference)  # every step's loss, each term, lr, grad norm
    scores = lambda run_dir: [r for r in metrics(run_dir) if "valid_accuracy" in r]
    assert scores(out) == scores(reference)


def test_two_ranks_equal_one_for_a_task_run(teachers, data, tmp_path):
    from test_resume import flags, ok, run, weights
    base = dict(teacher=teachers[SINGLE], train=data[SINGLE][0], valid=data[SINGLE][1], cache_dir=str(tmp_path / "c"),
                seq_len=32, max_steps=5, dtype="fp32", log_every=1, eval_every=5, no_progress=True)
    ok(run(flags(base, out=str(tmp_path / "two"), batch_size=4), nproc=2))
    ok(run(flags(base, out=str(tmp_path / "one"), batch_size=8)))
    ok(run(flags(base, out=str(tmp_path / "accumulated"), batch_size=4, grad_accum=2)))
    one = weights(str(tmp_path / "one"))
    for other in ("two", "accumulated"):
        theirs = weights(str(tmp_path / other))
        assert theirs.keys() == one.keys()
        for k in one:  # to the summation order's rounding (see test_ddp.py)
            torch.testing.assert_close(theirs[k], one[k], rtol=1e-5, atol=1e-5 * max(1.0, one[k].abs().max().item()))
    ma, mb = metrics(str(tmp_path / "two")), metrics(str(tmp_path / "one"))
    va = [r for r in ma if "valid_accuracy" in r][-1]
    vb = [r for r in mb if "valid_accuracy" in r][-1]
    assert va.keys() == vb.keys() and va["valid_accuracy"] == vb["valid_accuracy"]  # the two shards, gathered
    for a, b in zip([r for r in ma if "loss" in r], [r for r in mb if "loss" in r]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


# ---- every family with a sequence-classification head ----

def family_task_teacher(name, folder, kind):
    """A tiny *ForSequenceClassification (or ForTokenClassification) of family `name`, built as test_families builds
    its masked LMs, with its own kind of tokenizer; returns (folder, words of its corpus)."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    from test_families import FAMILIES, sentences as family_sentences
    words, make_tokenizer, _, make_config = FAMILIES[name]
    os.makedirs(folder)
    tokenizer = make_tokenizer(folder, family_sentences(words, 400, seed=3))
    labels = TAGS if kind == TOKEN else ("neg", "pos")
    config = make_config(tokenizer)
    config.id2label, config.label2id = dict(enumerate(labels)), {n: i for i, n in enumerate(labels)}
    if kind != TOKEN:
        config.problem_type = kind
    torch.manual_seed(0)
    auto = AutoModelForTokenClassification if kind == TOKEN else AutoModelForSequenceClassification
    auto.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, words


def _family_names():
    from test_families import FAMILIES
    return [n for n in FAMILIES if n != "deberta-v2-lm-predictions"]  # the same model as deberta-v2 without its MLM head


@pytest.mark.parametrize("name", _family_names())
def test_every_family_distils_a_sequence_classifier(name, tmp_path):
    from transformers import AutoModelForSequenceClassification
    folder, words = family_task_teacher(name, str(tmp_path / "teacher"), SINGLE)
    texts = sentences(24, 1, words=words)
    train_csv = write_csv(tmp_path / "train.csv", ["text", "label"], [(t, "pos" if i % 2 else "neg")
                                                                      for i, t in enumerate(texts)])
    out = run_main(tmp_path, "out", teacher=folder, train=train_csv, valid=train_csv, max_steps=3, eval_every=3)
    assert all(math.isfinite(r["loss"]) for r in metrics(out) if "loss" in r)
    assert any("valid_accuracy" in r for r in metrics(out))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "neg", 1: "pos"}


@pytest.mark.parametrize("name", ["bert-uncased", "roberta"])
def test_token_classification_families(name, tmp_path):
    pytest.importorskip("seqeval", reason="entity F1 of IOB tags needs the optional seqeval package")
    from transformers import pipeline
    folder, words = family_task_teacher(name, str(tmp_path / "teacher"), TOKEN)
    records = [{"tokens": t.split(), "ner_tags": ["B-ANIMAL" if w.lower() in ANIMALS else "O" for w in t.split()]}
               for t in sentences(24, 1, words=words)]
    train_jsonl = write_jsonl(tmp_path / "train.jsonl", records)
    out = run_main(tmp_path, "out", teacher=folder, train=train_jsonl, valid=train_jsonl, max_steps=3, eval_every=3,
                   text_column="tokens", label_column="ner_tags")
    assert any("valid_entity_f1" in r for r in metrics(out))
    assert all(x["entity"] in TAGS for x in pipeline("token-classification", model=out)("The cat sat on a mat"))


# ---- bad input: one line each ----

def test_task_with_a_task_teacher_is_refused(teachers, data, tmp_path):
    with pytest.raises(StudentError, match="--task") as e:
        train.main(["--teacher", teachers[SINGLE], "--task", SINGLE, "--student", teachers["mlm"], "--train",
                    data[SINGLE][0], "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    assert "\n" not in str(e.value)


def test_unknown_label_in_a_run_is_one_line(teachers, tmp_path):
    bad = write_csv(tmp_path / "bad.csv", ["text", "label"], [("the cat", "pos")] * 10 + [("a dog", "maybe")])
    with pytest.raises(DataError, match=r"bad\.csv line 12: unknown label 'maybe'") as e:
        train.main(["--teacher", teachers[SINGLE], "--train", bad, "--out", str(tmp_path / "o"), "--cache-dir",
                    str(tmp_path / "c"), "--no-progress"])
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "o")  # checked before anything is written


def test_question_answering_teacher_is_refused(tmp_path):
    from transformers import BertForQuestionAnswering, BertTokenizer
    folder = str(tmp_path / "qa")
    os.makedirs(folder)
    vocab = write_bert_vocab(os.path.join(folder, "vocab.txt"))
    BertForQuestionAnswering(bert_config(len(vocab), ("a", "b"), SINGLE)).save_pretrained(folder)
    BertTokenizer(vocab=os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    train_csv = write_csv(tmp_path / "t.csv", ["text", "label"], [("the cat", "a")] * 4)
    with pytest.raises(StudentError, match="QuestionAnswering.*not supported") as e:
        train.main(["--teacher", folder, "--train", train_csv, "--out", str(tmp_path / "o"), "--cache-dir",
                    str(tmp_path / "c"), "--no-progress"])
    assert "\n" not in str(e.value)


def test_a_student_checkpoint_of_another_tokenizer_is_refused(teachers, data, tmp_path):
    """--student must share the teacher's tokenizer: the same words in another order give other ids."""
    import shutil
    other = str(tmp_path / "other")
    shutil.copytree(teachers["mlm"], other)
    with open(os.path.join(other, "vocab.txt")) as f:
        vocab = f.read().split("\n")
    vocab[5], vocab[6] = vocab[6], vocab[5]  # two words swapped: same size, other ids
    with open(os.path.join(other, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab))
    if os.path.exists(os.path.join(other, "tokenizer.json")):
        os.remove(os.path.join(other, "tokenizer.json"))  # the vocabulary is then read from vocab.txt
    with pytest.raises(StudentError, match="its tokenizer is not the teacher's") as e:
        train.main(["--teacher", teachers[SINGLE], "--student", other, "--train", data[SINGLE][0], "--out",
                    str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    assert "\n" not in str(e.value)


def test_alpha_mlm_with_a_task_teacher_is_refused(teachers, data, tmp_path):
    with pytest.raises(SystemExit, match="--alpha-mlm") as e:
        train.main(["--teacher", teachers[SINGLE], "--train", data[SINGLE][0], "--out", str(tmp_path / "o"),
                    "--cache-dir", str(tmp_path / "c"), "--no-progress", "--alpha-mlm", "1"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["bert-uncased", "roberta", "distilbert", "modernbert", "deberta-v2"])
def test_text_pairs_in_every_kind_of_model(name, tmp_path):
    """Text pairs: BERT-style models read each token's segment (token_type_ids); models without segments
    (DistilBERT, ModernBERT) take the pair as its framing alone."""
    folder, words = family_task_teacher(name, str(tmp_path / "teacher"), SINGLE)
    first, second = sentences(24, 1, words=words), sentences(24, 2, words=words)
    path = write_csv(tmp_path / "pairs.csv", ["premise", "hypothesis", "label"],
                     [(a, b, "pos" if i % 2 else "neg") for i, (a, b) in enumerate(zip(first, second))])
    out = run_main(tmp_path, "out", teacher=folder, train=path, valid=path, max_steps=2, eval_every=2,
                   text_column="premise", text_pair_column="hypothesis")
    assert any("valid_accuracy" in r for r in metrics(out))


def test_regression_and_multi_label_csv_records(tokenizer, tmp_path):
    """A CSV cell holds a regression score, or several label names separated by commas or semicolons; an
    empty cell is a record without a label, kept for the teacher to teach on (NaN), as in every kind."""
    scores = write_csv(tmp_path / "r.csv", ["text", "label"], [("the cat", "0.5"), ("a dog", ""), ("red", "-2")])
    ex = load(scores, tokenizer, tmp_path, REGRESSION, {0: "score"})
    assert ex.labels.shape == (3, 1) and ex.labels[[0, 2], 0].tolist() == [0.5, -2.0] and np.isnan(ex.labels[1, 0])
    assert ex.meta["records"] == 3 and ex.meta["labelled"] == 2
    with pytest.raises(DataError, match=r"line 2: a regression label must be 1 finite number"):
        load(write_csv(tmp_path / "r2.csv", ["text", "label"], [("the cat", "high")]), tokenizer, tmp_path,
             REGRESSION, {0: "score"})
    cells = write_csv(tmp_path / "m.csv", ["text", "label"], [("the cat", "cat,dog"), ("a dog", "bird; cat"),
                                                             ("sky", ""), ("tree", "2")])
    ex = load(cells, tokenizer, tmp_path, MULTI, dict(enumerate(ANIMALS)))
    assert ex.labels[[0, 1, 3]].tolist() == [[1, 1, 0], [1, 0, 1], [0, 0, 1]] and np.isnan(ex.labels[2]).all()
    assert ex.meta["labelled"] == 3


def test_fine_tuning_token_classification_takes_tags_from_the_data(teachers, data, tmp_path):
    pytest.importorskip("seqeval", reason="entity F1 of IOB tags needs the optional seqeval package")
    out = run_main(tmp_path, "ft_token", "--task", TOKEN, student=teachers["mlm"], train=data[TOKEN][0],
                   valid=data[TOKEN][1], max_steps=3, eval_every=3)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["id2label"] == {"0": "B-ANIMAL", "1": "O"} and config["architectures"] == ["BertForTokenClassification"]
    assert any("valid_entity_f1" in r for r in metrics(out))


def test_student_checkpoint_keeps_a_head_of_the_same_labels_only(teachers):
    from pretrained import load_student_checkpoint
    from safetensors.torch import load_file
    saved = load_file(os.path.join(teachers[SINGLE], "model.safetensors"))
    same = load_student_checkpoint(teachers[SINGLE], SINGLE, NEG_POS)
    assert same.fresh_weights == [] and same.training
    assert torch.equal(same.classifier.weight, saved["classifier.weight"])
    other = load_student_checkpoint(teachers[SINGLE], SINGLE, {0: "no", 1: "yes"})  # same shape, other labels
    assert "classifier.weight" in other.fresh_weights and not torch.equal(other.classifier.weight, saved["classifier.weight"])
    assert torch.equal(other.bert.embeddings.word_embeddings.weight, saved["bert.embeddings.word_embeddings.weight"])
    assert other.config.id2label == {0: "no", 1: "yes"}
    mlm = load_student_checkpoint(teachers["mlm"], REGRESSION, {0: "score"})
    assert mlm.config.problem_type == REGRESSION and mlm.config.num_labels == 1 and "classifier.weight" in mlm.fresh_weights


def test_fine_tuning_refuses_teacher_losses_and_needs_a_student(teachers, data, tmp_path):
    common = ["--task", SINGLE, "--train", data[SINGLE][0], "--out", str(tmp_path / "o"), "--cache-dir",
              str(tmp_path / "c"), "--no-progress"]
    with pytest.raises(SystemExit, match="--alpha-kd compare the student with a teacher") as e:
        train.main(common + ["--student", teachers["mlm"], "--alpha-kd", "1"])
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="--task fine-tunes a pre-trained checkpoint: pass it as --student FOLDER"):
        train.main(common)
    assert not os.path.exists(tmp_path / "o")


def test_a_fresh_task_head_is_drawn_from_the_seed(teachers, data, tmp_path):
    """--student with a fresh head: the same --seed gives the same head whatever ran before in the process."""
    from safetensors.torch import load_file
    run = lambda name, seed: load_file(os.path.join(run_main(
        tmp_path, name, "--task", SINGLE, student=teachers["mlm"], train=data[SINGLE][0], max_steps=1, lr=1e-12,
        seed=seed), "model.safetensors"))["classifier.weight"]
    first = run("a", 1)
    torch.rand(100)  # another random state
    assert torch.equal(run("b", 1), first) and not torch.equal(run("c", 2), first)


def test_token_truncation_keeps_the_words_before_the_cut(tmp_path):
    folder = make_task_teacher(str(tmp_path / "t"), TOKEN, labels=TAGS)
    tokenizer = load_tok(folder)
    path = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": ["the", "catdog", "sat"], "ner_tags": ["O", "B-ANIMAL", "O"]}])
    ex = tasks.load_examples(path, tokenizer, TOKEN, dict(enumerate(TAGS)), 6, str(tmp_path / "cache"), "tokens",
                             "ner_tags")
    assert tokenizer.convert_ids_to_tokens(ex.input_ids.tolist()) == ["[CLS]", "the", "cat", "##d", "##o", "[SEP]"]
    assert ex.token_labels.tolist() == [-100, 0, 1, -100, -100, -100]
    assert ex.meta["truncated"] == 1 and ex.meta["words_lost"] == 1
    assert heldout.gold(ex)[0].tolist() == [0, 1]  # the words kept, as predict returns them


def test_saved_datasets_with_class_labels(tokenizer, tmp_path):
    pytest.importorskip("datasets", reason="reading a saved dataset needs the optional datasets package")
    from datasets import ClassLabel, Dataset, Features, Sequence, Value
    sentiment = Dataset.from_dict({"text": ["the cat sat", "a dog ran", "red sky"], "label": [1, 0, 1]},
                                  features=Features({"text": Value("string"),
                                                     "label": ClassLabel(names=["bad", "good"])}))
    sentiment.save_to_disk(str(tmp_path / "sentiment"))
    id2label = tasks.labels_from_data(str(tmp_path / "sentiment"), SINGLE, "label", "text")
    assert id2label == {0: "bad", 1: "good"}
    assert load(tmp_path / "sentiment", tokenizer, tmp_path, id2label=id2label).labels.tolist() == [1, 0, 1]
    ner = Dataset.from_dict({"tokens": [["the", "cat"], ["a", "dog", "ran"]], "ner_tags": [[0, 1], [0, 1, 0]]},
                            features=Features({"tokens": Sequence(Value("string")),
                                               "ner_tags": Sequence(ClassLabel(names=list(TAGS)))}))
    ner.save_to_disk(str(tmp_path / "ner"))
    id2label = tasks.labels_from_data(str(tmp_path / "ner"), TOKEN, "ner_tags", "tokens")
    assert id2label == dict(enumerate(TAGS))
    ex = load(tmp_path / "ner", tokenizer, tmp_path, TOKEN, id2label, text="tokens", label="ner_tags")
    assert ex.token_labels[ex.word_mask].tolist() == [0, 1, 0, 1, 0]


@pytest.mark.parametrize("kind,score", [(REGRESSION, "pearson"), (MULTI, "micro_f1")])
def test_fine_tuning_regression_and_multi_label(teachers, data, tmp_path, kind, score):
    out = run_main(tmp_path, "ft", "--task", kind, student=teachers["mlm"], train=data[kind][0], valid=data[kind][1],
                   max_steps=2, eval_every=2)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["problem_type"] == kind
    assert config["id2label"] == ({"0": "score"} if kind == REGRESSION else {str(i): a for i, a in enumerate(sorted(ANIMALS))})
    assert any(f"valid_{score}" in r for r in metrics(out))
