"""--student-arch distilbert: a BERT teacher converted exactly into a DistilBertForMaskedLM student.

The teacher has every bias and LayerNorm moved off its initial value and larger weights than
BERT's initialisation, so a parameter mapped to the wrong place, or a piece left out (the
segment-0 embedding, the MLM head's transform), shows in the logits.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
from transformers import (AutoModelForMaskedLM, BertConfig, BertForMaskedLM, DistilBertForMaskedLM, ElectraConfig,
                          ElectraForMaskedLM, RobertaConfig, RobertaForMaskedLM)

from conftest import make_bert_teacher
from distil import DistilConfig, default_layer_map, distil_step
from pretrained import load_teacher, load_tokenizer, save_student
from student import StudentError, make_distilbert_student, make_student

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_LAYERS = 4


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A 4-layer BERT with two segment types, no dropout, and no parameter left at its initial value."""
    folder = make_bert_teacher(str(tmp_path_factory.mktemp("distilbert-teacher")), n_layers=N_LAYERS,
                               initializer_range=0.2, type_vocab_size=2, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM.from_pretrained(folder)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # biases and LayerNorm weights: 0 and 1 at initialisation
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_teacher(teacher_dir)


@pytest.fixture(scope="module")
def batch(teacher):
    torch.manual_seed(0)
    input_ids = torch.randint(5, teacher.config.vocab_size, (3, 20))
    input_ids[:, 0] = 2  # [CLS]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 13:] = 0  # padding
    input_ids[1, 13:] = 0
    labels = torch.full_like(input_ids, -100)
    labels[:, 4:7] = input_ids[:, 4:7]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
            batch["attention_mask"].bool()]


def test_all_layers_reproduce_the_teacher(teacher, batch):
    student = make_distilbert_student(teacher, list(range(N_LAYERS)))
    assert type(student) is DistilBertForMaskedLM and student.config.n_layers == N_LAYERS
    expected = logits(teacher, batch)
    assert expected.abs().max() > 3  # logits large enough for a wrong mapping to show
    torch.testing.assert_close(logits(student.eval(), batch), expected, rtol=0, atol=1e-5)
    # ... and so does each hidden state, embedding output included
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    assert len(s.hidden_states) == len(t.hidden_states) == N_LAYERS + 1
    real = batch["attention_mask"].bool()
    for k, (hs, ht) in enumerate(zip(s.hidden_states, t.hidden_states)):
        torch.testing.assert_close(hs[real], ht[real], rtol=0, atol=1e-5, msg=f"hidden state {k}")


def test_exact_up_to_rounding(teacher, batch):
    """In float64 the conversion matches to 1e-12; in float32 its error is the teacher's own rounding.

    The only difference in computation is the order of one sum (word + segment + position before
    the embedding LayerNorm), so the error is rounding: no larger than the float32 teacher's own
    distance to its float64 self.
    """
    teacher64 = copy.deepcopy(teacher).double()
    for layers in (list(range(N_LAYERS)), [3, 1]):
        student64 = make_distilbert_student(teacher64, layers).eval()
        assert student64.dtype == torch.float64
        torch.testing.assert_close(logits(student64, batch), logits(make_student(teacher64, layers).eval(), batch),
                                   rtol=0, atol=1e-12)
    student = make_distilbert_student(teacher, list(range(N_LAYERS))).eval()
    expected = logits(teacher, batch)
    teacher_rounding = (expected.double() - logits(teacher64, batch)).abs().max()
    assert (logits(student, batch) - expected).abs().max() <= 3 * teacher_rounding


@pytest.mark.parametrize("layers", [[0, 2, 3], [3, 1], [2]])
def test_subset_equals_the_same_layers_bert_student(teacher, batch, layers):
    distil = make_distilbert_student(teacher, layers).eval()
    bert = make_student(teacher, layers).eval()
    torch.testing.assert_close(logits(distil, batch), logits(bert, batch), rtol=0, atol=1e-5)


def test_default_layers_are_make_students(teacher):
    assert make_distilbert_student(teacher).config.n_layers == make_student(teacher).config.num_hidden_layers


def test_mlm_head_transform_and_projection_are_copied(teacher):
    student = make_distilbert_student(teacher, [0, 1])
    head = teacher.cls.predictions
    assert torch.equal(student.vocab_transform.weight, head.transform.dense.weight)
    assert torch.equal(student.vocab_transform.bias, head.transform.dense.bias)
    assert torch.equal(student.vocab_layer_norm.weight, head.transform.LayerNorm.weight)
    assert torch.equal(student.vocab_layer_norm.bias, head.transform.LayerNorm.bias)
    assert torch.equal(student.vocab_projector.bias, head.decoder.bias)
    # the projection is tied to the student's own word embeddings, which are the teacher's
    assert student.vocab_projector.weight is student.distilbert.embeddings.word_embeddings.weight
    assert torch.equal(student.vocab_projector.weight, head.decoder.weight)
    # the whole head computes what the teacher's does, from any hidden state
    h = torch.randn(7, teacher.config.hidden_size)
    with torch.no_grad():
        student_head = student.vocab_projector(student.vocab_layer_norm(student.activation(student.vocab_transform(h))))
        torch.testing.assert_close(student_head, head(h), rtol=0, atol=1e-5)


def test_segment_zero_is_folded_into_the_positions(teacher, batch):
    student = make_distilbert_student(teacher, [0])
    emb = teacher.bert.embeddings
    torch.testing.assert_close(student.distilbert.embeddings.position_embeddings.weight,
                               emb.position_embeddings.weight + emb.token_type_embeddings.weight[0], rtol=0, atol=0)
    # the folded vector matters: the teacher's segment-1 output differs, and segment 0 is what the
    # student computes (DistilBERT has no segments; inputs are single segments)
    student = make_distilbert_student(teacher, list(range(N_LAYERS))).eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        segment_0 = teacher(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).logits
        segment_1 = teacher(input_ids=ids, attention_mask=mask, token_type_ids=torch.ones_like(ids)).logits
    real = mask.bool()
    assert (segment_0 - segment_1)[real].abs().max() > 1e-2
    torch.testing.assert_close(logits(student, batch), segment_0[real], rtol=0, atol=1e-5)


def test_untied_teacher_keeps_its_own_projection(tmp_path, batch):
    folder = make_bert_teacher(str(tmp_path), n_layers=2, tie_word_embeddings=False, initializer_range=0.2)
    teacher = load_teacher(folder)
    student = make_distilbert_student(teacher, [0, 1]).eval()
    assert student.vocab_projector.weight is not student.distilbert.embeddings.word_embeddings.weight
    assert torch.equal(student.vocab_projector.weight, teacher.cls.predictions.decoder.weight)
    torch.testing.assert_close(logits(student, batch), logits(teacher, batch), rtol=0, atol=1e-5)


def test_other_activations_convert_exactly(tmp_path, batch):
    folder = make_bert_teacher(str(tmp_path), n_layers=2, hidden_act="gelu_new", initializer_range=0.2)
    teacher = load_teacher(folder)
    student = make_distilbert_student(teacher, [0, 1]).eval()
    assert student.config.activation == "gelu_new"
    torch.testing.assert_close(logits(student, batch), logits(teacher, batch), rtol=0, atol=1e-5)


def test_saves_and_reloads_as_distilbert(teacher, teacher_dir, batch, tmp_path):
    student = make_distilbert_student(teacher, [0, 3]).eval()
    out = str(tmp_path / "student")
    save_student(student, load_tokenizer(teacher, teacher_dir), out)
    reloaded, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert type(reloaded) is DistilBertForMaskedLM
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.vocab_projector.weight is reloaded.distilbert.embeddings.word_embeddings.weight
    torch.testing.assert_close(logits(reloaded.eval(), batch), logits(student, batch), rtol=0, atol=0)
    # its MLM head is complete, so it can teach in turn: a same-class student of it is exact too
    distil_teacher = load_teacher(out)
    assert type(distil_teacher) is DistilBertForMaskedLM
    again = make_student(distil_teacher, [0, 1]).eval()
    torch.testing.assert_close(logits(again, batch), logits(student, batch), rtol=0, atol=0)


def test_random_init_has_the_shape_and_fresh_weights(teacher):
    student = make_distilbert_student(teacher, [0, 2], init="random")
    converted = make_distilbert_student(teacher, [0, 2])
    assert student.config.to_dict() == converted.config.to_dict()
    assert not torch.equal(student.vocab_transform.weight, converted.vocab_transform.weight)
    with pytest.raises(StudentError, match="init='copy'"):
        make_distilbert_student(teacher, [0], init="copy")


def test_bad_layer_lists_are_refused(teacher):
    with pytest.raises(StudentError, match="out of range"):
        make_distilbert_student(teacher, [0, N_LAYERS])


def test_distil_step_trains_it(teacher, batch):
    student = make_distilbert_student(teacher, [0, 2])
    assert student.training and all(p.requires_grad for p in student.parameters())
    total, terms = distil_step(student, teacher, batch, DistilConfig(kd_on="all", alpha_mse=0.5))
    assert all(torch.isfinite(v) for v in terms.values()) and terms["kd"] > 0
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert student.distilbert.embeddings.position_embeddings.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cfg", [dict(alpha_hidden=1.0), dict(alpha_attn=1.0), dict(alpha_attn=1.0, attn_loss="mse"),
                                 dict(alpha_relation=1.0)], ids=["hidden", "attn-kl", "attn-mse", "relation"])
def test_intermediate_losses_vanish_for_the_all_layer_student(teacher, batch, cfg):
    """Hidden states, attention maps and q/k/v of the converted layers are the teacher's, layer by layer."""
    layers = list(range(N_LAYERS))
    student = make_distilbert_student(teacher, layers)  # no dropout in this teacher: train mode is exact
    _, terms = distil_step(student, teacher, batch, DistilConfig(layer_map=default_layer_map(layers), **cfg))
    name = next(k for k in ("hidden", "attn", "relation") if k in terms)
    assert abs(terms[name].item()) < 1e-5
    assert abs(terms["kd"].item()) < 1e-5 and abs(terms["cos"].item()) < 1e-5


@pytest.mark.parametrize("make_teacher, reason", [
    (lambda: make_bert(layer_norm_eps=1e-5), "LayerNorm epsilon is 1e-05, DistilBERT's is fixed at 1e-12"),
    (lambda: make_bert(hidden_act_after_build="swishy"), "activation 'swishy' is not one DistilBERT can name"),
    (lambda: make_bert(position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
    (lambda: make_bert(is_decoder=True), "decoder (causal attention)"),
    (lambda: RobertaForMaskedLM(RobertaConfig(**TINY)), "BERT teachers only, not RobertaForMaskedLM"),
    (lambda: ElectraForMaskedLM(ElectraConfig(**TINY)), "BERT teachers only, not ElectraForMaskedLM"),
], ids=["layer-norm-eps", "activation", "relative-positions", "decoder", "roberta", "electra"])
def test_teachers_distilbert_cannot_represent_are_refused(make_teacher, reason):
    with pytest.raises(StudentError) as e:
        make_distilbert_student(make_teacher(), [0])
    assert reason in str(e.value) and "\n" not in str(e.value)
    assert "drop --student-arch distilbert" in str(e.value)


TINY = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32)


def make_bert(hidden_act_after_build=None, **config):
    model = BertForMaskedLM(BertConfig(**TINY, **config))
    if hidden_act_after_build:  # transformers 5 builds BERT only with an ACT2FN name, which DistilBERT takes too
        model.config.hidden_act = hidden_act_after_build
    return model


def test_train_py_student_arch_distilbert(teacher_dir, tiny_corpus, tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--teacher", teacher_dir, "--train", tiny_corpus[0],
           "--valid", tiny_corpus[1], "--out", out, "--cache-dir", str(tmp_path / "cache"), "--student-arch",
           "distilbert", "--layers", "0,3", "--seq-len", "32", "--batch-size", "4", "--max-steps", "4",
           "--eval-every", "4", "--dtype", "fp32", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert type(model) is DistilBertForMaskedLM and model.config.n_layers == 2
    assert not info["missing_keys"] and not info["unexpected_keys"]
