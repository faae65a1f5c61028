"""Never lose a run (issue 6), part 3: numerical faults and bad input.

Numerical faults run train.py as a process, with the fault injected by a wrapper (see
test_resume.py): a batch whose loss is so large that its fp16 gradients overflow, a single NaN
batch, and weights that have gone bad for good.

Bad input: every case of the issue's list, each called through train.main in this process (fast),
must raise one of the errors that train.py's command line prints as one line (no traceback), with
a message naming the problem and the fix, and leave nothing in --out that a later run could take
for a good one. A few of them are also run as real processes to check what the user sees.
"""

import fcntl
import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM, BertModel, BertTokenizer, GPT2Config

import train
from checkpoint import CheckpointError
from conftest import WORDS, write_bert_vocab, write_corpus
from token_cache import DataError
from student import StudentError
from test_resume import checkpoints, flags, metrics, ok, run, train_records, weights, wrapper

USER_ERRORS = (StudentError, DataError, CheckpointError)  # what train.py's command line prints in one line


@pytest.fixture(scope="module")
def base(tiny_teacher, tiny_corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    return dict(teacher=tiny_teacher, train=write_corpus(str(folder / "small.txt"), 40, seed=3), valid=tiny_corpus[1],
                cache_dir=str(folder / "cache"), seq_len=16, batch_size=4, max_steps=10, layers="0,2", dtype="fp32",
                log_every=1, no_progress=True)


# ------------------------------------------------------------------------------------------------
# Numerical faults
# ------------------------------------------------------------------------------------------------

def test_fp16_overflow_is_skipped_by_the_scaler_and_counted(base, tmp_path):
    """Step 5's loss is 1e30 times too large: its fp16 gradients overflow, the scaler skips the step
    and halves its scale, and metrics.jsonl counts it (as it counts the overflows of the first steps,
    while the scaler finds its scale). Skipped steps leave the weights alone: AdamW's own step count
    advanced exactly once per step that was not skipped (the fused kernel skips on the device)."""
    out = str(tmp_path / "out")
    huge = wrapper(tmp_path, "huge", """
        import distil
        real_distil_step, calls = distil.distil_step, [0]
        def distil_step(*args, **kwargs):
            calls[0] += 1
            loss, terms = real_distil_step(*args, **kwargs)
            # call 1 is train.py's probe for parameters no loss reaches (distil.freeze_unreached): call 6 is step 5
            return (loss * 1e30 if calls[0] == 6 else loss), terms
        distil.distil_step = distil_step
    """)
    ok(run(flags(base, out=out, dtype="fp16", save_every=4), script=huge))
    records = train_records(out)
    scale = {r["step"]: r["scale"] for r in records}
    skipped = {r["step"]: r["skipped_steps"] for r in records}
    assert skipped[5] == skipped[4] + 1 and scale[5] == scale[4] / 2
    drops = sum(scale[s] < scale.get(s - 1, 65536.0) for s in scale)  # the scaler starts at 2**16
    assert skipped[10] == drops >= 1
    final = torch.load(os.path.join(out, "checkpoints", "step-00000010.pt"), weights_only=True)
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {10 - skipped[10]}
    assert all(torch.isfinite(w).all() for w in weights(out).values())
    # the count lives in the checkpoint, so a resumed run keeps counting from it
    assert torch.load(os.path.join(out, "checkpoints", "step-00000008.pt"), weights_only=True)["skipped_steps"] == skipped[8]


def test_non_finite_loss_stops_the_run_at_the_last_good_checkpoint(base, tmp_path):
    """bf16. Step 2 meets one NaN batch: skipped, counted, the run goes on. From step 6 on the weights
    are NaN (diverged): steps 6, 7, 8 are skipped, and with --max-bad-steps 3 the run stops with one
    line naming the steps and the last good checkpoint (step 4: none is written during a run of bad
    steps). --resume then continues from that checkpoint."""
    out = str(tmp_path / "out")
    nan = wrapper(tmp_path, "nan", """
        import distil
        real_distil_step, calls = distil.distil_step, [0]
        def distil_step(model, *args, **kwargs):
            calls[0] += 1  # call 1 is train.py's probe (distil.freeze_unreached): call n + 1 is step n
            if calls[0] == 7:
                with torch.no_grad():
                    model.get_input_embeddings().weight.fill_(float("nan"))
            loss, terms = real_distil_step(model, *args, **kwargs)
            return (loss * float("nan") if calls[0] == 3 else loss), terms
        distil.distil_step = distil_step
    """)
    argv = flags(base, out=out, dtype="bf16", save_every=2, max_bad_steps=3)
    proc = run(argv, script=nan)
    last_good = os.path.join(out, "checkpoints", "step-00000004.pt")
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: non-finite loss or gradients at steps 6-8 (--max-bad-steps 3); last good checkpoint: {last_good} ")
    assert checkpoints(out) == ["step-00000004.pt"]
    records = train_records(out)
    assert records[1]["loss"] is None and [r["skipped_steps"] for r in records] == [0, 1, 1, 1, 1, 2, 3]
    assert not os.path.exists(os.path.join(out, "model.safetensors"))

    resumed = ok(run(argv + ["--resume"]))
    assert "step-00000004.pt at step 4" in resumed.stdout
    assert [r["step"] for r in train_records(out)] == list(range(1, 11))
    assert all(torch.isfinite(w).all() for w in weights(out).values())


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def write(path, content):
    with open(path, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
    return str(path)


def text_folder(folder):
    os.makedirs(folder)
    write(folder / "a.txt", "the cat sat on the mat\n")
    return str(folder)


def bert_folder(folder, vocab_size_delta=0, head=True, words=WORDS):
    """A tiny BERT (with or without its MLM head) whose embedding matrix has len(vocab) + delta rows."""
    os.makedirs(folder, exist_ok=True)
    vocab = write_bert_vocab(os.path.join(folder, "vocab.txt"), words)
    config = BertConfig(vocab_size=len(vocab) + vocab_size_delta, hidden_size=32, num_hidden_layers=4,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    (BertForMaskedLM if head else BertModel)(config).save_pretrained(folder)
    BertTokenizer(vocab=os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    return str(folder)


def gpt2_folder(folder):
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(folder)
    return str(folder)


def config_only_folder(folder, teacher):
    os.makedirs(folder)
    for name in os.listdir(teacher):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(teacher, name), folder)
    return str(folder)


# A vocabulary of the teacher's size with two other words: only the ids of the words tell it apart.
OTHER_WORDS = [w for w in WORDS if w not in ("cat", "dog")] + ["zebra", "lion"]

# (id, flag overrides given tmp_path and the teacher folder, words the message must contain)
BAD_INPUT = [
    ("missing corpus", lambda d, t: dict(train=str(d / "nope.txt")), ["nope.txt", "no such file"]),
    ("empty corpus", lambda d, t: dict(train=write(d / "empty.txt", "")), ["empty.txt is empty"]),
    ("binary corpus", lambda d, t: dict(train=write(d / "blob.txt", b"\x00\x01\x02" * 100)), ["looks binary"]),
    ("non-UTF-8 corpus", lambda d, t: dict(train=write(d / "latin1.txt", "the cat sat\ncaf\xe9 au lait\n".encode("latin-1"))),
     ["not UTF-8", "line 2", "iconv"]),
    ("CSV without the column", lambda d, t: dict(train=write(d / "c.csv", "title,body\na,the cat sat on a mat\n")),
     ["no column 'text'", "title, body", "--text-column"]),
    ("JSONL line not JSON", lambda d, t: dict(train=write(d / "j.jsonl", '{"text": "the cat"}\n{"text": "a dog"}\n{broken\n')),
     ["line 3", "not valid JSON"]),
    ("all documents too short", lambda d, t: dict(train=write(d / "short.txt", "cat\ndog ran\n" * 50), min_tokens=5),
     ["shorter than --min-tokens 5"]),
    ("missing validation corpus", lambda d, t: dict(valid=str(d / "nope.jsonl")), ["nope.jsonl", "no such file"]),
    ("a folder of text files as the corpus", lambda d, t: dict(train=text_folder(d / "texts")),
     ["texts is a folder", "cat ", "> train.txt"]),
    ("teacher path missing", lambda d, t: dict(teacher=str(d / "no-teacher")), ["no-teacher", "no such folder"]),
    ("teacher without an MLM head", lambda d, t: dict(teacher=bert_folder(d / "bare", head=False)),
     ["no trained masked-LM head", "cls.predictions"]),
    ("teacher not a masked LM", lambda d, t: dict(teacher=gpt2_folder(d / "gpt2")), ["'gpt2' model", "masked-LM"]),
    ("teacher without weights", lambda d, t: dict(teacher=config_only_folder(d / "noweights", t)),
     ["cannot load its weights"]),
    ("--tokenizer of another vocabulary", lambda d, t: dict(tokenizer=bert_folder(d / "other", words=OTHER_WORDS)),
     ["--tokenizer", "differs from the teacher's own tokenizer", "'cat' is id None vs"]),
    ("teacher's tokenizer larger than its embeddings", lambda d, t: dict(teacher=bert_folder(d / "small-emb", -8)),
     ["the tokenizer has", "embedding matrix only"]),
    ("--layers out of range", lambda d, t: dict(layers="0,4"), ["[4] out of range", "numbered 0 to 3"]),
    ("--layers repeated", lambda d, t: dict(layers="1,1"), ["repeats a layer"]),
    ("--layers empty", lambda d, t: dict(layers=""), ["--layers is empty"]),
    ("--layers not numbers", lambda d, t: dict(layers="first,last"), ["layer numbers", "0,2,4"]),
    ("--seq-len above the teacher's maximum", lambda d, t: dict(seq_len=65), ["--seq-len 65", "64 positions"]),
    ("--resume without a checkpoint", lambda d, t: dict(resume=True), ["--resume: no checkpoint", "without --resume"]),
]


def refused(argv, capfd):
    """The message of the one-line error train.main(argv) stops with (and nothing printed as a traceback)."""
    with pytest.raises(USER_ERRORS) as info:
        train.main(argv)
    message = str(info.value)
    captured = capfd.readouterr()
    assert "\n" not in message and "Traceback" not in captured.out + captured.err
    return message


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_stops_in_one_line_and_writes_nothing(case, base, tmp_path, capfd):
    _, overrides, fragments = case
    out = tmp_path / "out"
    message = refused(flags(base, out=str(out), **overrides(tmp_path, base["teacher"])), capfd)
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()  # checked before anything is written


@pytest.fixture(scope="module")
def finished_run(base, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("finished") / "out")
    assert train.main(flags(base, out=out, max_steps=2, save_every=1)) == 2
    return out


def test_resume_with_other_settings_names_the_keys(base, finished_run, tmp_path, capfd):
    out = str(tmp_path / "out")
    shutil.copytree(finished_run, out)
    before = sorted(os.listdir(out)), checkpoints(out)
    message = refused(flags(base, out=out, max_steps=2, lr=1e-3, alpha_kd=1.0, resume=True), capfd)
    assert "alpha_kd: 5.0 -> 1.0" in message and "lr: 0.0005 -> 0.001" in message, message
    assert "resume with the original flags" in message
    assert (sorted(os.listdir(out)), checkpoints(out)) == before


def test_resume_may_change_the_cadence(base, finished_run, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(finished_run, out)
    cadence = dict(eval_every=7, save_every=9, log_every=3, keep=1, max_bad_steps=2, num_workers=1)
    assert train.main(flags(base, out=out, max_steps=2, resume=True, **cadence)) == 2


def test_out_holding_another_run_is_refused(base, finished_run, capfd):
    before = json.dumps(metrics(finished_run)), checkpoints(finished_run)
    message = refused(flags(base, out=finished_run, max_steps=3), capfd)
    assert "already holds a run" in message and "--resume" in message and "another --out" in message
    assert (json.dumps(metrics(finished_run)), checkpoints(finished_run)) == before


def test_out_in_use_by_a_live_run_is_refused(base, tmp_path, capfd):
    """Two runs in one folder would interleave their checkpoints: the second stops before writing."""
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as lock:  # what a live run holds
        fcntl.flock(lock, fcntl.LOCK_EX)
        message = refused(flags(base, out=str(out), max_steps=2), capfd)
    assert "in use by another run" in message and os.listdir(out) == [".lock"]


def test_out_with_only_a_dead_runs_log_starts_over(base, tmp_path):
    """A run that died before its first checkpoint has nothing to resume: refusing the folder would
    leave its owner stuck between "already holds a run" and "--resume: no checkpoint"."""
    out = tmp_path / "out"
    out.mkdir()
    write(out / "metrics.jsonl", '{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    write(out / "run.json", "{}")
    assert train.main(flags(base, out=str(out), max_steps=2, save_every=1)) == 2
    assert [r["step"] for r in train_records(str(out))] == [1, 2] and len(metrics(str(out))) == 4


def test_embedding_matrix_larger_than_the_vocabulary_is_legal(base, tmp_path):
    """Padded for speed (e.g. to a multiple of 64): the run works and the student keeps the padding."""
    teacher = bert_folder(tmp_path / "padded", vocab_size_delta=27)
    out = str(tmp_path / "out")
    assert train.main(flags(base, teacher=teacher, out=out, max_steps=2)) == 2
    student = AutoModelForMaskedLM.from_pretrained(out)
    tokenizer = BertTokenizer(vocab=os.path.join(teacher, "vocab.txt"))
    assert student.config.vocab_size == BertConfig.from_pretrained(teacher).vocab_size >= len(tokenizer) + 27


@pytest.mark.parametrize("case", [BAD_INPUT[5], BAD_INPUT[14], BAD_INPUT[19]], ids=lambda c: c[0])
def test_what_the_user_sees(case, base, tmp_path):
    """The real command line: exit 1, the last line of stderr is the error, no traceback, no --out."""
    _, overrides, fragments = case
    out = tmp_path / "out"
    proc = run(flags(base, out=str(out), **overrides(tmp_path, base["teacher"])))
    last_line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last_line.startswith("error: ") and fragments[0] in last_line
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists()
