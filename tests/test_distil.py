"""The distillation step: what it computes, on which rows, and the attention capture."""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from distil import DistilConfig, captured, default_layer_map, distil_step, enable_capture, forward_at_rows
from student import make_student

ALL_TERMS = dict(alpha_kd=1.0, alpha_mlm=1.0, alpha_cos=1.0, alpha_mse=1.0, alpha_hidden=1.0, alpha_attn=1.0,
                 alpha_relation=1.0)


def tiny_teacher(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(vocab_size=60, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.3)
    config.update(overrides)
    return BertForMaskedLM(BertConfig(**config)).eval().requires_grad_(False)


def make_batch(lengths, seq_len, seed=0, pad_value=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (len(lengths), seq_len), generator=g)
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    labels = torch.full((len(lengths), seq_len), -100)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = pad_value
        labels[row, 1:n:3] = ids[row, 1:n:3]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("attn_loss", ["kl", "mse"])
def test_padding_never_changes_any_term(attn_loss):
    teacher = tiny_teacher()
    student = make_student(teacher, [0, 3]).eval()
    cfg = DistilConfig(layer_map=default_layer_map([0, 3]), attn_loss=attn_loss, kd_on="all", **ALL_TERMS)
    alone = make_batch([7], 7)
    padded = make_batch([7], 12, pad_value=0)
    padded["input_ids"][0, :7] = alone["input_ids"][0]
    padded["labels"][0, :7] = alone["labels"][0]
    padded["input_ids"][0, 7:] = torch.randint(5, 60, (5,))  # garbage under the padding mask
    _, terms_alone = distil_step(student, teacher, alone, cfg)
    _, terms_padded = distil_step(student, teacher, padded, cfg)
    assert set(terms_alone) == {"kd", "mlm", "cos", "mse", "hidden", "attn", "relation"}
    for name in terms_alone:
        assert terms_padded[name].item() == pytest.approx(terms_alone[name].item(), rel=1e-4, abs=1e-6), name


def test_a_student_with_every_layer_has_zero_distillation_losses():
    teacher = tiny_teacher()
    student = make_student(teacher, [0, 1, 2, 3]).eval()
    cfg = DistilConfig(layer_map=default_layer_map([0, 1, 2, 3]), kd_on="all", **ALL_TERMS)
    _, terms = distil_step(student, teacher, make_batch([9, 6], 9), cfg)
    for name in ("kd", "cos", "mse", "hidden", "attn", "relation"):
        assert abs(terms[name].item()) < 1e-5, name
    assert terms["mlm"].item() > 0


def test_only_what_the_active_losses_read_is_computed():
    teacher = tiny_teacher()
    student = make_student(teacher, [1, 3])
    batch = make_batch([10, 10], 10)
    n_masked = int((batch["labels"] != -100).sum())
    teacher_calls, head_rows = [], {}
    teacher.register_forward_hook(lambda m, a, o: teacher_calls.append(1))
    teacher.cls.register_forward_hook(lambda m, a, o: head_rows.__setitem__("teacher", o.shape[0]))
    student.cls.register_forward_hook(lambda m, a, o: head_rows.__setitem__("student", o.shape[0]))

    distil_step(student, teacher, batch, DistilConfig(alpha_kd=0, alpha_cos=0, alpha_mlm=1.0))
    assert teacher_calls == [] and head_rows["student"] == n_masked  # MLM only: no teacher at all

    distil_step(student, teacher, batch, DistilConfig(kd_on="masked"))
    assert head_rows == {"teacher": n_masked, "student": n_masked}

    distil_step(student, teacher, batch, DistilConfig(kd_on="all"))
    assert head_rows == {"teacher": 20, "student": 20}

    distil_step(student, teacher, batch, DistilConfig(alpha_kd=0, alpha_mlm=1.0, alpha_cos=1.0))
    assert head_rows == {"teacher": 0, "student": n_masked}  # cosine needs the teacher's hidden states only


def test_capture_keeps_the_real_attention_internals():
    teacher = tiny_teacher()
    batch = make_batch([8, 5], 8)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    reference = BertForMaskedLM(teacher.config).eval()
    reference.load_state_dict(teacher.state_dict())
    reference.set_attn_implementation("eager")
    eager = reference(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    logits_before = teacher(input_ids=ids, attention_mask=mask).logits

    enable_capture(teacher, {1, 3})
    logits_after = teacher(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits_after, logits_before, rtol=1e-5, atol=1e-5)  # same model, other kernel
    for layer in (1, 3):
        got = captured(teacher, layer)
        probs = (got["scores"] + got["mask"]).softmax(-1)
        torch.testing.assert_close(probs, eager.attentions[layer], rtol=1e-5, atol=1e-6)
        attention = teacher.bert.encoder.layer[layer].attention.self
        hidden_in = eager.hidden_states[layer]
        for name, linear in (("query", attention.query), ("key", attention.key), ("value", attention.value)):
            expected = linear(hidden_in).view(2, 8, 4, 8).transpose(1, 2)
            torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-5)  # SDPA vs eager below
        scaling = attention.attention_head_size ** -0.5
        torch.testing.assert_close(got["scores"], got["query"] @ got["key"].transpose(2, 3) * scaling)
    assert not hasattr(teacher.bert.encoder.layer[0].attention.self, "distil_captured")  # SDPA elsewhere


def test_attention_losses_need_equal_head_counts():
    teacher = tiny_teacher()
    student = BertForMaskedLM(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64))
    batch = make_batch([6], 6)
    with pytest.raises(ValueError, match="same number of heads"):
        distil_step(student, teacher, batch, DistilConfig(alpha_attn=1.0, layer_map=((2, 1), (4, 2))))
    # the relation loss works across head counts
    _, terms = distil_step(student, teacher, batch, DistilConfig(alpha_relation=1.0, relation_heads=4,
                                                                  layer_map=((2, 1), (4, 2))))
    assert terms["relation"].item() > 0


def test_denominators_make_micro_batches_add_up_to_the_big_batch():
    teacher = tiny_teacher()
    student = make_student(teacher, [0, 2])
    cfg = DistilConfig(kd_on="all", layer_map=default_layer_map([0, 2]), **ALL_TERMS)
    big = make_batch([10, 10, 10, 10], 10, seed=3)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    big_loss, big_terms = distil_step(student, teacher, big, cfg)
    totals = {"kd": 40, "mlm": int((big["labels"] != -100).sum()), "cos": 40}
    parts = [distil_step(student, teacher, half, cfg, totals) for half in halves]
    assert (parts[0][0] + parts[1][0]).item() == pytest.approx(big_loss.item(), rel=1e-5)
    for name in big_terms:
        assert (parts[0][1][name] + parts[1][1][name]).item() == pytest.approx(big_terms[name].item(), rel=1e-5)


def test_forward_at_rows_gives_the_full_logits_at_those_rows():
    teacher = tiny_teacher()
    batch = make_batch([7, 4], 7)
    rows = batch["labels"] != -100
    full = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    flat_rows = rows.reshape(-1).nonzero().squeeze(1)  # flat indices, as data.make_batch sends them
    logits, _ = forward_at_rows(teacher, batch["input_ids"], batch["attention_mask"], flat_rows, False)
    torch.testing.assert_close(logits, full[rows], rtol=1e-5, atol=1e-6)
    everywhere, _ = forward_at_rows(teacher, batch["input_ids"], batch["attention_mask"], None, False)
    torch.testing.assert_close(everywhere, full.flatten(0, 1), rtol=1e-5, atol=1e-6)
