"""Labelled data as people bring it (issue 22): each layout is read as it means, or refused in one line,
and what reading has to guess is said in one line.

The teachers are tiny and built here (test_tasks.py's helpers); where a test needs a teacher that is
right about the data, the data's labels are the teacher's own predictions, so that a label read in
the wrong order shows as a teacher that is wrong.
"""

import json
import os
import signal
import subprocess
import shutil
import sys
import time
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import checkpoint
import flags
import heldout
import tasks
import train
from pretrained import load_teacher, load_tokenizer
from student import StudentError
from token_cache import DataError
from test_tasks import (ANIMALS, MULTI, SINGLE, TAGS, TOKEN, family_task_teacher, load_tok, make_task_teacher, metrics,
                        run_main, sentences, write_csv, write_jsonl)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NLI = ("ENTAILMENT", "NEUTRAL", "CONTRADICTION")  # roberta-large-mnli's names and order


def load(path, tokenizer, tmp_path, kind=SINGLE, id2label=None, text="text", label="label", pair=None, label_map=None,
         seq_len=32):
    return tasks.load_examples(str(path), tokenizer, kind, id2label or {0: "neg", 1: "pos"}, seq_len,
                               str(tmp_path / "cache"), text, label, pair, label_map)


def spread_teacher(folder, labels, seed=0):
    """A tiny sequence classifier whose decisions vary from text to text: its head reads the two
    directions along which the encoder's pooled outputs vary most (a random tiny head predicts nearly
    one label everywhere, and training one to a rule takes many steps)."""
    from transformers import AutoModelForSequenceClassification
    make_task_teacher(folder, SINGLE, labels=labels, seed=seed, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        pooled = model.bert(**load_tok(folder)(sentences(200, 11), padding=True, return_tensors="pt")).pooler_output
        mean = pooled.mean(0)
        _, s, v = torch.linalg.svd(pooled - mean, full_matrices=False)
        weight = torch.stack([v[0] / s[0], -v[0] / s[0], v[1] / s[1]]) * 100
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(-weight @ mean)
    model.save_pretrained(folder)
    return folder


def teacher_ids(folder, texts):
    """The teacher's own decision for each text."""
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = load_tok(folder)
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.argmax(-1).tolist()


def run(args, **kwargs):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          **kwargs)


@pytest.fixture(scope="module")
def nli_teacher(tmp_path_factory):
    return spread_teacher(str(tmp_path_factory.mktemp("nli") / "teacher"), NLI)


@pytest.fixture(scope="module")
def tokenizer(nli_teacher):
    return load_tok(nli_teacher)


# ---------------------------------------------------------------------------------------------
# 1. A dataset's ClassLabel names
# ---------------------------------------------------------------------------------------------

def test_class_label_ids_are_mapped_to_the_teachers_by_name_ignoring_case(tokenizer, tmp_path):
    """glue/mnli numbers entailment, neutral, contradiction; a teacher may number (and spell) them otherwise."""
    pytest.importorskip("datasets", reason="reading a saved dataset needs the optional datasets package")
    from datasets import ClassLabel, Dataset, Features, Value
    names = ["contradiction", "entailment", "neutral"]  # the dataset's order, lower case
    texts = ["the cat sat", "a dog ran", "red sky", "the bird flew"]
    data_ids = [0, 1, 2, 1]
    Dataset.from_dict({"text": texts, "label": data_ids},
                      features=Features({"text": Value("string"), "label": ClassLabel(names=names)})
                      ).save_to_disk(str(tmp_path / "mnli"))
    ex = load(tmp_path / "mnli", tokenizer, tmp_path, id2label=dict(enumerate(NLI)))
    assert ex.labels.tolist() == [NLI.index(names[i].upper()) for i in data_ids] == [2, 0, 1, 0]
    note = tasks.examples_note(ex, "mnli")
    assert "ClassLabel ids mapped to the teacher's by name" in note and "0 contradiction -> 2 CONTRADICTION" in note
    assert not ex.meta["labels_as_ids"]  # names known: no guessing about the order afterwards


def test_class_label_ids_are_taken_as_they_are_by_a_teacher_with_unnamed_labels(tokenizer, tmp_path):
    """A teacher whose labels have no names (LABEL_0 ...) cannot be matched by name: the ClassLabel ids
    are its ids, said in one line, and the order stays a guess the teacher's predictions check."""
    pytest.importorskip("datasets", reason="reading a saved dataset needs the optional datasets package")
    from datasets import ClassLabel, Dataset, Features, Value
    Dataset.from_dict({"text": ["the cat sat", "a dog ran", "red sky"], "label": [0, 2, 1]},
                      features=Features({"text": Value("string"),
                                         "label": ClassLabel(names=["contradiction", "entailment", "neutral"])})
                      ).save_to_disk(str(tmp_path / "mnli"))
    ex = load(tmp_path / "mnli", tokenizer, tmp_path, id2label={i: f"LABEL_{i}" for i in range(3)})
    assert ex.labels.tolist() == [0, 2, 1]
    note = tasks.examples_note(ex, "mnli")
    assert "the teacher's labels have no names (LABEL_0 ...): the dataset's ClassLabel ids are taken as its ids " \
           "(0 contradiction, 1 entailment, 2 neutral)" in note
    assert ex.meta["labels_as_ids"]
    with pytest.raises(DataError, match="match none"):  # two named, one unnamed: not a teacher without names
        load(tmp_path / "mnli", tokenizer, tmp_path / "c2", id2label={0: "LABEL_0", 1: "yes", 2: "no"})


def test_class_label_tags_are_mapped_by_name(tokenizer, tmp_path):
    """conll2003's ner_tags and dslim/bert-base-NER number their tags differently."""
    pytest.importorskip("datasets", reason="reading a saved dataset needs the optional datasets package")
    from datasets import ClassLabel, Dataset, Features, Sequence, Value
    Dataset.from_dict({"tokens": [["the", "cat"], ["a", "dog", "ran"]], "ner_tags": [[0, 1], [0, 1, 0]]},
                      features=Features({"tokens": Sequence(Value("string")),
                                         "ner_tags": Sequence(ClassLabel(names=["O", "B-ANIMAL", "I-ANIMAL"]))})
                      ).save_to_disk(str(tmp_path / "ner"))
    teacher_tags = ("B-ANIMAL", "I-ANIMAL", "O")
    ex = load(tmp_path / "ner", tokenizer, tmp_path, TOKEN, dict(enumerate(teacher_tags)), "tokens", "ner_tags")
    assert ex.token_labels[ex.word_mask].tolist() == [2, 0, 2, 0, 2]


def test_class_label_names_that_match_none_are_refused(tokenizer, tmp_path):
    pytest.importorskip("datasets", reason="reading a saved dataset needs the optional datasets package")
    from datasets import ClassLabel, Dataset, Features, Value
    Dataset.from_dict({"text": ["the cat", "a dog"], "label": [0, 1]},
                      features=Features({"text": Value("string"), "label": ClassLabel(names=["no", "yes"])})
                      ).save_to_disk(str(tmp_path / "yesno"))
    with pytest.raises(DataError, match=r"ClassLabel names of 'label' \(no, yes\) are not the teacher's \(neg, pos\)"
                                        r".*--label-map") as e:
        load(tmp_path / "yesno", tokenizer, tmp_path)
    assert "\n" not in str(e.value)
    # the user's map says what they mean: names or ids of the dataset
    ex = load(tmp_path / "yesno", tokenizer, tmp_path, label_map=tasks.parse_label_map("no:neg,yes:pos", {0: "neg", 1: "pos"}))
    assert ex.labels.tolist() == [0, 1]


def test_label_names_match_ignoring_case_and_say_so(tokenizer, tmp_path):
    path = write_csv(tmp_path / "mnli.csv", ["text", "label"], [("the cat", "entailment"), ("a dog", "Contradiction")])
    ex = load(path, tokenizer, tmp_path, id2label=dict(enumerate(NLI)))
    assert ex.labels.tolist() == [0, 2]
    assert "label names matched to the teacher's ignoring case (entailment -> ENTAILMENT" in tasks.examples_note(ex, path)


# ---------------------------------------------------------------------------------------------
# 2. Integer labels in another order
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def permuted(nli_teacher, tmp_path_factory):
    """A CSV whose ids are the teacher's own decisions renumbered: the data's id = PERMUTATION[teacher's]."""
    texts = sentences(64, 7)
    decided = teacher_ids(nli_teacher, texts)
    assert len(set(decided)) == 3, decided  # the teacher uses every label, so every renumbering shows
    permutation = {0: 1, 1: 2, 2: 0}
    path = write_csv(tmp_path_factory.mktemp("perm") / "train.csv", ["text", "label"],
                     [(t, str(permutation[d])) for t, d in zip(texts, decided)])
    return path, decided, "0:2,1:0,2:1"  # the data's id : the teacher's


def test_ids_in_another_order_are_named_with_the_flag_that_fixes_them(nli_teacher, permuted, tmp_path, capsys):
    path, decided, spec = permuted
    run_main(tmp_path, "perm", teacher=nli_teacher, train=path, max_steps=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if "--label-map" in line]
    assert len(lines) == 2, lines  # the finding before training, and the saved label names
    assert lines[0].startswith("warning: ") and f"rerun with --label-map {spec}" in lines[0]
    assert "agrees with 0% of the labels" in lines[0] and "100% once" in lines[0]
    assert "keeps the teacher's label names" in lines[1]
    # the flag applies the permutation: the labels are then the teacher's own decisions, and nothing is said
    run_main(tmp_path, "mapped", teacher=nli_teacher, train=path, max_steps=1, label_map=spec)
    assert "--label-map" not in capsys.readouterr().out.replace("--label-map 0:2", "")
    ex = load(path, load_tok(nli_teacher), tmp_path, id2label=dict(enumerate(NLI)),
              label_map=tasks.parse_label_map(spec, dict(enumerate(NLI))))
    assert ex.labels.tolist() == decided


def test_a_labels_only_run_in_another_order_warns_about_the_saved_names(nli_teacher, permuted, tmp_path, capsys):
    path, _, spec = permuted
    run_main(tmp_path, "labels_only", teacher=nli_teacher, train=path, max_steps=1, alpha_kd=0)
    out = capsys.readouterr().out
    assert f"rerun with --label-map {spec}" in out
    assert "keeps the teacher's label names (0 ENTAILMENT, 1 NEUTRAL, 2 CONTRADICTION)" in out
    assert "with --alpha-kd 0 the student learnt the data ids alone" in out


def test_label_order_is_quiet_for_a_teacher_that_is_merely_poor():
    rng = np.random.default_rng(0)
    labels = {i: int(rng.integers(0, 3)) for i in range(200)}
    noise = {i: rng.normal(size=3) for i in labels}  # a teacher that knows nothing: about chance
    assert heldout.label_order(SINGLE, noise, labels, 3) is None
    right = {i: np.eye(3)[y] for i, y in labels.items()}
    assert heldout.label_order(SINGLE, right, labels, 3) is None
    swapped = {i: np.eye(3)[(y + 1) % 3] for i, y in labels.items()}
    agreement, chance, permutation, permuted = heldout.label_order(SINGLE, swapped, labels, 3)
    assert agreement == 0 and permutation == {0: 1, 1: 2, 2: 0} and permuted == 1.0
    assert heldout.label_order(SINGLE, dict(list(swapped.items())[:5]), labels, 3) is None  # too few to say


@pytest.mark.parametrize("text,message", [("0:2,0:1", "mapped twice"), ("0:2,1:2", "one to one"),
                                          ("0:7", "none of the teacher's labels"), ("0-2", "DATA:TEACHER pairs")])
def test_bad_label_maps_are_one_line(text, message):
    with pytest.raises(DataError, match=message) as e:
        tasks.parse_label_map(text, dict(enumerate(NLI)))
    assert "\n" not in str(e.value)


def test_a_label_missing_from_the_map_is_named(tokenizer, tmp_path):
    path = write_csv(tmp_path / "ids.csv", ["text", "label"], [("the cat", "0"), ("a dog", "2")])
    with pytest.raises(DataError, match=r"line 3: label '2' is not in --label-map"):
        load(path, tokenizer, tmp_path, id2label=dict(enumerate(NLI)),
             label_map=tasks.parse_label_map("0:1,1:0", dict(enumerate(NLI))))


# ---------------------------------------------------------------------------------------------
# 3. A transfer set without a label column
# ---------------------------------------------------------------------------------------------

def test_text_alone_trains_when_no_label_is_asked_for(nli_teacher, tmp_path, capsys):
    path = write_csv(tmp_path / "transfer.csv", ["text"], [(t,) for t in sentences(24, 3)])
    run_main(tmp_path, "transfer", teacher=nli_teacher, train=path, max_steps=2, alpha_label=0)
    assert "no column 'label': all without a label (taught by the teacher only)" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"transfer\.csv has no column 'label' \(columns: text\); pass --label-column "
                                        r"with the labels' column, or --alpha-label 0 to distil from the teacher") as e:
        train.main(["--teacher", nli_teacher, "--train", path, "--out", str(tmp_path / "o"), "--cache-dir",
                    str(tmp_path / "c"), "--no-progress"])
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "o")
    assert "taught by the teacher only" not in capsys.readouterr().out  # no note contradicting the refusal


def test_a_misspelt_label_field_is_not_taken_for_unlabelled_text(nli_teacher, tmp_path):
    """JSONL records name their own fields: a wrong --label-column used to give a run on the teacher alone."""
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t, "sentiment": "NEUTRAL"} for t in sentences(24, 3)])
    with pytest.raises(DataError, match=r"has no label in 'label' in any record \(columns: sentiment, text\)"):
        train.main(["--teacher", nli_teacher, "--train", path, "--out", str(tmp_path / "o"), "--cache-dir",
                    str(tmp_path / "c"), "--no-progress", "--batch-size", "8"])
    transfer = write_csv(tmp_path / "transfer.csv", ["text"], [(t,) for t in sentences(24, 3)])
    with pytest.raises(DataError, match=r"--valid .*t\.jsonl has no label in 'label' in any record.*held-out scores need "
                                        r"labels"):
        train.main(["--teacher", nli_teacher, "--train", transfer, "--valid", path, "--alpha-label", "0", "--out",
                    str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--no-progress"])


# ---------------------------------------------------------------------------------------------
# 4. Multi-hot label vectors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("one,zero", [(1, 0), (1.0, 0.0)])
def test_multi_hot_vectors_are_read_as_one_entry_per_label(tokenizer, tmp_path, one, zero):
    path = write_jsonl(tmp_path / "hot.jsonl", [{"text": "the cat", "label": [one, zero, one]},
                                                {"text": "a dog", "label": [zero, one, zero]},
                                                {"text": "sky", "label": [zero, zero, zero]}, {"text": "tree"}])
    ex = load(path, tokenizer, tmp_path, MULTI, dict(enumerate(ANIMALS)))
    assert ex.labels[:3].tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]] and np.isnan(ex.labels[3]).all()
    assert "labels read as multi-hot vectors" in tasks.examples_note(ex, path)
    cells = write_csv(tmp_path / "hot.csv", ["text", "label"], [("the cat", "1,0,1"), ("a dog", "0;1;0")])
    assert load(cells, tokenizer, tmp_path, MULTI, dict(enumerate(ANIMALS))).labels.tolist() == [[1, 0, 1], [0, 1, 0]]
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"text": "the cat", "label": [0, 2]}, {"text": "a dog", "label": [1]}])
    ex = load(ids, tokenizer, tmp_path, MULTI, dict(enumerate(ANIMALS)))  # lists of ids stay lists of ids
    assert ex.labels.tolist() == [[1, 0, 1], [0, 1, 0]] and "multi-hot" not in tasks.examples_note(ex, ids)


def test_a_multi_hot_run_saves_a_multi_label_student(tmp_path):
    teacher = make_task_teacher(str(tmp_path / "teacher"), MULTI, labels=ANIMALS)
    path = write_jsonl(tmp_path / "hot.jsonl", [{"text": t, "label": [int(a in t.split()) for a in ANIMALS]}
                                                for t in sentences(24, 4)])
    out = run_main(tmp_path, "hot", teacher=teacher, train=path, valid=path, max_steps=2, eval_every=2)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["problem_type"] == MULTI and config["id2label"] == {"0": "cat", "1": "dog", "2": "bird"}
    assert any("valid_micro_f1" in r for r in metrics(out))
    # fine-tuning with --task: as many labels as the vectors have entries
    assert tasks.labels_from_data(path, MULTI, "label", "text") == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}


def test_a_list_for_a_single_label_teacher_says_how_to_make_it_multi_label(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "hot.jsonl", [{"text": "the cat", "label": [1, 0]}])
    with pytest.raises(DataError, match=r'is a list, but the teacher predicts one label per text.*"problem_type": '
                                        r'"multi_label_classification"'):
        load(path, tokenizer, tmp_path)


def test_a_teacher_without_problem_type_is_said_to_be_read_as_single_label(tmp_path, capsys):
    from transformers import AutoConfig
    teacher = make_task_teacher(str(tmp_path / "teacher"), SINGLE)
    config = AutoConfig.from_pretrained(teacher)
    config.problem_type = None
    config.save_pretrained(teacher)
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [(t, "pos") for t in sentences(16, 1)])
    run_main(tmp_path, "guess", teacher=teacher, train=path, max_steps=1)
    assert "its config names no problem_type; read as single_label_classification (2 outputs)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 5. RoBERTa-family token classification
# ---------------------------------------------------------------------------------------------

def test_a_roberta_tagger_fine_tuned_with_prefix_spaces_is_read_as_it_was_trained(tmp_path):
    """run_ner.py fine-tunes RoBERTa-family taggers with add_prefix_space=True; read without it, every word
    is spelt with tokens the teacher never saw in that place."""
    pytest.importorskip("seqeval", reason="entity F1 of IOB tags needs the optional seqeval package")
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    folder, words = family_task_teacher("roberta", str(tmp_path / "teacher"), TOKEN)
    records = [{"tokens": t.split(), "ner_tags": ["B-ANIMAL" if w.lower() in ANIMALS else "O" for w in t.split()]}
               for t in sentences(64, 1, words=words)]
    trainer_tokenizer = AutoTokenizer.from_pretrained(folder, add_prefix_space=True)  # as run_ner.py loads it
    model = AutoModelForTokenClassification.from_pretrained(folder)
    enc = trainer_tokenizer([r["tokens"] for r in records], is_split_into_words=True, padding=True, return_tensors="pt")
    labels = torch.full(enc["input_ids"].shape, -100)
    for i, r in enumerate(records):
        seen = set()
        for j, w in enumerate(enc.word_ids(i)):
            if w is not None and w not in seen:
                seen.add(w)
                labels[i, j] = TAGS.index(r["ner_tags"][w])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)

    teacher = load_teacher(folder)
    tokenizer = load_tokenizer(teacher, folder, masked_lm=False, words=True)
    assert tokenizer(["the", "cat"], is_split_into_words=True)["input_ids"] == \
        trainer_tokenizer(["the", "cat"], is_split_into_words=True)["input_ids"]
    path = write_jsonl(tmp_path / "ner.jsonl", records)
    ex = load(path, tokenizer, tmp_path, TOKEN, dict(enumerate(TAGS)), "tokens", "ner_tags")
    predictions = heldout.predict(teacher, tasks.valid_task_batches(ex, tokenizer.pad_token_id, 16), "cpu", nullcontext)
    scores = heldout.task_metrics(TOKEN, predictions, heldout.gold(ex), dict(enumerate(TAGS)))
    assert scores["accuracy"] > 0.95 and scores["entity_f1"] > 0.9, scores  # read without: 0.93 and 0.0


# ---------------------------------------------------------------------------------------------
# 6. A text pair without its second text
# ---------------------------------------------------------------------------------------------

def test_a_pair_without_its_second_text_is_skipped_and_counted(tokenizer, tmp_path):
    path = write_csv(tmp_path / "pairs.csv", ["premise", "hypothesis", "label"],
                     [("the cat sat", "a cat", "pos"), ("a dog ran", "", "neg"), ("", "the sky", "neg"),
                      ("red sky", "blue sky", "neg")])
    ex = load(path, tokenizer, tmp_path, text="premise", pair="hypothesis")
    assert ex.meta["records"] == 2 and ex.labels.tolist() == [1, 0]
    note = tasks.examples_note(ex, path)
    assert "1 records without a second text in 'hypothesis' skipped" in note and "1 empty records skipped" in note
    records = write_jsonl(tmp_path / "pairs.jsonl", [{"premise": "the cat", "hypothesis": None, "label": "pos"},
                                                     {"premise": "a dog", "label": "neg"},
                                                     {"premise": "red", "hypothesis": "sky", "label": "neg"}])
    ex = load(records, tokenizer, tmp_path, text="premise", pair="hypothesis")
    assert ex.meta["records"] == 1 and ex.meta["no_pair"] == 2


# ---------------------------------------------------------------------------------------------
# 7. Records left out of each epoch
# ---------------------------------------------------------------------------------------------

def test_the_records_an_epoch_leaves_out_are_said(nli_teacher, tmp_path, capsys):
    path = write_csv(tmp_path / "few.csv", ["text", "label"], [(t, "NEUTRAL") for t in sentences(40, 5)])
    run_main(tmp_path, "few", teacher=nli_teacher, train=path, batch_size=32, max_steps=1)
    assert ("an epoch is 1 steps of 32 records, so 8 of the 40 records (20%) are left out of each epoch (a different 8 "
            "each time); --batch-size 20 uses them all") in capsys.readouterr().out
    run_main(tmp_path, "all", teacher=nli_teacher, train=path, batch_size=20, max_steps=2)
    assert "left out" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 8. Words that tokenize to nothing
# ---------------------------------------------------------------------------------------------

def test_words_that_tokenize_to_nothing_are_not_called_cut(tmp_path):
    folder = make_task_teacher(str(tmp_path / "t"), TOKEN, labels=TAGS)
    tokenizer = load_tok(folder)
    words = ["the", "\u200b", "cat", "", "sat", "\u00ad", "bird"]
    tags = ["O", "O", "B-ANIMAL", "O", "O", "O", "B-ANIMAL"]
    path = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": words, "ner_tags": tags}])
    ex = load(path, tokenizer, tmp_path, TOKEN, dict(enumerate(TAGS)), "tokens", "ner_tags")
    assert ex.meta["words_empty"] == 3 and ex.meta["words_lost"] == 0
    note = tasks.examples_note(ex, path)
    assert "3 words that tokenize to nothing" in note and "past the cut" not in note
    # no label moves to a neighbour: the words that have tokens keep their own tags, in order
    assert heldout.gold(ex)[0].tolist() == [TAGS.index(t) for w, t in zip(words, tags) if tokenizer.tokenize(w)]
    cut = load(path, tokenizer, tmp_path, TOKEN, dict(enumerate(TAGS)), "tokens", "ner_tags", seq_len=4)
    assert cut.meta["words_lost"] == 2 and cut.meta["words_empty"] == 3  # the cut itself still counted as such


# ---------------------------------------------------------------------------------------------
# 9. --resume on a finished run; the run's own settings
# ---------------------------------------------------------------------------------------------

def test_resuming_a_finished_run_says_so_and_writes_nothing(nli_teacher, tmp_path, capsys):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [(t, "NEUTRAL") for t in sentences(16, 1)])
    out = run_main(tmp_path, "done", teacher=nli_teacher, train=path, valid=path, max_steps=2, eval_every=2)
    before = {name: open(os.path.join(out, name), "rb").read() for name in ("README.md", "metrics.jsonl", "run.json")}
    capsys.readouterr()
    assert train.main(["--out", out, "--resume"]) == 2  # the run's flags come from its run.json
    assert capsys.readouterr().out.strip().splitlines() == [
        f"{out} holds a finished run (step 2): nothing to do; a larger --max-steps extends it"]
    assert before == {name: open(os.path.join(out, name), "rb").read() for name in before}
    result = run(["train.py", "--out", out, "--resume"])
    assert result.returncode == 0 and "finished run (step 2)" in result.stdout
    shutil.rmtree(os.path.join(out, "checkpoints"))  # freed, as the run's last line says: still finished
    assert train.main(["--out", out, "--resume"]) == 2
    assert "its checkpoints are deleted" in capsys.readouterr().out
    assert before == {name: open(os.path.join(out, name), "rb").read() for name in before}
    result = run(["train.py", "--out", out, "--resume", "--max-steps", "4"])
    assert result.returncode == 1 and "whose checkpoints are deleted" in result.stderr


def test_resume_and_heldout_take_the_runs_own_settings(nli_teacher, tmp_path, capsys):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [(t, "NEUTRAL") for t in sentences(16, 1)])
    out = run_main(tmp_path, "run", teacher=nli_teacher, train=path, valid=path, max_steps=2, eval_every=2,
                   label_column="label", lr=1e-4)
    args = flags.parse_args(["--out", out, "--resume"])
    assert (args.teacher, args.train, args.valid, args.lr, args.dtype, args.batch_size) == \
        (nli_teacher, path, path, 1e-4, "fp32", 8)
    assert flags.parse_args(["--out", out, "--resume", "--lr", "2e-4"]).lr == 2e-4  # the command line wins
    capsys.readouterr()
    result = heldout.main([out])  # no --valid, no --teacher: the run's
    assert result["teacher"] is not None and result["student"]["examples"] == 16
    assert "| | teacher | student |" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 10. A mistyped local teacher folder
# ---------------------------------------------------------------------------------------------

def test_a_mistyped_teacher_folder_fails_at_once_naming_the_nearest(nli_teacher, tmp_path, monkeypatch):
    import shutil
    shutil.copytree(nli_teacher, tmp_path / "teachers" / "minilm-l6-quick")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # as a user has it: a hub name would be retried online
    start = time.perf_counter()
    with pytest.raises(StudentError, match=r"--teacher teachers/minilm-l6-quik: no such folder; the nearest "
                                           r"existing: teachers/minilm-l6-quick") as e:
        load_teacher("teachers/minilm-l6-quik")
    assert "\n" not in str(e.value) and time.perf_counter() - start < 2
    with pytest.raises(StudentError, match="no such folder"):
        load_teacher("runs/2024/teacher")  # two slashes: no hub id has them


# ---------------------------------------------------------------------------------------------
# 11. Ctrl-C in the first seconds
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="watches the process's libraries in /proc (Linux)")
def test_ctrl_c_while_starting_is_one_line(tmp_path):
    process = subprocess.Popen([sys.executable, "train.py", "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT))
    # wait until torch's library is mapped: the process is then inside its imports (for seconds more)
    deadline = time.time() + 120
    while process.poll() is None and time.time() < deadline:
        try:
            with open(f"/proc/{process.pid}/maps") as f:
                if "libtorch" in f.read():
                    break
        except OSError:
            pass
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0 and "Traceback" not in err, err
    assert err.strip() == "error: interrupted while starting; nothing was written"


def test_an_interruption_names_only_a_checkpoint_that_exists(tmp_path):
    out = str(tmp_path / "run")
    assert train.interrupted_message(None) == train.interrupted_message(out) == \
        "error: interrupted before the first checkpoint; nothing to resume: run the command again"
    checkpoint.save_checkpoint({"step": 3}, out, keep=3)
    assert train.interrupted_message(out) == (f"error: interrupted; the newest checkpoint is "
                                              f"{checkpoint.checkpoint_path(out, 3)}: --resume continues from it")


# ---------------------------------------------------------------------------------------------
# 12. Small things
# ---------------------------------------------------------------------------------------------

def test_heldout_without_a_teacher_prints_no_teacher_column(nli_teacher, tmp_path, capsys):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [(t, "NEUTRAL") for t in sentences(16, 1)])
    heldout.main([nli_teacher, "--valid", path, "--cache-dir", str(tmp_path / "c")])
    table = capsys.readouterr().out
    assert table.startswith("| | student |\n|---|---|\n| accuracy | ") and "teacher" not in table


def test_negative_layers_get_the_projects_own_error(nli_teacher, tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [(t, "NEUTRAL") for t in sentences(16, 1)])
    with pytest.raises(StudentError, match=r"--layers -1,1: layer\(s\) \[-1\] out of range; the teacher has 2 layers"):
        train.main(["--teacher", nli_teacher, "--train", path, "--out", str(tmp_path / "o"), "--cache-dir",
                    str(tmp_path / "c"), "--no-progress", "--layers", "-1,1"])


def test_help_names_every_default(capsys):
    import re
    with pytest.raises(SystemExit):
        flags.parse_args(["--help"])
    # one entry per flag: its line ("  --flag VALUE  help") and the indented lines that continue it
    text = capsys.readouterr().out.split("options:")[1]
    entries = [" ".join(e.split()) for e in re.split(r"\n(?=  -)", text)]
    for flag, default in [("--epochs", "3.0"), ("--temperature", "2.0"), ("--seed", "42"), ("--eval-every", "500"),
                          ("--save-every", "1000"), ("--log-every", "10"), ("--device", "auto"), ("--alpha-mse", "0.0"),
                          ("--keep", "3"), ("--batch-size", "32"), ("--kd-on", "masked"), ("--min-tokens", "5")]:
        entry = next(e for e in entries if e.startswith(flag + " "))
        assert f"(default: {default})" in entry, entry


def test_a_finished_run_says_how_to_drop_its_checkpoints(nli_teacher, tmp_path, capsys):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [(t, "NEUTRAL") for t in sentences(16, 1)])
    out = run_main(tmp_path, "ck", teacher=nli_teacher, train=path, max_steps=1)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("checkpoints: ") and "rm -r that folder" in line
    assert f"in {os.path.join(out, 'checkpoints')}" in line


def test_the_docs_links_resolve():
    import glob
    import re
    broken = []
    for page in glob.glob(os.path.join(ROOT, "docs", "*.md")) + [os.path.join(ROOT, "README.md")]:
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", open(page).read()):
            if not link.startswith(("http://", "https://")) and \
                    not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(page), link))):
                broken.append(f"{os.path.relpath(page, ROOT)}: {link}")
    assert not broken


# ---------------------------------------------------------------------------------------------
# Beyond the twelve: other places where reading guessed
# ---------------------------------------------------------------------------------------------

def test_a_class_label_of_minus_one_is_no_label(tokenizer, tmp_path):
    """datasets' ClassLabel writes -1 where a split has no label (GLUE's test splits): unlabelled, not an error."""
    pytest.importorskip("datasets", reason="reading a saved dataset needs the optional datasets package")
    from datasets import ClassLabel, Dataset, Features, Value
    Dataset.from_dict({"text": ["the cat", "a dog"], "label": [1, -1]},
                      features=Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
                      ).save_to_disk(str(tmp_path / "test_split"))
    ex = load(tmp_path / "test_split", tokenizer, tmp_path)
    assert ex.labels.tolist() == [1, -100] and ex.meta["labelled"] == 1


def test_words_given_as_one_string_are_said_to_be_split(tmp_path):
    folder = make_task_teacher(str(tmp_path / "t"), TOKEN, labels=TAGS)
    path = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": "the cat sat", "ner_tags": ["O", "B-ANIMAL", "O"]}])
    ex = load(path, load_tok(folder), tmp_path, TOKEN, dict(enumerate(TAGS)), "tokens", "ner_tags")
    assert "the words of 1 records were one string in 'tokens', split on spaces" in tasks.examples_note(ex, path)
