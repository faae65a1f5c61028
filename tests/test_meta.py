"""A device dry run on the CPU: the step with the models and the batches on device="meta".

Meta tensors have shapes and no values, like an accelerator's as the host sees them: a read-back
(.item(), .tolist(), bool(), a Python `if` on a tensor, a boolean-mask index) raises, and so does
arithmetic that mixes in a CPU tensor with dimensions (one made without device=; a 0-dim CPU scalar
is allowed, as on CUDA). Every loss combination, padded and packed batches and every task kind run
(with their row indices as train.py gives them, and padded to a compiled step's fixed sizes)
here, forward and backward; a read-back inside the step, or a tensor left on the host, fails the
test on a machine without a GPU. The same dry run counts the step's FLOPs at bert-base's shapes
(free on meta), which checks tools/bench.py's MFU formula.
"""

from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification

from data import to_device
from distil import DistilConfig, batch_rows, count_rows, default_layer_map, distil_step
from student import make_student
from tasks import count_task_rows, task_rows, task_step
from train_step import forward_backward, global_denominators, optimizer_step

META = torch.device("meta")
TINY = dict(vocab_size=60, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)
LAYERS = [0, 2]
MAP = default_layer_map(LAYERS)
RECIPES = {
    "default": DistilConfig(),
    "kd-all-mse": DistilConfig(kd_on="all", alpha_mse=1.0),
    "hidden-attn-relation": DistilConfig(alpha_hidden=1.0, alpha_attn=1.0, alpha_relation=1.0, layer_map=MAP),
    "hidden-cos-attn-mse": DistilConfig(alpha_hidden=1.0, hidden_loss="cos", alpha_attn=1.0, attn_loss="mse",
                                        layer_map=MAP),
    "mlm-only": DistilConfig(alpha_kd=0.0, alpha_cos=0.0),
}


def masked_lm_batch(padded, seed=0, shape=(3, 12), vocab=60):
    """A numpy batch as data.make_batch builds it: ids, mask, labels (30% masked) and batch_rows' indices."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, shape)
    attention_mask = np.ones(shape, dtype=np.int64)
    if padded:
        attention_mask[1, shape[1] * 2 // 3:] = 0
        attention_mask[2, shape[1] // 3:] = 0
    labels = np.where((rng.random(shape) < 0.3) & (attention_mask == 1), ids, -100)
    return {"input_ids": ids, "attention_mask": attention_mask, "labels": labels, **batch_rows(attention_mask, labels)}


def on_meta(*models):
    for model in models:
        model.to(META)
    return models


@pytest.fixture(scope="module")
def masked_lm_models():
    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(**TINY)).eval().requires_grad_(False)
    return on_meta(teacher, make_student(teacher, LAYERS))


@pytest.mark.parametrize("static", [False, True], ids=["rows", "fixed-size-rows"])
@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_distil_step_runs_on_meta(masked_lm_models, recipe, padded, static):
    teacher, student = masked_lm_models
    cfg = RECIPES[recipe]
    batch = masked_lm_batch(padded)
    if static:  # a compiled step's batch: row indices of fixed sizes, with their weights (batch_rows)
        batch.update(batch_rows(batch["attention_mask"], batch["labels"], masked_size=20))
    loss, terms = distil_step(student, teacher, to_device(batch, META), cfg)
    assert loss.device == META and set(terms) == {k for k in ("kd", "mlm", "cos", "mse", "hidden", "attn", "relation")
                                                  if getattr(cfg, f"alpha_{k}") > 0}
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert any(g is not None for g in grads) and all(g.device == META for g in grads if g is not None)
    student.zero_grad(set_to_none=True)


TASKS = {  # kind: (model class, config extras, labels of a 3-sequence batch, one without a label)
    "single_label_classification": (BertForSequenceClassification, dict(num_labels=3),
                                    np.array([0, -100, 2])),
    "multi_label_classification": (BertForSequenceClassification, dict(num_labels=3,
                                                                       problem_type="multi_label_classification"),
                                   np.array([[1, 0, 1], [np.nan] * 3, [0, 0, 1]], dtype=np.float32)),
    "regression": (BertForSequenceClassification, dict(num_labels=1, problem_type="regression"),
                   np.array([0.5, np.nan, 2.0], dtype=np.float32)),
    "token_classification": (BertForTokenClassification, dict(num_labels=4), None),
}


@pytest.mark.parametrize("static", [False, True], ids=["rows", "fixed-size-rows"])
@pytest.mark.parametrize("kind", list(TASKS))
def test_task_step_runs_on_meta(kind, static):
    model_class, extra, labels = TASKS[kind]
    torch.manual_seed(0)
    teacher = model_class(BertConfig(**TINY, **extra)).eval().requires_grad_(False)
    student = make_student(teacher, LAYERS)
    on_meta(teacher, student)
    batch = masked_lm_batch(padded=True)
    if kind == "token_classification":
        labels = np.where(batch["attention_mask"] == 1, batch["input_ids"] % 4, -100)
        labels[0, 1] = -100  # a predicted word without a label
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels,
             **task_rows(batch["attention_mask"], labels, kind, static=static)}
    cfg = DistilConfig(alpha_kd=1.0, alpha_mlm=0.0, alpha_cos=1.0, alpha_label=1.0, alpha_mse=1.0,
                       alpha_hidden=1.0, layer_map=MAP)
    denominators = {k: float(v) for k, v in count_task_rows(batch, cfg).items()}
    loss, terms = task_step(student, teacher, to_device(batch, META), cfg, kind, denominators=denominators)
    assert loss.device == META and set(terms) == {"kd", "label", "mse", "cos", "hidden"}
    loss.backward()


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
def test_train_steps_forward_backward_runs_on_meta_and_the_step_reads_back_once(masked_lm_models, padded):
    """train_step.forward_backward over 2 micro-batches, as train.py calls it; then optimizer_step with
    an AdamW that is not fused (the fused kernel takes no meta tensors): its documented fallback, the
    one read of the skip flag, is the only place the dry run stops, at that line. (train.py's fused
    AdamW skips on the device and reads nothing: test_sync.py.)"""
    teacher, student = masked_lm_models
    cfg = DistilConfig(alpha_hidden=1.0, alpha_attn=1.0, layer_map=MAP)
    micro = [masked_lm_batch(padded, seed=s) for s in (1, 2)]
    names = ["loss", "kd", "mlm", "cos", "hidden", "attn"]
    denominators, tokens = global_denominators(micro, lambda b: count_rows(b, cfg), META)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = forward_backward(student, teacher, micro, distil_step, cfg, denominators, names, META,
                              nullcontext, scaler)
    assert losses.device == META and losses.shape == (len(names),)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    with pytest.raises(RuntimeError, match="meta") as failure:
        optimizer_step(student, optimizer, scaler, losses, 5.0)
    where = failure.traceback[-1] if failure.traceback[-1].path.name == "train_step.py" else \
        next(entry for entry in reversed(failure.traceback) if entry.path.name == "train_step.py")
    assert "skipped.item()" in str(where.statement), where.statement
    student.zero_grad(set_to_none=True)


# ---- the FLOPs of a step, counted, against tools/bench.py's MFU formula ----

@pytest.mark.parametrize("shape", [(32, 128), (8, 512)])
def test_the_mfu_formula_matches_the_counted_flops_of_a_bert_base_step(shape):
    """bert-base -> 6 layers, packed, the default recipe (KD and MLM at the masked rows): the FLOPs
    FlopCounterMode counts in the teacher's forward and the student's forward and backward equal
    bench.model_flops_per_token's teacher forward + 3 x student forward (2.02 TFLOP at 32 x 128, 2.17 at
    8 x 512, measured equal to 4 digits; only matrix products count, as in MFU's definition)."""
    from tools.bench import MODELS, model_flops_per_token
    config = BertConfig(vocab_size=30522, max_position_embeddings=512, **MODELS["bert-base"])
    with torch.device(META):
        teacher = BertForMaskedLM(config).eval().requires_grad_(False)
    student = make_student(teacher, [0, 2, 4, 7, 9, 11])
    on_meta(teacher, student)
    batch = masked_lm_batch(False, shape=shape, vocab=30522)
    tokens, masked = batch["input_ids"].size, len(batch["masked_rows"])
    with FlopCounterMode(display=False) as counter:
        loss, _ = distil_step(student, teacher, to_device(batch, META), DistilConfig())
        loss.backward()
    counted = counter.get_total_flops()
    seq_len, head = shape[1], masked / tokens
    formula = tokens * (model_flops_per_token(config, 12, seq_len, head) + 3 * model_flops_per_token(config, 6, seq_len,
                                                                                                     head))
    print(f"{shape}: counted {counted / 1e12:.3f} TFLOP, formula {formula / 1e12:.3f}, ratio {counted / formula:.4f}")
    assert abs(counted / formula - 1) < 1e-3, (counted, formula, counted / formula)
