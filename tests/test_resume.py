"""Never lose a run (issue 6), part 1: exact resume, crash safety, determinism, --keep.

Every run here is a real `python train.py` process on CPU (fp32, one thread) with a tiny teacher.
Faults are injected by a wrapper script that patches one library call and then runs train.py
exactly as the command line does (`runpy`), so train.py carries no test-only flags:
- "stop at step k": the wrapper sends the process SIGTERM from inside its k-th optimizer step,
  as a scheduler would, so the stop lands at a known step without changing the schedule
  (--max-steps would change it);
- "killed while writing a checkpoint": the wrapper's torch.save writes half the file, then SIGKILLs
  the process.
The helpers at the top are shared with test_ddp.py and test_faults.py.
"""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
# One thread: runs compared bitwise must use the same reductions, and two processes share 2 cores.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def flags(base=None, **values):
    """Command-line flags from a dict and keywords (which win): seq_len=16 -> --seq-len 16,
    no_progress=True -> --no-progress, None or False -> left out."""
    argv = []
    for key, value in {**(base or {}), **values}.items():
        if value is None or value is False:
            continue
        argv.append("--" + key.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv


def wrapper(tmp_path, name, patch):
    """A script that runs `patch` (Python source; os, signal, sys and torch are imported), then train.py
    as `python train.py` would."""
    path = tmp_path / f"{name}.py"
    path.write_text(f"import os, runpy, signal, sys\nsys.path.insert(0, {ROOT!r})\nimport torch\n"
                    f"{textwrap.dedent(patch)}\n"
                    f"sys.argv[0] = {TRAIN!r}\nrunpy.run_path({TRAIN!r}, run_name='__main__')\n")
    return str(path)


def launch(script, argv, nproc=1):
    """The command that runs `script` in one process, or under torchrun in `nproc`."""
    if nproc == 1:
        return [sys.executable, script, *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *argv]


def run(argv, script=TRAIN, nproc=1, timeout=150, env=None):
    """Run train.py (or a wrapper of it) to the end; returns the CompletedProcess (text output)."""
    return subprocess.run(launch(script, argv, nproc), capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})}, cwd=ROOT)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(out):
    def not_json(constant):  # NaN and Infinity are Python's extensions, not JSON
        raise AssertionError(f"metrics.jsonl holds {constant}")
    return [json.loads(line, parse_constant=not_json) for line in open(os.path.join(out, "metrics.jsonl"))]


TIMINGS = {"tokens_per_s", "data_wait"}  # wall-clock measurements, which no two runs share


def train_records(out):
    """metrics.jsonl's training lines without the wall-clock throughput, which no two runs share."""
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in metrics(out) if "loss" in r]


def weights(out):
    return load_file(os.path.join(out, "model.safetensors"))


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def checkpoints(out):
    return sorted(os.listdir(os.path.join(out, "checkpoints")))


def load_checkpoint(out, name):
    return torch.load(os.path.join(out, "checkpoints", name), map_location="cpu", weights_only=True)


# SIGTERM from inside the k-th optimizer step (k from $STOP_AFTER; on rank $STOP_RANK only, if set).
STOP_AT_STEP = """
    real_step, calls = torch.optim.AdamW.step, [0]
    def step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == int(os.environ["STOP_AFTER"]) and os.environ.get("RANK", "0") == os.environ.get("STOP_RANK", "0"):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *args, **kwargs)
    torch.optim.AdamW.step = step
    import atexit
    atexit.register(lambda: print(f"rank {os.environ.get('RANK', '0')} took {calls[0]} optimizer steps", flush=True))
"""


# ------------------------------------------------------------------------------------------------
# The reference run: 12 steps of 2 micro-batches; the 40-document corpus gives 8 steps per epoch,
# so the run crosses an epoch; warmup is the first 6 steps. Dropout stays on (0.1): the resumed
# run must replay it from the step alone.
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tiny_teacher, tiny_corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    train = write_corpus(str(folder / "small.txt"), 40, seed=3)
    base = dict(teacher=tiny_teacher, train=train, valid=tiny_corpus[1], cache_dir=str(folder / "cache"),
                seq_len=16, batch_size=4, grad_accum=2, max_steps=12, warmup=0.5, layers="0,2", dtype="fp32",
                lr=5e-4, log_every=1, eval_every=4, no_progress=True)
    reference = str(folder / "reference")
    ok(run(flags(base, out=reference, save_every=1, keep=2)))
    return base, reference


def test_keep_only_the_newest_checkpoints(setup):
    base, reference = setup
    assert checkpoints(reference) == ["step-00000011.pt", "step-00000012.pt"]  # --save-every 1 --keep 2
    final = load_checkpoint(reference, "step-00000012.pt")
    assert final["step"] == 12 and final["data_position"][0] == 1, "the run should cross into a second epoch"


def test_stopped_and_resumed_run_is_the_same_run(setup, tmp_path):
    """SIGTERM inside step 3's update (in warmup, mid-epoch, accumulation 2). The stop flag travels with
    step 4's all-reduce and comes to the host one step late (train_step.StepCounters), so step 5 acts
    on it: the run finishes step 5, saves at step 5 and exits 0; --resume (with other cadence flags)
    gives bitwise the same losses and weights as never stopping."""
    base, reference = setup
    out = str(tmp_path / "out")
    stop = wrapper(tmp_path, "stop", STOP_AT_STEP)
    stopped = ok(run(flags(base, out=out, save_every=5), script=stop, env={"STOP_AFTER": "3"}))
    assert "stopped at step 5 as asked" in stopped.stdout and "took 5 optimizer steps" in stopped.stdout
    assert checkpoints(out) == ["step-00000005.pt"]
    state = load_checkpoint(out, "step-00000005.pt")
    epoch, index = state["data_position"]
    assert epoch == 0 and 0 < index, "the stop should fall mid-epoch"
    assert [r["lr"] for r in train_records(out)][-1] < base["lr"], "the stop should fall in the warmup"

    resumed = ok(run(flags(base, out=out, save_every=4, keep=1, resume=True)))
    assert "resumed from" in resumed.stdout and "step-00000005.pt at step 5" in resumed.stdout
    assert train_records(out) == train_records(reference)  # every step's loss, each term, lr, grad norm
    assert [r for r in metrics(out) if "valid_ppl" in r] == [r for r in metrics(reference) if "valid_ppl" in r]
    assert same_weights(out, reference)


@pytest.fixture(scope="module")
def second_run(setup, tmp_path_factory):
    """The reference run again, same seed and flags (checkpoints every 4 steps)."""
    base, _ = setup
    out = str(tmp_path_factory.mktemp("again") / "out")
    ok(run(flags(base, out=out, save_every=4, keep=3)))
    return out


def test_same_seed_same_flags_same_losses(setup, second_run):
    _, reference = setup
    assert train_records(second_run) == train_records(reference)
    assert same_weights(second_run, reference)


def test_sigkill_while_writing_a_checkpoint_loses_nothing_saved(setup, tmp_path):
    """SIGKILL halfway through writing the step-9 checkpoint: step 6 stays loadable, the partial file
    is never taken for a checkpoint, and --resume replays steps 7-12 into the reference run. The log
    averages 4 steps, so the resumed run must also restore the half-filled log window of step 6."""
    base, reference = setup
    out = str(tmp_path / "out")
    crash = wrapper(tmp_path, "crash", """
        import io
        real_save = torch.save
        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("step") == 9:
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = save
    """)
    cadence = dict(save_every=3, keep=2, log_every=4)
    killed = run(flags(base, out=out, **cadence), script=crash)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == \
        ["step-00000003.pt", "step-00000006.pt", "step-00000009.pt.tmp"]

    # resumed with checkpoints every 4 steps: no save at step 9 will overwrite the partial file
    resumed = ok(run(flags(base, out=out, **{**cadence, "save_every": 4}, resume=True)))
    assert "step-00000006.pt at step 6" in resumed.stdout
    assert checkpoints(out) == ["step-00000008.pt", "step-00000012.pt"]  # the partial file is gone
    assert same_weights(out, reference)
    per_step = {r["step"]: r for r in train_records(reference)}
    logged = train_records(out)
    assert [r["step"] for r in logged] == [4, 8, 12]
    for record in logged:  # each line is the mean of its 4 steps, as if the run had never stopped
        window = range(record["step"] - 3, record["step"] + 1)
        for key in ("loss", "kd", "mlm", "cos"):
            assert record[key] == sum(per_step[s][key] for s in window) / 4


def test_damaged_newest_checkpoint_is_skipped(setup, second_run, tmp_path):
    """A checkpoint damaged after it was written (disk fault, bad copy) is passed over with a warning,
    and the resume goes back to the one before."""
    base, reference = setup
    out = str(tmp_path / "out")
    shutil.copytree(second_run, out)
    newest = os.path.join(out, "checkpoints", "step-00000012.pt")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 3)
    resumed = ok(run(flags(base, out=out, save_every=4, keep=3, resume=True)))
    assert "skipping unreadable checkpoint" in resumed.stdout and "step-00000008.pt at step 8" in resumed.stdout
    assert load_checkpoint(out, "step-00000012.pt")["step"] == 12  # rewritten whole
    assert train_records(out) == train_records(reference)
    assert same_weights(out, reference)


def test_sigterm_saves_and_exits_cleanly(setup, tmp_path):
    """What a scheduler does before pre-emption: SIGTERM from outside, at whatever step the run is."""
    base, _ = setup
    out = str(tmp_path / "out")
    argv = flags(base, max_steps=100000, valid=None, out=out, save_every=100000)
    proc = subprocess.Popen(launch(TRAIN, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=ROOT)
    log = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 120
    while not (os.path.exists(log) and len(open(log).readlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout + stderr
    assert time.time() - sent < 30, "torchrun kills workers 30 s after SIGTERM"
    stopped_at = int(stdout.split("stopped at step ")[1].split()[0])
    assert checkpoints(out) == [f"step-{stopped_at:08d}.pt"]
    assert load_checkpoint(out, checkpoints(out)[0])["step"] == stopped_at == train_records(out)[-1]["step"]
    assert not os.path.exists(os.path.join(out, "model.safetensors"))  # a stopped run is not a finished one


# ------------------------------------------------------------------------------------------------
# What a resume must not change silently (issue 12 item 11): the dtype, the corpus, the optimizer's
# kernel. A short run of its own (its corpus file is edited), 3 steps with checkpoints at steps 2 and 3:
# a resume of the finished run runs every check and then has nothing left to do.
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_run(setup, tmp_path_factory):
    base, _ = setup
    folder = tmp_path_factory.mktemp("short")
    train = write_corpus(str(folder / "own.txt"), 40, seed=5)
    short = {**base, "train": train, "valid": None, "max_steps": 3, "save_every": 2}
    out = str(folder / "out")
    proc = ok(run(flags(short, out=out)))
    return short, out, proc


def one_line_error(proc):
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stdout + proc.stderr
    return lines[0]


def edited_copy(out, tmp_path, edit, step=3):
    """A copy of the run in `out` whose checkpoint of `step` went through edit(state); later ones removed."""
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    for name in checkpoints(copy):
        if name > f"step-{step:08d}.pt":
            os.remove(os.path.join(copy, "checkpoints", name))
    path = os.path.join(copy, "checkpoints", f"step-{step:08d}.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    edit(state)
    torch.save(state, path)
    return copy


def test_run_records_its_resolved_dtype_and_corpus(short_run):
    short, out, proc = short_run
    assert proc.stdout.splitlines()[0] == "dtype: fp32 (--dtype fp32)"
    recorded = json.load(open(os.path.join(out, "run.json")))
    assert recorded["dtype"] == "fp32" and recorded["dtype_requested"] == "fp32"
    corpus = recorded["train_corpus"]
    assert corpus["tokens"] > 0 and corpus["sequences"] == -(-corpus["tokens"] // (short["seq_len"] - 2))
    assert len(corpus["sha256"]) == 64
    assert load_checkpoint(out, "step-00000002.pt")["config"] == recorded


def test_resume_refuses_another_dtype_in_one_line(short_run, tmp_path):
    """Recorded bf16 (say, --dtype auto on a CPU with AMX), resumed where the run would compute in fp32:
    refused, naming both and the flag that continues it; the same with --dtype auto wherever auto
    resolves to something other than the recorded dtype."""
    from precision import pick_dtype
    short, out, _ = short_run
    short = {**short, "max_steps": 4}  # past the run's end: a finished run resumed as it was only says so
    copy = edited_copy(out, tmp_path, lambda state: state["config"].update(dtype="bf16"))
    line = one_line_error(run(flags(short, out=copy, resume=True)))
    assert "trained in bf16" in line and "compute in fp32" in line and "--dtype bf16" in line

    auto_here, _ = pick_dtype("auto", torch.device("cpu"))
    other = "fp16" if auto_here != "fp16" else "bf16"
    copy = edited_copy(out, tmp_path / "auto", lambda state: state["config"].update(dtype=other))
    line = one_line_error(run(flags(short, out=copy, resume=True, dtype="auto")))
    assert f"trained in {other}" in line and f"compute in {auto_here} (--dtype auto" in line
    assert f"--dtype {other} to continue" in line

    # a checkpoint from before the resolved dtype was recorded says "auto": the user names the dtype
    copy = edited_copy(out, tmp_path / "legacy", lambda state: state["config"].update(dtype="auto"))
    line = one_line_error(run(flags(short, out=copy, resume=True, dtype="auto")))
    assert "records --dtype auto" in line and "pass --dtype with the precision the run used" in line
    ok(run(flags(short, out=copy, resume=True, dtype="fp32")))


def test_resume_refuses_a_changed_corpus_in_one_line(short_run, tmp_path):
    short, out, _ = short_run
    short = {**short, "max_steps": 4}  # past the run's end: a finished run resumed as it was only says so
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    train = str(tmp_path / "own.txt")
    shutil.copy(short["train"], train)
    moved = {**short, "train": train}
    ok(run(flags(moved, out=copy, resume=True)))  # the same file at another path, with another time: resumes

    text = open(train).read()
    with open(train, "w") as f:  # one more document: another number of sequences
        f.write(text + "the cat sat on the mat with the old man.\n")
    line = one_line_error(run(flags(moved, out=copy, resume=True, max_steps=5)))
    assert "training corpus" in line and "changed" in line and "sequences" in line

    with open(train, "w") as f:  # the same length, one word swapped for another of the same length
        f.write(text.replace("cat", "dog", 1))
    line = one_line_error(run(flags(moved, out=copy, resume=True, max_steps=5)))
    assert "training corpus" in line and "the same number of tokens, but other ones" in line


def test_resumed_optimizer_takes_this_runs_fused_setting(short_run, tmp_path):
    """A checkpoint whose optimizer was unfused (a run from before AdamW was fused on CPUs too; on a
    GPU, a run started on a CPU that had none) resumed where this run builds it fused: the resumed
    optimizer is fused, as the checkpoint it writes next records."""
    short, out, _ = short_run
    assert [g["fused"] for g in load_checkpoint(out, "step-00000002.pt")["optimizer"]["param_groups"]] == [True, True]

    def unfused(state):
        for group in state["optimizer"]["param_groups"]:
            group["fused"] = False
    copy = edited_copy(out, tmp_path, unfused, step=2)
    ok(run(flags(short, out=copy, resume=True)))
    groups = load_checkpoint(copy, "step-00000003.pt")["optimizer"]["param_groups"]
    assert [g["fused"] for g in groups] == [True, True]


def test_load_optimizer_state_moves_a_cpu_state_to_a_fused_optimizer():
    """The other direction, CPU -> GPU, on a CPU (which has a fused AdamW too): the state of an unfused
    optimizer loaded into a fused one keeps it fused and continues exactly as the unfused one would."""
    from checkpoint import load_optimizer_state
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 4))
    unfused = torch.optim.AdamW([p], lr=0.1, fused=False)
    p.grad = torch.randn(8, 4)
    unfused.step()
    q = torch.nn.Parameter(p.detach().clone())
    fused = torch.optim.AdamW([q], lr=0.1, fused=True)
    load_optimizer_state(fused, copy.deepcopy(unfused.state_dict()))  # a deep copy: as from a file
    assert fused.param_groups[0]["fused"] is True
    p.grad = torch.randn(8, 4)
    q.grad = p.grad.clone()
    unfused.step()
    fused.step()
    torch.testing.assert_close(q, p)
