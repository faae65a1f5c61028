"""A student narrower than its teacher: truncated initialisation, the projection, saving, DDP."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForMaskedLM

from distil import DistilConfig, default_layer_map, distil_step
from pretrained import load_teacher, save_student
from student import StudentError, add_projection, make_narrow_student

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_teacher(tiny_teacher)  # 4 layers, hidden 32, 2 heads, feed-forward 64


def test_truncated_init_takes_the_top_left_block_of_each_mapped_weight(teacher):
    student = make_narrow_student(teacher, [1, 3], hidden_size=16, num_heads=2)
    assert (student.config.hidden_size, student.config.num_attention_heads, student.config.intermediate_size,
            student.config.num_hidden_layers) == (16, 2, 32, 2)
    for j, i in enumerate([1, 3]):
        s_layer, t_layer = student.bert.encoder.layer[j], teacher.bert.encoder.layer[i]
        assert torch.equal(s_layer.attention.self.query.weight, t_layer.attention.self.query.weight[:16, :16])
        assert torch.equal(s_layer.intermediate.dense.weight, t_layer.intermediate.dense.weight[:32, :16])
        assert torch.equal(s_layer.output.LayerNorm.bias, t_layer.output.LayerNorm.bias[:16])
    assert torch.equal(student.bert.embeddings.word_embeddings.weight,
                       teacher.bert.embeddings.word_embeddings.weight[:, :16])
    assert student.cls.predictions.decoder.weight is student.bert.embeddings.word_embeddings.weight
    assert all(p.requires_grad for p in student.parameters())


def test_random_init_and_bad_widths(teacher):
    student = make_narrow_student(teacher, [0, 3], hidden_size=16, num_heads=4, init="random")
    assert not torch.equal(student.bert.encoder.layer[0].attention.self.query.weight,
                           teacher.bert.encoder.layer[0].attention.self.query.weight[:16, :16])
    for hidden, heads in ((15, 2), (64, 2)):
        with pytest.raises(StudentError, match="multiple of the heads and at most"):
            make_narrow_student(teacher, [0], hidden_size=hidden, num_heads=heads)


def test_projection_serves_the_losses_and_stays_out_of_the_saved_model(teacher, tiny_teacher, tmp_path):
    from transformers import AutoTokenizer
    student = add_projection(make_narrow_student(teacher, [0, 3], hidden_size=16, num_heads=2), 32)
    assert torch.equal(student.distil_projection.weight, torch.eye(32, 16))  # [I; 0]
    ids = torch.randint(5, 40, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.where(ids % 3 == 0, ids, -100)}
    cfg = DistilConfig(alpha_hidden=1.0, alpha_relation=1.0, layer_map=default_layer_map([0, 3]))
    loss, terms = distil_step(student, teacher, batch, cfg)
    loss.backward()
    assert {"cos", "hidden", "relation"} <= set(terms)
    assert student.distil_projection.weight.grad.abs().sum() > 0
    save_student(student, AutoTokenizer.from_pretrained(tiny_teacher), str(tmp_path))
    reloaded, info = AutoModelForMaskedLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    student.eval()
    torch.testing.assert_close(reloaded.eval()(ids).logits, student(ids).logits)


def test_torchrun_covers_the_projection_with_one_ddp_wrap(tiny_teacher, tiny_corpus, tmp_path):
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--teacher", tiny_teacher, "--train", tiny_corpus[0], "--out", out,
           "--cache-dir", str(tmp_path / "cache"), "--seq-len", "32", "--batch-size", "4", "--max-steps", "4",
           "--layers", "0,3", "--student-hidden", "16", "--alpha-hidden", "1", "--dtype", "fp32", "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(os.path.join(out, "checkpoints", "step-00000004.pt"), weights_only=False)["student"]
    assert "distil_projection.weight" in state  # trained, synchronised and checkpointed with the student
    assert not torch.equal(state["distil_projection.weight"], torch.eye(32, 16))
    assert AutoModelForMaskedLM.from_pretrained(out).config.hidden_size == 16
