"""The training loop never makes the host wait for the GPU inside a micro-step, and at most once per step.

On a GPU, reading a value back (`.item()`, `.tolist()`, `bool(tensor)`, a boolean-mask index, whose
result's shape the host must learn) stalls the host until every queued kernel has run: the GPU's
queue drains, and the next kernels start late. These tests count such reads in train.py's own
loop on the CPU: the operators a GPU would synchronise on, as `torch.profiler` sees them
(`aten::_local_scalar_dense` behind item/bool/float, `aten::nonzero` behind boolean indexing,
`aten::masked_select`), plus `Tensor.tolist` and `Tensor.numpy`, which on a CPU read memory
without an operator. The count of a run with N + 4 steps minus that of a run with N steps is the
count of 4 steps: start-up, the final step's logging and the save cancel out.

Reads inside `optimizer.step()` are left out: on a CPU, AdamW keeps its step counters in CPU
tensors and reads them; on a GPU the fused kernel keeps them on the device and reads nothing.
"""

import collections
import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import train
from conftest import write_corpus

SYNC_OPERATORS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select")


def count_reads(argv):
    """Reads of device values in one run of train.main(argv), outside optimizer.step."""
    python_reads = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def counting(name):
        def read(self, *args, **kwargs):
            if not in_optimizer_step[0]:
                python_reads[name] += 1
            return originals[name](self, *args, **kwargs)
        return read

    in_optimizer_step = [False]
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        in_optimizer_step[0] = True
        try:
            return real_step(self, *args, **kwargs)
        finally:
            in_optimizer_step[0] = False

    try:
        for name in originals:
            setattr(torch.Tensor, name, counting(name))
        torch.optim.AdamW.step = step
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train.main(argv)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.optim.AdamW.step = real_step
    counts = collections.Counter(python_reads)
    for event in prof.events():
        if event.name in SYNC_OPERATORS:
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("Optimizer.step"):
                parent = parent.cpu_parent
            if parent is None:
                counts[event.name] += 1
    return counts


@pytest.fixture(scope="module")
def setup(tiny_teacher, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sync")
    corpus = write_corpus(str(folder / "train.txt"), 300, seed=5)
    base = ["--teacher", tiny_teacher, "--train", corpus, "--batch-size", "4", "--seq-len", "32", "--log-every",
            "1000", "--save-every", "1000", "--no-progress", "--cache-dir", str(folder / "cache"), "--dtype", "fp32"]
    return base, folder


def reads_per_step(setup, name, *extra):
    base, folder = setup
    few = count_reads(base + ["--out", str(folder / f"{name}-2"), "--max-steps", "2", *extra])
    more = count_reads(base + ["--out", str(folder / f"{name}-6"), "--max-steps", "6", *extra])
    return {k: (more[k] - few[k]) / 4 for k in set(few) | set(more) if more[k] != few[k]}


@pytest.mark.parametrize("recipe", [
    (),                                                           # the default recipe, packed sequences
    ("--kd-on", "all", "--alpha-mse", "1"),                        # logits at every position
    ("--alpha-hidden", "1", "--alpha-attn", "1", "--alpha-relation", "1"),  # intermediate layers, captured attention
], ids=["default", "kd-on-all", "intermediate"])
def test_one_read_per_step_and_none_per_micro_step(setup, recipe):
    one = reads_per_step(setup, "accum1-" + "-".join(recipe), *recipe)
    assert one == {"tolist": 1.0}, one  # the skip-or-stop decision: loss, gradient norm, stop flag
    four = reads_per_step(setup, "accum4-" + "-".join(recipe), "--grad-accum", "4", *recipe)
    assert four == one, four  # three more micro-steps per step, not one read more


@pytest.fixture(scope="module")
def task_setup(tmp_path_factory):
    """A tiny fine-tuned (single-label) teacher and labelled texts, some without a label."""
    import csv
    import random

    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from conftest import WORDS, write_bert_vocab

    folder = tmp_path_factory.mktemp("sync_task")
    teacher = str(folder / "teacher")
    os.makedirs(teacher)
    vocab = write_bert_vocab(os.path.join(teacher, "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, id2label={0: "neg", 1: "pos"},
                        label2id={"neg": 0, "pos": 1})
    BertForSequenceClassification(config).save_pretrained(teacher)
    BertTokenizer(vocab=os.path.join(teacher, "vocab.txt")).save_pretrained(teacher)
    rng = random.Random(0)
    with open(folder / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(200):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 20))]
            writer.writerow([" ".join(words), "" if i % 5 == 0 else ("pos" if "cat" in words else "neg")])
    base = ["--teacher", teacher, "--train", str(folder / "train.csv"), "--layers", "0", "--batch-size", "4",
            "--log-every", "1000", "--save-every", "1000", "--no-progress", "--cache-dir", str(folder / "cache"),
            "--dtype", "fp32"]
    return base, folder


def test_task_steps_read_once_per_step_padded_batches_included(task_setup):
    """A task step reads back once (loss, gradient norm, stop flag), like a masked-LM step. Task
    batches are padded to their longest text: the models get their 4-D attention mask ready-made
    (distil.prepared_mask), so transformers no longer asks padding_mask.all() in each forward, which
    read back twice per micro-step (teacher and student) before."""
    one = reads_per_step(task_setup, "task-accum1", "--alpha-cos", "1")
    assert one == {"tolist": 1.0}, one
    four = reads_per_step(task_setup, "task-accum4", "--alpha-cos", "1", "--grad-accum", "4")
    assert four == {"tolist": 1.0}, four


def test_padded_masked_lm_steps_read_once_per_step(setup):
    """--no-pack: documents padded to the longest in the batch, with the intermediate-layer losses
    (the captured attention takes the additive mask): one read per step, none per micro-step."""
    recipe = ("--no-pack", "--alpha-hidden", "1", "--alpha-attn", "1")
    assert reads_per_step(setup, "nopack-accum2", "--grad-accum", "2", *recipe) == {"tolist": 1.0}
