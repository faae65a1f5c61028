"""The training loop never makes the host wait for the GPU between logging steps (issue 20).

On a GPU, reading a value back (`.item()`, `.tolist()`, `bool(tensor)`, a boolean-mask index, whose
result's shape the host must learn) stalls the host until every queued kernel has run: the GPU's
queue drains, and the next kernels start late. These tests count such reads in train.py's own
loop on the CPU: the operators a GPU would synchronise on, as `torch.profiler` sees them
(`aten::_local_scalar_dense` behind item/bool/float, `aten::nonzero` behind boolean indexing,
`aten::masked_select`), plus `Tensor.tolist` and `Tensor.numpy`, which on a CPU read memory
without an operator. The count of a run with N + 4 steps minus that of a run with N steps is the
count of 4 steps: start-up, the final step's logging and the save cancel out.

A step decides on the device whether to update (the fused AdamW's `found_inf`), counts skipped and
bad steps there, and brings those counters and the stop/save flags to the host one step late
(train_step.StepCounters): 0 reads on a step that does not log, 1 on a step that logs. The second
half of this file checks that the step's semantics survived: a non-finite step leaves the weights
and AdamW's state exactly as they were and is counted, --max-bad-steps stops the run naming the
right steps, and a stop on one of 2 ranks stops both at the same step, resumed exactly.

Reads inside `optimizer.step()` are left out: on a CPU, AdamW keeps its step counters in CPU
tensors and reads them; on a GPU the fused kernel keeps them on the device and reads nothing.
"""

import collections
import json
import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import train
from conftest import write_corpus
from distil import unwrap

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
def test_no_read_per_step_and_none_per_micro_step(setup, recipe):
    one = reads_per_step(setup, "accum1-" + "-".join(recipe), *recipe)
    assert one == {}, one  # skip, counters and flags stay on the device (read a step late, from host memory)
    four = reads_per_step(setup, "accum4-" + "-".join(recipe), "--grad-accum", "4", *recipe)
    assert four == {}, four  # three more micro-steps per step, not one read more


def test_a_logging_step_reads_once(setup):
    """--log-every 1: the log window and the step's counters (skipped steps, gradient norm, the run of
    bad steps) come back together, one read."""
    assert reads_per_step(setup, "log-every-1", "--log-every", "1") == {"tolist": 1.0}


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


def test_task_steps_read_nothing_padded_batches_included(task_setup):
    """A task step reads nothing back, like a masked-LM step. Task batches are padded to their longest
    text: the models get their 4-D attention mask ready-made (distil.prepared_mask), so transformers
    no longer asks padding_mask.all() in each forward, which read back twice per micro-step (teacher
    and student) before."""
    one = reads_per_step(task_setup, "task-accum1", "--alpha-cos", "1")
    assert one == {}, one
    four = reads_per_step(task_setup, "task-accum4", "--alpha-cos", "1", "--grad-accum", "4")
    assert four == {}, four


def test_padded_masked_lm_steps_read_nothing(setup):
    """--no-pack: documents padded to the longest in the batch, with the intermediate-layer losses
    (the captured attention takes the additive mask): no read per step, none per micro-step."""
    recipe = ("--no-pack", "--alpha-hidden", "1", "--alpha-attn", "1")
    assert reads_per_step(setup, "nopack-accum2", "--grad-accum", "2", *recipe) == {}


def test_sentence_embedding_steps_read_nothing(tiny_teacher, tmp_path_factory):
    """A sentence-embedding step reads nothing back either, its batches padded to their longest text
    included (the texts are shorter than --seq-len), with accumulation and a layer loss."""
    from test_embeddings import make_sentence_teacher
    folder = tmp_path_factory.mktemp("sync_embed")
    teacher = make_sentence_teacher(str(folder / "teacher"))
    corpus = write_corpus(str(folder / "train.txt"), 120, max_words=12, seed=5)  # texts shorter than --seq-len
    base = ["--teacher", teacher, "--train", corpus, "--batch-size", "4", "--seq-len", "32", "--log-every", "1000",
            "--save-every", "1000", "--no-progress", "--cache-dir", str(folder / "cache"), "--dtype", "fp32"]
    assert reads_per_step((base, folder), "embed", "--grad-accum", "2", "--alpha-cos", "1") == {}


# ---- the step's semantics, kept: skip, count, --max-bad-steps, stop on every rank at the same step ----

def adam_state(model, optimizer):
    """The weights and AdamW's state (exp_avg, exp_avg_sq, step of each parameter), cloned."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters() if p in optimizer.state])


def assert_same_state(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert len(a[1]) == len(b[1]) > 0
    for x, y in zip(a[1], b[1]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (x, y)


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16-scaler"])
@pytest.mark.parametrize("fault", ["nan-loss", "inf-gradient"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "for-loop"])
def test_a_non_finite_step_leaves_weights_and_adam_state_exactly_unchanged(fused, fault, fp16):
    """optimizer_step on a NaN loss, or a finite loss with an infinite gradient: the fused AdamW
    (train.py's, skipped on the device through found_inf) and a for-loop AdamW (the documented
    fallback: one read) leave every weight, exp_avg, exp_avg_sq and step count bitwise as they were.
    Counted as skipped; bad unless it is an fp16 overflow with a finite loss, which halves the scale."""
    from train_step import make_optimizer, optimizer_step
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = make_optimizer(model, 1e-2, (0.9, 0.999), 1e-8, 0.01, torch.device("cpu")) if fused else \
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    x = torch.randn(8, 4)

    def step(fault=None):
        loss = model(x).pow(2).mean() * (float("nan") if fault == "nan-loss" else 1.0)
        scaler.scale(loss).backward()
        if fault == "inf-gradient":
            model[0].weight.grad[0, 0] = float("inf")
        return optimizer_step(model, optimizer, scaler, loss.detach().double().reshape(1), 1.0)

    assert step()["skipped"].item() == 0  # AdamW's state exists from here on
    before, scale = adam_state(model, optimizer), scaler.get_scale()
    result = step(fault)
    assert_same_state(adam_state(model, optimizer), before)
    assert result["skipped"].item() == 1
    assert result["bad"].item() == (0 if fp16 and fault == "inf-gradient" else 1)
    assert scaler.get_scale() == (scale / 2 if fp16 else scale)
    assert step()["skipped"].item() == 0
    assert all(int(s["step"]) == 2 for s in optimizer.state.values())  # the skipped step did not count
    assert not torch.equal(model[0].weight, before[0]["0.weight"])


def nan_at_call(real, call, weights=False):
    """train.distil_step whose loss is NaN at call `call` (call 1 is train.py's probe: call n + 1 is
    step n); weights=True: the student's embeddings turn NaN there instead (diverged for good)."""
    calls = [0]

    def step(model, teacher, batch, cfg, denominators=None):
        calls[0] += 1
        if weights and calls[0] == call:
            with torch.no_grad():
                unwrap(model).get_input_embeddings().weight.fill_(float("nan"))
        loss, terms = real(model, teacher, batch, cfg, denominators)
        return (loss * float("nan") if calls[0] == call and not weights else loss), terms
    return step


def recording_steps(monkeypatch):
    """train.optimizer_step, recording the weights and AdamW's state before and after each call."""
    real, seen = train.optimizer_step, []

    def step(student, optimizer, *args, **kwargs):
        before = adam_state(student, optimizer)
        result = real(student, optimizer, *args, **kwargs)
        seen.append((before, adam_state(student, optimizer)))
        return result
    monkeypatch.setattr(train, "optimizer_step", step)
    return seen


def test_a_nan_step_in_train_py_is_skipped_counted_and_never_saved(setup, monkeypatch):
    """Step 3's loss is NaN (logging every 1000 steps, a checkpoint every step): its update leaves the
    weights and AdamW's state bitwise unchanged, it is counted, and no checkpoint is written at it."""
    base, folder = setup
    out = str(folder / "nan-step")
    monkeypatch.setattr(train, "distil_step", nan_at_call(train.distil_step, 4))
    seen = recording_steps(monkeypatch)
    assert train.main(base + ["--out", out, "--max-steps", "5", "--save-every", "1", "--keep", "0"]) == 5
    assert len(seen) == 5
    assert_same_state(seen[2][1], seen[2][0])  # step 3: nothing moved
    assert not torch.equal(seen[3][1][0]["bert.embeddings.word_embeddings.weight"],
                           seen[3][0][0]["bert.embeddings.word_embeddings.weight"])  # step 4 trains again
    names = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert names == [f"step-{s:08d}.pt" for s in (1, 2, 4, 5)]
    final = torch.load(os.path.join(out, "checkpoints", names[-1]), weights_only=True)
    assert final["skipped_steps"] == 1
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {4}
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
    assert records[-1]["step"] == 5 and records[-1]["skipped_steps"] == 1


@pytest.mark.parametrize("log_every", [1000, 1], ids=["late", "logging-every-step"])
def test_max_bad_steps_names_the_steps_and_the_last_good_checkpoint(setup, monkeypatch, log_every):
    """The weights turn NaN in step 3: steps 3 and 4 are bad, and --max-bad-steps 2 ends the run naming
    steps 3-4 and the step-2 checkpoint (none is written in a run of bad steps). Between logging steps
    the run of bad steps is read one step late: the run ends during step 5, before its update (4 updates
    taken, as many as when step 4 logs and the count is read at once)."""
    base, folder = setup
    out = str(folder / f"max-bad-{log_every}")
    monkeypatch.setattr(train, "distil_step", nan_at_call(train.distil_step, 4, weights=True))
    seen = recording_steps(monkeypatch)
    with pytest.raises(FloatingPointError) as failure:
        train.main(base + ["--out", out, "--max-steps", "10", "--save-every", "1", "--keep", "0", "--max-bad-steps",
                           "2", "--log-every", str(log_every)])
    last_good = os.path.join(out, "checkpoints", "step-00000002.pt")
    assert str(failure.value).startswith(f"non-finite loss or gradients at steps 3-4 (--max-bad-steps 2); "
                                         f"last good checkpoint: {last_good} ")
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step-00000001.pt", "step-00000002.pt"]
    assert len(seen) == 4


def test_a_stop_on_one_rank_stops_both_a_step_later_and_resumes_exactly(tiny_teacher, tmp_path):
    """2 gloo ranks, logging and saving every 1000 steps: SIGTERM reaches rank 1 alone inside its 2nd
    step's update. The flag travels with step 3's all-reduce and is read one step late, in step 4: both
    ranks take 4 optimizer steps, stop at step 4, rank 0 saves it; resumed on 2 ranks, the run ends
    with bitwise the weights and final log line of a run never stopped."""
    from test_resume import STOP_AT_STEP, flags, ok, run, same_weights, train_records, wrapper
    base = dict(teacher=tiny_teacher, train=write_corpus(str(tmp_path / "train.txt"), 40, seed=3), seq_len=16,
                batch_size=4, layers="0,2", max_steps=7, dtype="fp32", log_every=1000, save_every=1000,
                no_progress=True, cache_dir=str(tmp_path / "cache"))
    reference, out = str(tmp_path / "reference"), str(tmp_path / "out")
    ok(run(flags(base, out=reference), nproc=2, timeout=300))
    stopped = ok(run(flags(base, out=out), script=wrapper(tmp_path, "stop", STOP_AT_STEP), nproc=2, timeout=300,
                     env={"STOP_AFTER": "2", "STOP_RANK": "1"}))
    assert "rank 0 took 4 optimizer steps" in stopped.stdout and "rank 1 took 4 optimizer steps" in stopped.stdout
    assert stopped.stdout.count("stopped at step 4 as asked") == 1
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step-00000004.pt"]
    resumed = ok(run(flags(base, out=out, resume=True), nproc=2, timeout=300))
    assert "step-00000004.pt at step 4" in resumed.stdout
    assert same_weights(out, reference)
    assert train_records(out)[-1] == train_records(reference)[-1]


def test_a_timed_save_asked_before_a_save_is_not_repeated(setup):
    """--save-every-minutes (any time is enough here) beside --save-every 3: the request travels with the
    step's all-reduce and is read a step late. Asked in step 1, saved at step 2; asked again in step 3,
    which saves anyway (--save-every): answered there, not saved again at step 4; asked in step 4, saved
    at step 5; step 6 is the last."""
    base, folder = setup
    out = str(folder / "timed")
    train.main(base + ["--out", out, "--max-steps", "6", "--save-every", "3", "--save-every-minutes", "1e-6",
                       "--keep", "0"])
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [f"step-{s:08d}.pt" for s in (2, 3, 5, 6)]
