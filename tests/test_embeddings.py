"""Sentence-embedding teachers (issue 24): a sentence-transformers folder in, a smaller one out.

The teachers here are tiny BERTs saved in the layout sentence-transformers writes (modules.json, a
Pooling folder, optional Dense folders and Normalize), written by hand from its documented format,
so that reading them does not depend on this project's own writer. sentence-transformers itself
(requirements-test.txt) checks the pooling and loads the students the runs save; the tests that
need it skip when it is absent.
"""

import json
import os
import subprocess
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import WORDS, write_bert_vocab, write_corpus
from test_resume import STOP_AT_STEP, flags, metrics, ok, run, train_records, weights, wrapper

TEXTS = ["the cat sat on a mat", "a dog ran to the big red house in the small green park",
         "old man saw bird fly over tree", "blue sky", "the river near the park under a warm blue sky every day"]


def make_sentence_teacher(folder, pooling="mean", dense=None, normalize=True, n_layers=4, hidden=32, seed=0,
                          dropout=0.0, module_type=None):
    """A tiny sentence-transformers folder: BertModel + tokenizer at the top, modules.json, 1_Pooling,
    a Dense module per entry of `dense` ((out_features, activation class path)), Normalize."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel, BertTokenizer
    os.makedirs(folder, exist_ok=True)
    vocab = write_bert_vocab(os.path.join(folder, "vocab.txt"))
    BertTokenizer(vocab=os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=2,
                         intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=dropout,
                         attention_probs_dropout_prob=dropout)).save_pretrained(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": hidden, "pooling_mode_cls_token": pooling == "cls",
                   "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max",
                   "pooling_mode_mean_sqrt_len_tokens": False}, f)
    width = hidden
    for out_features, activation in dense or []:
        i = len(modules)
        path = os.path.join(folder, f"{i}_Dense")
        os.makedirs(path)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"in_features": width, "out_features": out_features, "bias": True,
                       "activation_function": activation}, f)
        save_file({"linear.weight": torch.randn(out_features, width) / width ** 0.5,
                   "linear.bias": torch.randn(out_features) * 0.1}, os.path.join(path, "model.safetensors"))
        modules.append({"idx": i, "name": str(i), "path": f"{i}_Dense", "type": "sentence_transformers.models.Dense"})
        width = out_features
    if normalize:
        i = len(modules)
        modules.append({"idx": i, "name": str(i), "path": f"{i}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    if module_type:  # a module this project cannot hold
        modules.append({"idx": len(modules), "name": "x", "path": "x", "type": module_type})
    with open(os.path.join(folder, "modules.json"), "w") as f:
        json.dump(modules, f)
    with open(os.path.join(folder, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": 48, "do_lower_case": False}, f)
    with open(os.path.join(folder, "config_sentence_transformers.json"), "w") as f:
        json.dump({"prompts": {"query": "query: "}, "default_prompt_name": None, "similarity_fn_name": "dot"}, f)
    return folder


TANH = "torch.nn.modules.activation.Tanh"


def write_labelled(path, n=60, seed=4):
    """A .csv of texts with a label that depends on their words (1: the text mentions a cat or a dog)."""
    import csv
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            words = list(rng.choice(WORDS, size=rng.integers(4, 12)))
            if i % 2:
                words[0] = str(rng.choice(["cat", "dog"]))
            else:
                words = [x for x in words if x not in ("cat", "dog")] or ["sky"]
            w.writerow([" ".join(words), "animal" if i % 2 else "other"])
    return path


def encode_own(model, texts, folder):
    from transformers import AutoTokenizer
    from embeddings import embed
    batch = AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return embed(model.eval(), batch["input_ids"], batch["attention_mask"])[0]


@pytest.mark.parametrize("pooling,dense,normalize", [("mean", None, True), ("cls", None, False), ("max", None, True),
                                                     ("mean", [(24, TANH)], True)])
def test_pooling_and_modules_equal_sentence_transformers(tmp_path, pooling, dense, normalize):
    """Mean over the real tokens, CLS, max (padding excluded), a Dense module and Normalize: the same
    vectors as sentence-transformers computes from the same folder, on a padded batch."""
    st = pytest.importorskip("sentence_transformers")
    from embeddings import load_sentence_model
    folder = make_sentence_teacher(str(tmp_path / "t"), pooling, dense, normalize)
    expected = st.SentenceTransformer(folder, device="cpu").encode(TEXTS, convert_to_tensor=True)
    got = encode_own(load_sentence_model(folder), TEXTS, folder)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def student_args(**values):
    base = dict(layers=None, student=None, student_arch="teacher", student_init="teacher", student_hidden=None,
                student_heads=None)
    return SimpleNamespace(**{**base, **values})


def test_student_with_all_layers_equals_teacher(tmp_path):
    from distil import DistilConfig
    from embeddings import build_embedding_student, embedding_batch, embedding_step, first_pieces, load_embedding_teacher
    folder = make_sentence_teacher(str(tmp_path / "t"), dense=[(24, TANH)])
    teacher = load_embedding_teacher(folder)
    student, layers = build_embedding_student(teacher, student_args(layers="0,1,2,3"), False)
    assert layers == [0, 1, 2, 3] and student.sentence == teacher.sentence
    torch.testing.assert_close(encode_own(student, TEXTS, folder), encode_own(teacher, TEXTS, folder), atol=0, rtol=0)
    half, layers = build_embedding_student(teacher, student_args(), False)
    assert layers == [0, 3] and half.config.num_hidden_layers == 2  # the default: an evenly spread half
    # the step: loss 0 between equal models, positive for the half student
    from transformers import AutoTokenizer
    from token_cache import load_corpus
    tokenizer = AutoTokenizer.from_pretrained(folder)
    corpus = load_corpus(write_corpus(str(tmp_path / "c.txt"), 10), tokenizer, str(tmp_path / "cache"))
    seqs, _, _ = first_pieces(corpus, 16)
    batch = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
             for k, v in embedding_batch(seqs, np.arange(6), tokenizer).items()}
    cfg = DistilConfig(alpha_kd=0, alpha_mlm=0, alpha_cos=0, alpha_embed=1.0)
    student.eval()
    assert embedding_step(student, teacher, batch, cfg)[0].item() == 0.0
    assert embedding_step(half.eval(), teacher, batch, cfg)[0].item() > 0


def test_texts_are_truncated_one_per_sequence_and_counted(tmp_path):
    from transformers import AutoTokenizer
    from embeddings import first_pieces
    from token_cache import load_corpus
    folder = make_sentence_teacher(str(tmp_path / "t"))
    path = tmp_path / "c.txt"
    path.write_text("the cat sat\n" + " ".join(["dog"] * 30) + "\nblue sky\n")
    corpus = load_corpus(str(path), AutoTokenizer.from_pretrained(folder), str(tmp_path / "cache"))
    seqs, truncated, dropped = first_pieces(corpus, 12)  # 10 tokens of text each
    assert list(seqs.lengths) == [3, 10, 2] and (truncated, dropped) == (1, 20)


def test_narrow_student_gets_a_learned_dense_projection(tmp_path):
    from embeddings import build_embedding_student, load_embedding_teacher
    teacher = load_embedding_teacher(make_sentence_teacher(str(tmp_path / "t")))
    student, _ = build_embedding_student(teacher, student_args(student_hidden=16, student_heads=2), False)
    linear = student.sentence_dense[0][0]
    assert (linear.in_features, linear.out_features) == (16, 32) and linear.weight.requires_grad
    torch.testing.assert_close(linear.weight, torch.eye(32, 16))


def test_agreement_and_probe():
    from embeddings import agreement, probe_accuracy
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g)
    same = agreement(x, x)
    assert same["cosine"] == pytest.approx(1) and same["spearman"] == pytest.approx(1) and same["top10_overlap"] == 1
    other = agreement(torch.randn(50, 8, generator=g), x)
    assert other["spearman"] < 0.3 and other["top10_overlap"] < 0.5
    labels = (x[:, 0] > 0).long().numpy()
    assert probe_accuracy(x, labels) >= 0.9  # linearly separable
    assert probe_accuracy(torch.randn(50, 8, generator=g), labels) < 0.8


# ------------------------------------------------------------------------------------------------
# Runs of train.py
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("emb_data")
    return SimpleNamespace(train=write_corpus(str(folder / "train.txt"), 64, max_words=20, seed=5),
                           valid=write_labelled(str(folder / "valid.csv")), cache=str(folder / "cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """8 steps of a 2-layer student of a 4-layer mean-pooling, normalising teacher."""
    folder = tmp_path_factory.mktemp("emb_run")
    teacher = make_sentence_teacher(str(folder / "teacher"))
    out = str(folder / "out")
    base = dict(teacher=teacher, train=data.train, valid=data.valid, cache_dir=data.cache, seq_len=16, batch_size=8,
                max_steps=8, dtype="fp32", log_every=1, eval_every=4, no_progress=True)
    proc = ok(run(flags(base, out=out)))
    return SimpleNamespace(out=out, teacher=teacher, base=base, stdout=proc.stdout)


def test_output_loads_in_sentence_transformers_as_the_trained_student(trained):
    """SentenceTransformer(OUT) encodes what the trained student (the final checkpoint's weights) encodes;
    AutoModel loads OUT too; the teacher's pooling, normalisation, max_seq_length, prompts, similarity go along."""
    st = pytest.importorskip("sentence_transformers")
    from transformers import AutoModel
    from embeddings import build_embedding_student, load_embedding_teacher
    teacher = load_embedding_teacher(trained.teacher)
    student, _ = build_embedding_student(teacher, student_args(), False)
    ckpt = torch.load(os.path.join(trained.out, "checkpoints", "step-00000008.pt"), weights_only=True)
    student.load_state_dict(ckpt["student"])
    model = st.SentenceTransformer(trained.out, device="cpu")
    torch.testing.assert_close(model.encode(TEXTS, convert_to_tensor=True), encode_own(student, TEXTS, trained.out),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(encode_own(student, TEXTS, trained.out), encode_own(teacher, TEXTS, trained.out))
    assert model.max_seq_length == 48 and model.similarity_fn_name == "dot" and model.prompts["query"] == "query: "
    assert AutoModel.from_pretrained(trained.out).config.num_hidden_layers == 2
    card = open(os.path.join(trained.out, "README.md")).read()
    assert "pipeline_tag: sentence-similarity" in card and "layers 0, 3" in card


def test_run_logs_the_scores_without_and_with_labels(trained):
    records = metrics(trained.out)
    teacher = next(r for r in records if "teacher_probe_accuracy" in r)
    valid = [r for r in records if "valid_spearman" in r]
    assert [r["step"] for r in valid] == [4, 8]
    for key in ("valid_cosine", "valid_spearman", "valid_top10_overlap", "valid_probe_accuracy", "valid_speedup"):
        assert key in valid[-1]
    assert 0 <= teacher["teacher_probe_accuracy"] <= 1 and -1 <= valid[-1]["valid_spearman"] <= 1
    assert all("embed" in r for r in records if "loss" in r)
    assert "60 held-out texts, 2 labels" in trained.stdout


def test_narrow_student_saves_its_projection_as_a_dense_module(trained, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from embeddings import load_sentence_model
    out = str(tmp_path / "narrow")
    ok(run(flags(trained.base, out=out, max_steps=2, student_hidden=16, student_heads=2, valid=None)))
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.load(open(os.path.join(out, "modules.json")))]
    assert modules == ["Transformer", "Pooling", "Dense", "Normalize"]
    model = st.SentenceTransformer(out, device="cpu")
    vectors = model.encode(TEXTS, convert_to_tensor=True)
    assert vectors.shape == (len(TEXTS), 32)
    torch.testing.assert_close(vectors, encode_own(load_sentence_model(out), TEXTS, out), atol=1e-5, rtol=1e-5)


def test_two_ranks_equal_one_rank(tmp_path, data):
    """The same 6 steps of global batch 8 as 2 ranks x 4 and 1 rank x 8, with a Dense module (parameters
    outside the transformer's forward) and a layer loss: the same losses and weights to 1e-5."""
    teacher = make_sentence_teacher(str(tmp_path / "teacher"), dense=[(24, TANH)])
    base = dict(teacher=teacher, train=data.train, cache_dir=data.cache, seq_len=16, max_steps=6, dtype="fp32",
                log_every=1, save_every=100, alpha_hidden=1.0, no_progress=True)
    ok(run(flags(base, out=str(tmp_path / "two"), batch_size=4), nproc=2))
    ok(run(flags(base, out=str(tmp_path / "one"), batch_size=8)))
    two, one = train_records(tmp_path / "two"), train_records(tmp_path / "one")
    assert len(two) == len(one) == 6
    for a, b in zip(two, one):
        assert a.keys() == b.keys() and {"embed", "hidden"} <= a.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    wa, wb = weights(tmp_path / "two"), weights(tmp_path / "one")
    for key in wb:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-5)


def test_stopped_and_resumed_run_is_the_same_run(tmp_path, data):
    """SIGTERM inside step 3 (dropout on, in warmup, mid-epoch); --resume gives bitwise the same losses,
    held-out scores (timings aside) and weights as the run never stopped."""
    teacher = make_sentence_teacher(str(tmp_path / "teacher"), dropout=0.1, dense=[(24, TANH)])
    base = dict(teacher=teacher, train=data.train, valid=data.valid, cache_dir=data.cache, seq_len=16, batch_size=4,
                grad_accum=2, max_steps=10, warmup=0.5, dtype="fp32", log_every=1, eval_every=5, no_progress=True)
    ok(run(flags(base, out=str(tmp_path / "reference"))))
    out = str(tmp_path / "out")
    stopped = ok(run(flags(base, out=out, save_every=100), script=wrapper(tmp_path, "stop", STOP_AT_STEP),
                     env={"STOP_AFTER": "3"}))
    assert "stopped at step 5 as asked" in stopped.stdout  # read a step late (train_step.StepCounters)
    resumed = ok(run(flags(base, out=out, resume=True)))
    assert "at step 5" in resumed.stdout
    assert train_records(out) == train_records(tmp_path / "reference")
    scores = lambda o: [{k: v for k, v in r.items() if "encode_s" not in k and "speedup" not in k}
                        for r in metrics(o) if "valid_spearman" in r]
    assert scores(out) == scores(tmp_path / "reference")
    wa, wb = weights(out), weights(tmp_path / "reference")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("change,expected", [
    (dict(module_type="sentence_transformers.models.CNN"), "modules.json names sentence_transformers.models.CNN"),
    (dict(pooling="weightedmean"), "pooling"),
    (dict(dense=[(24, "torch.nn.modules.activation.GELU")]), "activation torch.nn.modules.activation.GELU"),
])
def test_a_folder_the_project_cannot_hold_is_refused_in_one_line(tmp_path, data, change, expected):
    if change.get("pooling") == "weightedmean":  # written by hand: sentence-transformers 5's pooling_mode key
        folder = make_sentence_teacher(str(tmp_path / "t"))
        json.dump({"embedding_dimension": 32, "pooling_mode": "weightedmean"},
                  open(os.path.join(folder, "1_Pooling", "config.json"), "w"))
    else:
        folder = make_sentence_teacher(str(tmp_path / "t"), **change)
    proc = run(flags(teacher=folder, train=data.train, out=str(tmp_path / "out"), cache_dir=data.cache, max_steps=1))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --teacher") and expected in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "out")


def test_logit_losses_are_refused_for_an_embedding_teacher(tmp_path, data):
    folder = make_sentence_teacher(str(tmp_path / "t"))
    proc = run(flags(teacher=folder, train=data.train, out=str(tmp_path / "out"), cache_dir=data.cache, alpha_kd=1.0))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "--alpha-kd" in lines[0] and "--alpha-embed" in lines[0]


def test_global_batches_do_not_depend_on_their_split():
    """Grouped by length, yet the texts of each optimizer step are the same on 1 rank x 8, 2 ranks x 4
    and 1 rank x 4 x 2 micro-steps; every text once per epoch, and little padding within a micro-batch."""
    from data import Sequences
    from embeddings import step_batches
    lengths = np.random.default_rng(0).integers(1, 60, size=203)
    seqs = Sequences(np.zeros(1), np.zeros(203, dtype=np.int64), lengths)
    one = step_batches(seqs, 8, 1, 5, 0)
    two = [step_batches(seqs, 4, 1, 5, 0, rank, 2) for rank in (0, 1)]
    accumulated = step_batches(seqs, 4, 2, 5, 0)
    assert len(one) == 25 and len(two[0]) == 25 and len(accumulated) == 50
    for s in range(25):
        assert sorted(one[s]) == sorted(np.concatenate([two[0][s], two[1][s]])) == \
            sorted(np.concatenate(accumulated[2 * s:2 * s + 2]))
    assert len(set(np.concatenate(one))) == 200
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in one])
    assert spread < 5  # sorted within groups of 50 steps (random batches: about 50)


def test_embedding_steps_read_back_once_per_step(tmp_path, data):
    """test_sync.py's count for a sentence-embedding run (with Dense modules, mean pooling and a layer
    loss): no read of the step's own (skip, counters and flags stay on the device, train_step.py), only
    at most the one read per model that transformers' SDPA mask builder makes on a padded batch
    (teacher and student: 2 per micro-step; none when a batch's texts are all of one length). Nothing
    of embeddings.py's own."""
    from test_sync import reads_per_step
    teacher = make_sentence_teacher(str(tmp_path / "teacher"), dense=[(24, TANH)])
    base = ["--teacher", teacher, "--train", data.train, "--batch-size", "4", "--seq-len", "16", "--log-every", "1000",
            "--save-every", "1000", "--no-progress", "--cache-dir", data.cache, "--dtype", "fp32", "--alpha-hidden", "1"]
    for accum in (1, 2):
        reads = reads_per_step((base, tmp_path), f"accum{accum}", "--grad-accum", str(accum))
        assert set(reads) <= {"aten::_local_scalar_dense"}, reads
        assert reads.get("aten::_local_scalar_dense", 0) <= 2 * accum, reads


def test_a_folder_saved_by_sentence_transformers_6_is_read(tmp_path):
    """sentence-transformers 5/6 save another layout (module paths such as sentence_transformers.base.modules...,
    pooling_mode, max_seq_length kept by the tokenizer): read as the classic one, the same vectors."""
    st = pytest.importorskip("sentence_transformers")
    from embeddings import load_sentence_model, read_sentence_folder
    folder = make_sentence_teacher(str(tmp_path / "t"), "max", [(24, TANH)])
    model = st.SentenceTransformer(folder, device="cpu")
    model.save(str(tmp_path / "saved"))
    spec = read_sentence_folder(str(tmp_path / "saved"))
    assert (spec["pooling"], spec["normalize"], spec["max_seq_length"], len(spec["dense"])) == ("max", True, 48, 1)
    torch.testing.assert_close(encode_own(load_sentence_model(str(tmp_path / "saved")), TEXTS, folder),
                               model.encode(TEXTS, convert_to_tensor=True), atol=1e-5, rtol=1e-5)
