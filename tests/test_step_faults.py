"""The step's faults of issue 12 (items 1, 7, 8, 9, 10) and the input pipeline of issue 11, each with its right value.

- Empty selections: a micro-batch (or a whole step) without a masked position adds 0 to the masked
  terms, never crashes and never divides by zero; so does every loss given zero rows.
- fp16: every loss that is finite in fp32 is finite in fp16 (attention KL on padded batches was NaN);
  the KD gradient survives the gradient scaler (it was stored in fp16 before the scale reached it);
  a non-finite loss never updates the weights, in any dtype, and is counted.
- DDP: losses that leave student parameters without gradient (the MLM head when only hidden states
  are compared, layers after the last --layer-map pair) run under torchrun and equal one process.
- DataLoader workers change nothing: 0 and 2 workers give the same losses.
- --compile compiles the encoder layers without a graph break.
"""

import json
import os

import numpy as np
import pytest
import torch

import train
from conftest import write_corpus
from data import make_batch, make_sequences, mask_spec, to_device
from token_cache import load_corpus
from distil import DistilConfig, default_layer_map, distil_step, with_rows
from losses import (attention_kl_loss, attention_mse_loss, cosine_loss, hidden_mse_loss, kd_loss, mlm_loss, mse_loss,
                    relation_loss)
from pretrained import load_teacher, load_tokenizer
from student import make_student
from test_resume import flags, metrics, ok, run, weights, wrapper

TINY = dict(seq_len=16, layers="0,2", dtype="fp32", log_every=1, no_progress=True)


def train_losses(out):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "data_wait")} for r in metrics(out) if "loss" in r]


# ---- 1. empty selections ----

@pytest.mark.parametrize("loss", [
    lambda s, t: kd_loss(s, t, 2.0), lambda s, t: mse_loss(s, t), lambda s, t: cosine_loss(s, t),
    lambda s, t: hidden_mse_loss(s, t), lambda s, t: attention_kl_loss(s, t), lambda s, t: attention_mse_loss(s, t),
    lambda s, t: mlm_loss(s, torch.zeros(0, dtype=torch.long)),
], ids=["kd", "mse", "cos", "hidden", "attn-kl", "attn-mse", "mlm"])
@pytest.mark.parametrize("denominator", [None, 0, 5])
def test_every_loss_of_zero_rows_is_zero_with_a_gradient(loss, denominator):
    s, t = torch.randn(0, 7, requires_grad=True), torch.randn(0, 7)
    value = loss(s, t) if denominator is None else loss(s, t)  # default count: 0 rows
    value.backward()
    assert value.item() == 0.0 and s.grad.shape == (0, 7)


def test_a_denominator_below_one_is_kept():
    # one masked row over two ranks: each rank divides by 1 / 2, and DDP's average makes it 1
    s, t = torch.randn(1, 5), torch.randn(1, 5)
    assert kd_loss(s, t, 2.0, denominator=0.5).item() == pytest.approx(2 * kd_loss(s, t, 2.0).item(), rel=1e-6)
    assert mse_loss(s, t, denominator=torch.tensor(0.5)).item() == pytest.approx(2 * mse_loss(s, t).item(), rel=1e-6)


def test_a_denominator_of_zero_counts_as_one():
    s = torch.zeros(0, 5)
    assert kd_loss(s, s, 2.0, denominator=0).item() == 0.0
    assert mlm_loss(s, torch.zeros(0, dtype=torch.long), denominator=torch.tensor(0.0)).item() == 0.0
    x = torch.randn(1, 4, 6)
    assert relation_loss(x, x, None, 2, denominator=0, query_rows=torch.zeros(0, dtype=torch.long)).item() == 0.0


@pytest.mark.parametrize("kd_on", ["masked", "all"])
def test_a_batch_without_masked_positions_adds_zero_to_the_masked_terms(tiny_teacher, kd_on):
    teacher = load_teacher(tiny_teacher)
    student = make_student(teacher, [0, 2])
    ids = torch.tensor([[2, 7, 8, 9, 3], [2, 10, 11, 3, 0]])
    batch = with_rows({"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.full_like(ids, -100)})
    cfg = DistilConfig(kd_on=kd_on, alpha_mse=1.0)
    total, terms = distil_step(student, teacher, batch, cfg, {"kd": 0 if kd_on == "masked" else 9, "mlm": 0, "cos": 9})
    assert terms["mlm"].item() == 0.0 and torch.isfinite(total)
    if kd_on == "masked":
        assert terms["kd"].item() == 0.0 and terms["mse"].item() == 0.0
    else:
        assert terms["kd"].item() > 0
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


@pytest.mark.parametrize("corpus_kind", ["two-word lines, unpacked", "packed, 1-token tail"])
def test_steps_whose_micro_batches_lack_masked_positions_train(tiny_teacher, tmp_path, corpus_kind):
    path = tmp_path / "train.txt"
    if corpus_kind.startswith("two"):
        path.write_text("".join(f"{a} {b}\n" for a, b in zip(["the", "cat", "a", "dog"] * 20, ["sat", "ran"] * 40)))
        extra = dict(no_pack=True, min_tokens=1)
    else:  # 14 content tokens per sequence at --seq-len 16: 6 documents of 6 tokens + separators = 42 = 3 x 14
        path.write_text("the cat sat on a mat\n" * 6 + "dog\n")  # and a tail of "dog [SEP]": 2 tokens
        extra = dict(seq_len=16)
    out = str(tmp_path / "out")
    train.main(flags(TINY, teacher=tiny_teacher, train=str(path), out=out, cache_dir=str(tmp_path / "cache"),
                     batch_size=1, grad_accum=8 if corpus_kind.startswith("two") else 2, max_steps=4, **extra))
    records = train_losses(out)
    assert len(records) == 4 and all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records)
    assert all(r["skipped_steps"] == 0 for r in records)


# ---- 7. fp16: finite wherever fp32 is ----

def padded_batch(tokenizer, path, tmp_path):
    seqs = make_sequences(load_corpus(path, tokenizer, str(tmp_path / "cache"), progress=False), 24, pack=False)
    order = np.argsort(seqs.lengths)
    return to_device(make_batch(seqs, np.array([order[0], order[-1], order[len(order) // 2]]), tokenizer,
                                mask_spec(tokenizer), seed=0, epoch=0), "cpu")


@pytest.mark.parametrize("attn_loss", ["kl", "mse"])
def test_every_loss_finite_in_fp32_is_finite_in_fp16(tiny_teacher_no_dropout, tiny_corpus, tmp_path, attn_loss):
    tiny_teacher = tiny_teacher_no_dropout  # both precisions see the same network
    teacher = load_teacher(tiny_teacher)
    tokenizer = load_tokenizer(teacher, tiny_teacher)
    batch = padded_batch(tokenizer, tiny_corpus[0], tmp_path)
    assert batch["padded"]
    cfg = DistilConfig(kd_on="all", alpha_mse=1.0, alpha_hidden=1.0, alpha_attn=1.0, attn_loss=attn_loss,
                       alpha_relation=1.0, layer_map=default_layer_map([0, 2]))
    values = {}
    for dtype in (torch.float32, torch.float16):
        student = make_student(teacher, [0, 2])
        half_teacher = load_teacher(tiny_teacher).to(dtype)  # the loop keeps the teacher in the compute dtype
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            total, terms = distil_step(student, half_teacher, batch, cfg)
        total.backward()
        assert torch.isfinite(total), (dtype, terms)
        assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
        values[dtype] = {k: v.item() for k, v in terms.items()}
    for name, value in values[torch.float32].items():
        assert values[torch.float16][name] == pytest.approx(value, rel=0.02, abs=1e-3), name


def test_attention_kl_of_fp16_scores_under_the_fp16_mask_is_finite():
    """The model adds its dtype's minimum at padded keys: in fp16, -65504 plus a score below about -16
    is -inf, and the KL then multiplied 0 by inf. Real models (the offline MiniLM) have such scores."""
    from distil import attention_loss
    torch.manual_seed(0)
    attention_mask = torch.tensor([[1, 1, 1, 0]])
    real_rows = torch.tensor([0, 1, 2])
    scores = {name: (torch.randn(1, 2, 4, 4) * 40) for name in ("student", "teacher")}
    def captured(name, dtype):
        mask = (1 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        return {"scores": scores[name].to(dtype), "mask": mask}
    cfg = DistilConfig(attn_loss="kl")
    fp32 = attention_loss(captured("student", torch.float32), captured("teacher", torch.float32), attention_mask,
                          real_rows, 3, cfg)
    fp16 = attention_loss(captured("student", torch.float16), captured("teacher", torch.float16), attention_mask,
                          real_rows, 3, cfg)
    assert torch.isfinite(fp16) and fp16.item() == pytest.approx(fp32.item(), rel=1e-2)


# ---- 9. the fp16 KD gradient survives the scaler ----

def test_fp16_kd_gradient_keeps_what_the_scale_lifts_out_of_underflow():
    torch.manual_seed(0)
    rows, vocab, scale = 8, 30522, 2.0 ** 16
    s16, t16 = (torch.randn(rows, vocab) * 3).half(), (torch.randn(rows, vocab) * 3).half()
    reference = s16.float().requires_grad_()  # the same (rounded) logits, all in float32
    (kd_loss(reference, t16.float(), 2.0) * scale).backward()
    expected = reference.grad.half()  # what fp16 can hold of the scaled float32 gradient
    s16.requires_grad_()
    (kd_loss(s16, t16, 2.0) * scale).backward()
    lost = ((expected != 0) & (s16.grad == 0)).float().mean().item()
    assert lost == 0.0, f"{lost:.2%} of the gradients flushed to zero"
    torch.testing.assert_close(s16.grad.float(), expected.float(), rtol=2e-2, atol=1e-3)


# ---- 8. never step on a non-finite loss, in any dtype ----

@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_a_non_finite_loss_never_updates_and_is_counted(tiny_teacher, tiny_corpus, tmp_path, monkeypatch, dtype):
    """AdamW.step runs every step (the fused kernel skips on the device, train_step.optimizer_step):
    its own step count, in the checkpoint, advanced once per step that was not skipped."""
    real_step, calls = train.distil_step, [0]

    def nan_at_step_3(model, teacher, batch, cfg, denominators=None):
        loss, terms = real_step(model, teacher, batch, cfg, denominators)
        calls[0] += 1  # call 1 is train.py's probe (distil.freeze_unreached): call n + 1 is step n
        return (loss * float("nan") if calls[0] == 4 else loss), terms

    monkeypatch.setattr(train, "distil_step", nan_at_step_3)
    out = str(tmp_path / "out")
    train.main(flags(TINY, teacher=tiny_teacher, train=tiny_corpus[0], out=out, cache_dir=str(tmp_path / "cache"),
                     batch_size=4, max_steps=6, dtype=dtype))
    records = {r["step"]: r for r in metrics(out) if "loss" in r}
    assert records[3]["skipped_steps"] == records[2]["skipped_steps"] + 1
    state = torch.load(os.path.join(out, "checkpoints", "step-00000006.pt"), weights_only=True)
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {6 - records[6]["skipped_steps"]}  # AdamW's own counter never advanced on a skipped step
    assert all(torch.isfinite(w).all() for w in state["student"].values())


# ---- 10. every combination of losses under torchrun ----

@pytest.mark.parametrize("losses", [
    dict(alpha_kd=0, alpha_mlm=0, alpha_cos=0, alpha_hidden=1),                  # the MLM head feeds nothing
    dict(alpha_kd=0, alpha_mlm=0, alpha_cos=0, alpha_hidden=1, layer_map="0:0,1:1"),  # nor does student layer 2
    dict(alpha_kd=1, alpha_mlm=0, alpha_cos=0, alpha_attn=1, alpha_relation=1),
], ids=["hidden-only", "hidden-first-layer", "kd-attn-relation"])
def test_any_losses_run_under_torchrun_and_equal_one_process(tiny_teacher_no_dropout, tiny_corpus, tmp_path, losses):
    base = dict(TINY, teacher=tiny_teacher_no_dropout, train=tiny_corpus[0], cache_dir=str(tmp_path / "cache"),
                max_steps=3, **losses)
    ok(run(flags(base, out=str(tmp_path / "two"), batch_size=4), nproc=2, timeout=300))
    ok(run(flags(base, out=str(tmp_path / "one"), batch_size=8)))
    two, one = weights(tmp_path / "two"), weights(tmp_path / "one")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-5)
    for a, b in zip(train_losses(tmp_path / "two"), train_losses(tmp_path / "one")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


# ---- issue 11: DataLoader workers change nothing ----

def test_workers_give_the_same_losses(tiny_teacher, tiny_corpus, tmp_path):
    runs = {}
    for workers in (0, 2):
        out = str(tmp_path / f"w{workers}")
        train.main(flags(TINY, teacher=tiny_teacher, train=tiny_corpus[0], out=out, cache_dir=str(tmp_path / "cache"),
                         batch_size=4, grad_accum=2, max_steps=5, num_workers=workers, mlm_smoothing=0.7))
        runs[workers] = train_losses(out)
    assert runs[0] == runs[2]


# ---- issue 11: the KL block a GPU compiles is one graph, and computes what the eager blocks do ----

def test_the_kl_block_compiles_whole_and_matches_eager():
    from losses import _kl_block
    torch._dynamo.reset()
    s, t = torch.randn(6, 50), torch.randn(6, 50)
    t[:, :5] = torch.finfo(torch.float32).min  # masked keys: probability 0
    compiled = torch.compile(_kl_block, fullgraph=True, dynamic=True)  # fullgraph: a break would raise
    for rows in (6, 3):
        kl_c, grad_c = compiled(s[:rows], t[:rows], 2.0)
        kl_e, grad_e = _kl_block(s[:rows], t[:rows], 2.0)
        torch.testing.assert_close(kl_c, kl_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_c, grad_e, rtol=1e-5, atol=1e-7)


def test_a_layer_map_without_the_pairs_a_loss_reads_is_refused_by_the_step(tiny_teacher):
    teacher = load_teacher(tiny_teacher)
    student = make_student(teacher, [0, 2])
    ids = torch.tensor([[2, 7, 8, 9, 3]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with pytest.raises(ValueError, match="no such pair"):
        distil_step(student, teacher, batch, DistilConfig(alpha_attn=1.0, layer_map=((0, 0),)))
    with pytest.raises(ValueError, match="at least one pair"):
        distil_step(student, teacher, batch, DistilConfig(alpha_hidden=1.0, layer_map=()))
