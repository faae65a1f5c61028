"""The student builder: exact copies of the chosen teacher layers, a frozen untouched teacher, clear errors."""

import os
import shutil

import pytest
import torch
from transformers import (AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, RobertaConfig,
                          RobertaForMaskedLM)

from student import (StudentError, check_layers, default_layers, encoder_layers, load_teacher, make_student,
                     save_student, usable_positions)


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_teacher(tiny_teacher)


@pytest.fixture(scope="module")
def input_ids(teacher):
    torch.manual_seed(0)
    ids = torch.randint(5, teacher.config.vocab_size, (3, 12))
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    return ids


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_load_teacher_is_frozen_float32_eval(teacher):
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.dtype == torch.float32 for p in teacher.parameters())


def test_all_layers_reproduce_the_teacher(teacher, input_ids):
    n = teacher.config.num_hidden_layers
    student = make_student(teacher, list(range(n))).eval()
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids).logits, teacher(input_ids).logits, rtol=0, atol=1e-6)


def test_subset_copies_chosen_layers_in_order(teacher):
    layers = [3, 0, 2]  # out of order on purpose: the student's layer k is the teacher's layers[k]
    before = snapshot(teacher)
    student = make_student(teacher, layers)
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == len(layers)
    student_layers, teacher_layers = encoder_layers(student), encoder_layers(teacher)
    assert len(student_layers) == len(layers)
    for k, i in enumerate(layers):
        s_params, t_params = dict(student_layers[k].named_parameters()), dict(teacher_layers[i].named_parameters())
        assert s_params.keys() == t_params.keys()
        for name in t_params:
            assert torch.equal(s_params[name], t_params[name]), f"student layer {k}.{name} != teacher layer {i}"
            assert s_params[name].data_ptr() != t_params[name].data_ptr(), "student shares memory with the teacher"
    # embeddings and the MLM head (transform included) are copied too
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    outside = [name for name in t_params if ".layer." not in name]
    assert any("embeddings" in name for name in outside) and any(name.startswith("cls.") for name in outside)
    for name in outside:
        assert torch.equal(s_params[name], t_params[name]), name
    # the decoder is still tied to the student's own word embeddings
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    # the student trains; the teacher is untouched, still frozen and in eval mode
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert teacher.config.num_hidden_layers == 4 and len(teacher_layers) == 4
    after = snapshot(teacher)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_training_the_student_leaves_the_teacher_alone(teacher, input_ids):
    before = snapshot(teacher)
    student = make_student(teacher, [0, 3])
    student(input_ids).logits.sum().backward()
    torch.optim.SGD(student.parameters(), lr=1.0).step()
    assert not torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert all(torch.equal(before[name], p) for name, p in teacher.named_parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_default_layers():
    assert default_layers(12) == [0, 2, 4, 7, 9, 11]  # DistilBERT's choice
    assert default_layers(1) == [0] and default_layers(2) == [1] and default_layers(3) == [2]  # one layer: the last
    for n in (4, 5, 6, 7, 8, 10, 16, 24, 32, 48):
        layers = default_layers(n)
        assert len(layers) == n // 2, n
        assert layers == sorted(set(layers)) and layers[0] == 0 and layers[-1] == n - 1, (n, layers)
        gaps = {b - a for a, b in zip(layers, layers[1:])}
        assert max(gaps) - min(gaps) <= 1, (n, layers)  # evenly spread


def test_default_student_is_half_the_teacher(teacher):
    student = make_student(teacher)
    assert student.config.num_hidden_layers == 2 and len(encoder_layers(student)) == 2


@pytest.mark.parametrize("layers, words", [
    ([], "empty"),
    ([0, 4], "out of range"),
    ([-1, 2], "out of range"),
    ([0, 2, 2], "repeats"),
])
def test_bad_layer_lists(teacher, layers, words):
    with pytest.raises(StudentError) as info:
        make_student(teacher, layers)
    message = str(info.value)
    assert words in message and "--layers" in message and "\n" not in message
    if words == "out of range":
        assert "4 layers" in message  # says what would fit


def test_check_layers_accepts_a_good_list():
    assert check_layers((5, 1, 3), 6) == [5, 1, 3]


def test_random_init_has_same_shapes_and_new_weights(teacher):
    copied, fresh = make_student(teacher, [0, 3]), make_student(teacher, [0, 3], init="random")
    assert type(fresh) is type(teacher) and fresh.config.num_hidden_layers == 2
    copied_params, fresh_params = dict(copied.named_parameters()), dict(fresh.named_parameters())
    assert copied_params.keys() == fresh_params.keys()
    for name, p in fresh_params.items():
        assert p.shape == copied_params[name].shape, name
    matrices = [name for name, p in fresh_params.items() if p.dim() == 2]
    assert all(not torch.equal(fresh_params[name], copied_params[name]) for name in matrices)
    assert fresh.get_output_embeddings().weight is fresh.get_input_embeddings().weight
    with pytest.raises(StudentError, match="init="):
        make_student(teacher, [0], init="zeros")


def test_saved_subset_student_reloads_with_identical_logits(teacher, input_ids, tiny_teacher, tmp_path):
    student = make_student(teacher, [1, 3]).eval()
    out = str(tmp_path / "student")
    save_student(student, AutoTokenizer.from_pretrained(tiny_teacher), out)
    assert not os.path.exists(os.path.join(out, ".saving"))
    reloaded = AutoModelForMaskedLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, student(input_ids).logits, rtol=0, atol=0)
    AutoTokenizer.from_pretrained(out)  # the tokenizer is saved beside it


def test_teacher_without_mlm_head_is_refused(tiny_teacher, tmp_path):
    folder = str(tmp_path / "base")
    BertModel(load_teacher(tiny_teacher).config).save_pretrained(folder)  # encoder only, no MLM head
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_teacher, name), folder)
    with pytest.raises(StudentError) as info:
        load_teacher(folder)
    message = str(info.value)
    assert "masked-LM head" in message and "missing cls.predictions" in message and "\n" not in message


def test_teacher_folder_missing_or_not_a_model(tmp_path):
    with pytest.raises(StudentError, match="no such folder"):
        load_teacher(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudentError, match="not a Hugging Face model folder"):
        load_teacher(str(tmp_path / "empty"))


def test_usable_positions():
    size = dict(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    assert usable_positions(BertForMaskedLM(BertConfig(max_position_embeddings=40, **size))) == 40
    roberta = RobertaForMaskedLM(RobertaConfig(max_position_embeddings=42, pad_token_id=1, **size))
    assert usable_positions(roberta) == 42 - 1 - 1  # RoBERTa numbers positions from pad_token_id + 1


def test_works_from_structure_for_roberta():
    torch.manual_seed(0)
    teacher = RobertaForMaskedLM(RobertaConfig(vocab_size=60, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                               intermediate_size=32, max_position_embeddings=42, pad_token_id=1)).eval()
    ids = torch.randint(3, 60, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(make_student(teacher, [0, 1, 2]).eval()(ids).logits, teacher(ids).logits,
                                   rtol=0, atol=1e-6)
    student = make_student(teacher, [2])
    assert type(student) is RobertaForMaskedLM and len(encoder_layers(student)) == 1
    assert torch.equal(encoder_layers(student)[0].output.dense.weight, encoder_layers(teacher)[2].output.dense.weight)
