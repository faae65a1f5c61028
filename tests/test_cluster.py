"""Runs that survive a cluster (issue 21): elastic restarts, several nodes, a lost rank, shared folders.

Every run is a real train.py process (under torchrun for the distributed ones, gloo on the CPU) with a
tiny teacher without dropout, as in test_resume.py and test_ddp.py:
- --resume auto: starts, resumes, says a finished run is finished (exit 0, nothing rewritten), extends
  one with a larger --max-steps, refuses another run's settings;
- --global-batch: a run stopped on 2 ranks and resumed on 1 continues at the same data position;
- a lost rank: torchrun --max-restarts 1, one rank SIGKILLed mid-run; the group restarts, resumes from the
  last checkpoint and ends with weights bitwise equal to the uninterrupted run's;
- two torchrun agents (--nnodes 2, c10d rendezvous on localhost), each with its own node-local cache,
  equal to the one-node run;
- two processes that pretend to be two hosts build the same token cache at once;
- an --out that one rank sees as another folder is refused on every rank before any work.
"""

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from cluster import ClusterError, check_restartable, split_global_batch
from conftest import write_corpus
from test_resume import ENV, ROOT, STOP_AT_STEP, TRAIN, checkpoints, flags, load_checkpoint, ok, run, \
    same_weights, train_records, weights, wrapper

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# What the README's torchrun commands set: a rendezvous store per restart (see cluster.check_restartable)
CLUSTER_ENV = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

# SIGKILL rank 1 inside its k-th optimizer step ($KILL_AFTER), in the group's first round only.
KILL_RANK_1 = """
    real_step, calls = torch.optim.AdamW.step, [0]
    def step(self, *args, **kwargs):
        calls[0] += 1
        if (calls[0] == int(os.environ["KILL_AFTER"]) and os.environ.get("RANK") == "1"
                and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self, *args, **kwargs)
    torch.optim.AdamW.step = step
"""

# Rank 1 is given another --out, as a node whose --out is a node-local folder would be.
OTHER_OUT_ON_RANK_1 = """
    if os.environ.get("RANK") == "1":
        i = sys.argv.index("--out") + 1
        sys.argv[i] = sys.argv[i] + "-node1"
"""


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def torchrun(script, argv, nproc=2, extra=(), env=None, timeout=240):
    command = TORCHRUN + ["--standalone", f"--nproc_per_node={nproc}", *extra, script, *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**CLUSTER_ENV, **(env or {})},
                          cwd=ROOT)


@pytest.fixture(scope="module")
def base(tiny_teacher_no_dropout, tmp_path_factory):
    """10 steps of global batch 8 over a 40-document corpus (8 steps an epoch: the runs cross one), a
    checkpoint every 2 steps."""
    folder = tmp_path_factory.mktemp("cluster")
    return folder, dict(teacher=tiny_teacher_no_dropout, train=write_corpus(str(folder / "small.txt"), 40, seed=3),
                        cache_dir=str(folder / "cache"), seq_len=16, max_steps=10, layers="0,2", dtype="fp32",
                        batch_size=4, global_batch=8, log_every=1, save_every=2, no_progress=True, resume="auto")


@pytest.fixture(scope="module")
def reference(base):
    """The uninterrupted run on one node, two ranks, started by --resume auto in an empty --out."""
    folder, flags_ = base
    out = str(folder / "reference")
    t0 = time.perf_counter()
    proc = ok(torchrun(TRAIN, flags(flags_, out=out)))
    return out, time.perf_counter() - t0, proc


def mtimes(out):
    return {os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns for d, _, names in os.walk(out)
            for n in names}


def test_resume_auto_finished_extended_and_refused(base, reference):
    folder, flags_ = base
    out = reference[0]
    assert "resumed" not in reference[2].stdout and checkpoints(out)[-1] == "step-00000010.pt"
    before = mtimes(out)
    again = ok(torchrun(TRAIN, flags(flags_, out=out)))  # what torchrun --max-restarts would run again
    lines = [line for line in again.stdout.splitlines() if line.strip()]
    assert lines == [f"{out} holds a finished run (step 10): nothing to do; a larger --max-steps extends it"]
    assert mtimes(out) == before  # nothing rewritten
    ok(run(flags(flags_, out=out, resume=True)))  # plain --resume on a finished run: the same answer
    assert mtimes(out) == before

    other = run(flags(flags_, out=out, max_steps=12, lr=1e-3))  # another run's settings
    assert other.returncode != 0 and "other settings" in other.stderr and "lr" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1 and mtimes(out) == before

    extended = str(folder / "extended")
    ok(subprocess.run(["cp", "-r", out, extended]))
    proc = ok(run(flags(flags_, out=extended, max_steps=12)))  # one rank: the global batch is the same
    assert f"resumed from {extended}/checkpoints/step-00000010.pt at step 10" in proc.stdout
    records = train_records(extended)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[10]["lr"] > 0  # the schedule of 12 steps from step 10 on: back up from 0, decaying to 0
    assert checkpoints(extended)[-1] == "step-00000012.pt"


def test_global_batch_keeps_the_run_on_another_number_of_ranks(base, reference):
    """Stopped on 2 ranks (batch 4 each) at step 7 (SIGTERM inside step 5's update: in step 6's all-reduce,
    read a step late by step 7), resumed
    on 1 (batch 4, 2 micro-steps): the same data,
    the same losses to tolerance (the sums run in another order), the run's global batch recorded."""
    folder, flags_ = base
    out = str(folder / "elastic")
    stop = wrapper(folder, "stop", STOP_AT_STEP)
    ok(torchrun(stop, flags(flags_, out=out), env={"STOP_AFTER": "5"}))
    assert checkpoints(out)[-1] == "step-00000007.pt"
    ckpt = load_checkpoint(out, "step-00000007.pt")
    assert ckpt["config"]["global_batch"] == 8 and ckpt["config"]["grad_accum"] == 1  # 2 ranks x 4
    ok(run(flags(flags_, out=out)))
    ref, got = train_records(reference[0]), train_records(out)
    assert [r["step"] for r in got] == list(range(1, 11))
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
    wa, wb = weights(reference[0]), weights(out)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4) for k in wa)


def test_global_batch_split():
    assert split_global_batch(32, 4, 2) == 4 and split_global_batch(8, 8, 1) == 1
    with pytest.raises(ClusterError, match="the rank counts that divide it are 1, 2, 4, 8"):
        split_global_batch(32, 4, 3)
    with pytest.raises(ClusterError, match="not a multiple of --batch-size 5"):
        split_global_batch(32, 5, 1)


def test_restarts_with_the_shared_rendezvous_store_are_refused(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    with pytest.raises(ClusterError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        check_restartable()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    check_restartable()


def test_a_lost_rank_restarts_and_ends_bitwise_equal(base, reference):
    """torchrun --max-restarts 1; rank 1 SIGKILLed inside step 7 (checkpoint at 6): rank 0 fails at once in
    gloo's collective, torchrun restarts both, --resume auto continues from step 6."""
    folder, flags_ = base
    out = str(folder / "killed")
    kill = wrapper(folder, "kill", KILL_RANK_1)
    t0 = time.perf_counter()
    proc = ok(torchrun(kill, flags(flags_, out=out), extra=["--max-restarts", "1"], env={"KILL_AFTER": "7"}))
    seconds = time.perf_counter() - t0
    assert f"resumed from {out}/checkpoints/step-00000006.pt at step 6" in proc.stdout, proc.stdout + proc.stderr
    assert same_weights(reference[0], out)
    assert train_records(reference[0]) == train_records(out)
    print(f"\nkill test: {seconds:.1f} s with one lost rank, {reference[1]:.1f} s uninterrupted: "
          f"{seconds - reference[1]:.1f} s lost (restart, reload, 1 step replayed)")


def test_two_agents_equal_one_node(base, reference):
    """Two torchrun agents on localhost, one process each (--nnodes 2, c10d rendezvous), each tokenizing
    into its own node-local cache folder, one shared --out: the same run as one node with two ranks."""
    folder, flags_ = base
    out, port = str(folder / "two_nodes"), free_port()
    agents = []
    for node in range(2):
        command = TORCHRUN + ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                              f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=cluster-test", "--max-restarts=1",
                              TRAIN, *flags(flags_, out=out, cache_dir=str(folder / f"cache-node{node}"))]
        agents.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=CLUSTER_ENV, cwd=ROOT))
    for agent in agents:
        stdout, stderr = agent.communicate(timeout=240)
        assert agent.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert all(os.listdir(folder / f"cache-node{node}") for node in range(2))
    assert same_weights(reference[0], out)
    assert train_records(reference[0]) == train_records(out)


def test_time_based_checkpoints(base):
    """--save-every-minutes: a checkpoint whenever that much time has passed, whatever --save-every says.
    The request travels with the step's all-reduce and is read a step late: due at step 1 (any time is
    enough here), saved at step 2; due again at step 3, saved at step 4 (and the final step)."""
    folder, flags_ = base
    out = str(folder / "timed")
    ok(run(flags(flags_, out=out, max_steps=4, save_every=1000, save_every_minutes=1e-6, keep=0)))
    assert checkpoints(out) == ["step-00000002.pt", "step-00000004.pt"]


def test_cache_only_tokenizes_and_writes_nothing_in_out(base, tmp_path):
    folder, flags_ = base
    cache, out = tmp_path / "cache", tmp_path / "out"
    proc = ok(run(flags(flags_, out=str(out), cache_dir=str(cache), cache_only=True)))
    assert proc.stdout.strip().splitlines()[-1] == f"tokenized {flags_['train']} into {cache}"
    assert any(name.endswith(".tokens") for name in os.listdir(cache)) and not out.exists()


def test_an_unshared_out_is_refused_before_any_work(base):
    folder, flags_ = base
    out = str(folder / "unshared")
    script = wrapper(folder, "unshared", OTHER_OUT_ON_RANK_1)
    proc = torchrun(script, flags(flags_, out=out))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 2 and all("must be a folder all nodes share" in line for line in errors), proc.stderr
    assert {line.split(":")[0] for line in errors} == {"error (rank 0)", "error (rank 1)"}  # each its own line
    assert os.listdir(out) == []  # no run.json, no checkpoint: nothing was done


# Build the token cache of sys.argv[1] into sys.argv[2] as host sys.argv[3]; the lock patched as asked in
# sys.argv[4] ("none": every process builds at once, as node-local locks on a shared folder would let
# them; "noflock": flock fails as on a filesystem without it). Prints the tokens' sum and count.
BUILD_CACHE = """
import errno, fcntl, socket, sys, time
sys.path.insert(0, {root!r})
import numpy as np
from transformers import AutoTokenizer
socket.gethostname = lambda: sys.argv[3]
import cluster, token_cache
if sys.argv[4] == "none":
    from contextlib import nullcontext
    token_cache.file_lock = lambda path, wait_s=-1: nullcontext()
else:
    def no_flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")
    cluster.fcntl.flock = no_flock
real_read = token_cache.read_documents
def slow_read(*args, **kwargs):  # documents arrive slowly: the two builds overlap
    for item in real_read(*args, **kwargs):
        time.sleep(0.002)
        yield item
token_cache.read_documents = slow_read
corpus = token_cache.load_corpus(sys.argv[1], AutoTokenizer.from_pretrained(sys.argv[5]), sys.argv[2],
                                 batch_docs=10, progress=False)
print(int(np.asarray(corpus.tokens, dtype=np.int64).sum()), len(corpus.tokens), len(corpus.doc_starts))
"""


@pytest.mark.parametrize("lock", ["none", "noflock"])
def test_two_hosts_build_one_shared_cache_at_once(lock, tiny_teacher, tiny_corpus, tmp_path):
    script = tmp_path / "build.py"
    script.write_text(BUILD_CACHE.format(root=ROOT))
    cache = tmp_path / "shared-cache"
    procs = [subprocess.Popen([sys.executable, str(script), tiny_corpus[0], str(cache), f"node{i}", lock,
                               tiny_teacher], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for i in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert results[0][0] == results[1][0] and results[0][0].strip()
    alone = subprocess.run([sys.executable, str(script), tiny_corpus[0], str(tmp_path / "alone"), "node9", lock,
                            tiny_teacher], capture_output=True, text=True, env=ENV, timeout=120)
    assert alone.stdout == results[0][0]  # what one process alone builds
    assert not [name for name in os.listdir(cache) if name.endswith(".tmp") or ".tmp." in name]


def test_out_lock_without_flock_is_a_soft_lock(tmp_path, monkeypatch):
    """On a filesystem without flock, --out's lock is filelock's marker file: a second holder is refused,
    and the folder is free again once the first lets go."""
    import errno
    import cluster

    def no_flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(cluster.fcntl, "flock", no_flock)
    path = str(tmp_path / ".lock")
    first = cluster.try_lock(path)
    assert first is not None and os.path.exists(path + ".soft")
    assert cluster.try_lock(path) is None
    first.release()
    assert not os.path.exists(path + ".soft")
    again = cluster.try_lock(path)
    assert again is not None
    again.release()
