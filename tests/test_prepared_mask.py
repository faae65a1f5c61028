"""The 4-D attention mask the step hands the models (distil.prepared_mask) is the one they would build
from the 2-D padding mask: the losses and the gradients are bitwise those of the 2-D mask, for SDPA,
eager attention and the attention-capturing function, in float32 and with a bf16 teacher."""

from contextlib import ExitStack
from unittest import mock

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

import distil
import tasks
from data import to_device
from distil import DistilConfig, batch_rows, default_layer_map, distil_step
from student import make_student

TINY = dict(vocab_size=60, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
MAP = default_layer_map([0, 2])


def padded_batch(seed=0, shape=(3, 12)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 60, shape)
    attention_mask = np.ones(shape, dtype=np.int64)
    attention_mask[1, 8:] = 0
    attention_mask[2, 3:] = 0
    labels = np.where((rng.random(shape) < 0.4) & (attention_mask == 1), ids, -100)
    return to_device({"input_ids": ids, "attention_mask": attention_mask, "labels": labels,
                      **batch_rows(attention_mask, labels)}, "cpu")


def losses_and_grads(step, student, *args, two_d=False):
    """The step's terms and the student's gradients, with the prepared mask or (two_d) the 2-D one."""
    student.zero_grad(set_to_none=True)
    with ExitStack() as stack:
        if two_d:  # the models build their mask from the 2-D one, as before prepared_mask
            for module in (distil, tasks):
                stack.enter_context(mock.patch.object(module, "prepared_mask", lambda model, mask: mask))
        loss, terms = step(student, *args)
    loss.backward()
    return terms, [p.grad.clone() for p in student.parameters() if p.grad is not None]


@pytest.mark.parametrize("attention", ["sdpa", "eager", "capture"])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-teacher"])
def test_the_prepared_mask_gives_the_losses_and_gradients_of_the_2d_mask(attention, teacher_dtype):
    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(**TINY)).eval().requires_grad_(False)
    student = make_student(teacher, [0, 2])
    teacher.to(teacher_dtype)
    cfg = DistilConfig(kd_on="all", alpha_hidden=1.0, layer_map=MAP)
    if attention == "eager":
        teacher.set_attn_implementation("eager")
        student.set_attn_implementation("eager")
    if attention == "capture":
        cfg = DistilConfig(alpha_attn=1.0, alpha_relation=1.0, layer_map=MAP)
    batch = padded_batch()
    prepared = distil.prepared_mask(student, batch["attention_mask"])
    assert prepared.dim() == 4  # what the models now get: no check on the host
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=teacher_dtype == torch.bfloat16)
    with autocast:
        new_terms, new_grads = losses_and_grads(distil_step, student, teacher, batch, cfg)
    with autocast:
        old_terms, old_grads = losses_and_grads(distil_step, student, teacher, batch, cfg, two_d=True)
    assert new_terms.keys() == old_terms.keys()
    for k in new_terms:
        assert torch.equal(new_terms[k], old_terms[k]), (k, new_terms[k], old_terms[k])
    assert len(new_grads) == len(old_grads) and all(torch.equal(a, b) for a, b in zip(new_grads, old_grads))


def test_a_task_step_with_the_prepared_mask_is_the_2d_masks():
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(**TINY, num_labels=3)).eval().requires_grad_(False)
    student = make_student(teacher, [0, 2])
    batch = padded_batch()
    labels = np.array([0, -100, 2])
    batch = {**batch, **to_device(tasks.task_rows(batch["attention_mask"].numpy(), labels,
                                                  "single_label_classification"), "cpu")}
    cfg = DistilConfig(alpha_kd=1.0, alpha_mlm=0.0, alpha_cos=1.0, alpha_label=1.0)
    step = lambda s, t, b, c: tasks.task_step(s, t, b, c, "single_label_classification")
    new_terms, new_grads = losses_and_grads(step, student, teacher, batch, cfg)
    old_terms, old_grads = losses_and_grads(step, student, teacher, batch, cfg, two_d=True)
    assert all(torch.equal(new_terms[k], old_terms[k]) for k in new_terms)
    assert all(torch.equal(a, b) for a, b in zip(new_grads, old_grads))


def test_models_that_build_their_own_masks_get_the_2d_mask():
    """ModernBERT's sliding-window layers take a second mask built from the 2-D one; DeBERTa builds its own."""
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM, ModernBertConfig, ModernBertForMaskedLM
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    modern = ModernBertForMaskedLM(ModernBertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=3,
                                                    num_attention_heads=2, intermediate_size=64, pad_token_id=0))
    deberta = DebertaV2ForMaskedLM(DebertaV2Config(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=64))
    assert distil.prepared_mask(modern, mask) is mask and distil.prepared_mask(deberta, mask) is mask
    bert = BertForMaskedLM(BertConfig(**TINY))
    assert distil.prepared_mask(bert, mask).shape == (2, 1, 4, 4)
