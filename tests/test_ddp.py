"""Never lose a run (issue 6), part 2: distributed equivalence under torchrun (gloo, CPU, 2 ranks).

Two ranks with batch b must be the same run as one rank with batch 2b, and as one rank with batch
b and --grad-accum 2: same gradients, same logged losses and perplexities (all to tolerance: the
sums run in another order), files written by rank 0 only. A stop requested on one rank stops both
at the same step, and a rank that fails takes the others down instead of leaving them hanging.

Tolerance. The three runs add the same float32 terms in different orders (per-rank partial sums,
then the all-reduce, or two micro-batches accumulated), which moves a result by a few units in the
last place of its largest terms: we measured at most 6e-7 of a gradient tensor's largest entry, 2e-7
relative on the total loss and 3e-8 absolute on a KD term of 1e-4. We allow 1e-5 (of a gradient
tensor's largest entry; relative or absolute for logged values), which no real bug stays under: a
gradient not averaged over ranks, or divided by a per-rank instead of the global count, is off by
tens of percent.
"""

import math
import os
import time

import pytest
import torch

from conftest import write_corpus
from test_resume import STOP_AT_STEP, checkpoints, flags, metrics, ok, run, weights, wrapper

TOLERANCE = 1e-5

# Dump every parameter's gradient, as the optimizer sees it, on its first step (one file per rank).
# On ranks other than 0, also fail loudly if anything is written under --out.
DUMP_GRADS = """
    real_step = torch.optim.AdamW.step
    def step(self, *args, **kwargs):
        if not getattr(step, "dumped", False):
            step.dumped = True
            torch.save([p.grad.clone() for group in self.param_groups for p in group["params"]],
                       os.environ["GRAD_DUMP"] + ".rank" + os.environ.get("RANK", "0"))
        return real_step(self, *args, **kwargs)
    torch.optim.AdamW.step = step

    if os.environ.get("RANK", "0") != "0":
        import builtins
        out = os.path.abspath(sys.argv[sys.argv.index("--out") + 1])
        def guard(path):
            if os.path.abspath(str(path)).startswith(out):
                raise AssertionError(f"rank {os.environ['RANK']} wrote {path}")
        real_open, real_replace, real_makedirs = builtins.open, os.replace, os.makedirs
        def open_(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                guard(file)
            return real_open(file, mode, *args, **kwargs)
        def replace(src, dst, *args, **kwargs):
            guard(dst)
            return real_replace(src, dst, *args, **kwargs)
        def makedirs(name, *args, **kwargs):
            guard(name)
            return real_makedirs(name, *args, **kwargs)
        builtins.open, os.replace, os.makedirs = open_, replace, makedirs
"""


@pytest.fixture(scope="module")
def runs(tiny_teacher_no_dropout, tiny_corpus, tmp_path_factory):
    """The same 10 steps of global batch 8 as 2 ranks x 4, 1 rank x 8, and 1 rank x 4 x 2 micro-steps. The
    corpus gives 71 sequences: 8 global batches per epoch, so step 9 starts the second epoch (where a
    split-dependent epoch length, 17 micro-batches of 4 but 8 batches of 8, would part the runs)."""
    folder = tmp_path_factory.mktemp("ddp")
    base = dict(teacher=tiny_teacher_no_dropout, train=write_corpus(str(folder / "small.txt"), 40, seed=3),
                valid=tiny_corpus[1], cache_dir=str(folder / "cache"), seq_len=16, max_steps=10, layers="0,2",
                dtype="fp32", log_every=1, eval_every=5, save_every=5, no_progress=True)
    dump = wrapper(folder, "dump", DUMP_GRADS)
    splits = {"two_ranks": (2, dict(batch_size=4)), "one_rank": (1, dict(batch_size=8)),
              "accumulated": (1, dict(batch_size=4, grad_accum=2))}
    for name, (nproc, split) in splits.items():
        ok(run(flags(base, out=str(folder / name), **split), script=dump, nproc=nproc,
               env={"GRAD_DUMP": str(folder / name)}))
    return base, folder


def close(a, b):
    """Logged values to TOLERANCE, relative or absolute: KD and cosine terms near 0 are differences of
    quantities of order 1-10 and keep their absolute rounding error as they shrink."""
    return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE)


def test_two_ranks_give_the_gradients_of_one_big_batch(runs):
    _, folder = runs
    grads = {name: torch.load(folder / f"{name}.rank0") for name in ("two_ranks", "one_rank", "accumulated")}
    rank1 = torch.load(folder / "two_ranks.rank1")
    assert all(torch.equal(a, b) for a, b in zip(grads["two_ranks"], rank1)), "DDP leaves every rank the same gradient"
    for other in ("one_rank", "accumulated"):
        assert len(grads[other]) == len(grads["two_ranks"])
        for a, b in zip(grads["two_ranks"], grads[other]):
            torch.testing.assert_close(a, b, rtol=TOLERANCE, atol=TOLERANCE * b.abs().max().item())


def same_metrics(out, reference):
    mine, theirs = metrics(out), metrics(reference)
    assert [sorted(r) for r in mine] == [sorted(r) for r in theirs]  # the same lines, once each
    for a, b in zip(mine, theirs):
        for key in a.keys() - {"tokens_per_s", "data_wait"}:
            assert close(a[key], b[key]), (a["step"], key, a[key], b[key])


def test_logged_losses_and_perplexities_are_averaged_over_ranks(runs):
    """Every step's loss terms, learning rate, gradient norm and the validation perplexities, across the
    epoch boundary: the same whatever the split of the global batch."""
    _, folder = runs
    same_metrics(folder / "two_ranks", folder / "one_rank")
    same_metrics(folder / "accumulated", folder / "one_rank")
    two = metrics(folder / "two_ranks")
    assert sum("valid_ppl" in r for r in two) == 2 and sum("teacher_ppl" in r for r in two) == 3


def test_only_rank_zero_writes(runs):
    """Rank 1 ran with open/os.replace/os.makedirs guarded under --out (see DUMP_GRADS) and still
    finished; rank 0 wrote what a one-process run writes."""
    _, folder = runs
    assert sorted(os.listdir(folder / "two_ranks")) == sorted(os.listdir(folder / "one_rank"))
    assert checkpoints(folder / "two_ranks") == checkpoints(folder / "one_rank") == \
        ["step-00000005.pt", "step-00000010.pt"]


def test_stop_on_one_rank_stops_both_at_the_same_step_and_resumes_on_one(runs, tmp_path):
    """SIGTERM reaches rank 1 only (as when one node is pre-empted first) inside its 2nd step's update:
    the stop flag travels with the next step's all-reduce and is read one step late (train_step.StepCounters),
    so both ranks stop after step 4, rank 0 writes one
    checkpoint, and all exit 0. The run then continues on ONE process with batch 8 (the same global
    batch): re-sharded, it is still the same run."""
    base, folder = runs
    out = str(tmp_path / "out")
    stop = wrapper(tmp_path, "stop", STOP_AT_STEP)
    stopped = ok(run(flags(base, out=out, batch_size=4, save_every=100), script=stop, nproc=2,
                     env={"STOP_AFTER": "2", "STOP_RANK": "1"}))
    assert "rank 0 took 4 optimizer steps" in stopped.stdout and "rank 1 took 4 optimizer steps" in stopped.stdout
    assert stopped.stdout.count("stopped at step 4 as asked") == 1  # printed by rank 0 alone
    assert checkpoints(out) == ["step-00000004.pt"]

    resumed = ok(run(flags(base, out=out, batch_size=8, save_every=100, resume=True)))
    assert "step-00000004.pt at step 4" in resumed.stdout
    same_metrics(out, folder / "one_rank")
    mine, theirs = weights(out), weights(folder / "one_rank")
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=TOLERANCE, atol=TOLERANCE)


def test_a_failing_rank_brings_the_others_down(runs, tmp_path):
    """Rank 1 raises in its 3rd step while rank 0 waits for it in the next all-reduce: the run must end,
    non-zero and with rank 1's error in the output, well before any collective timeout (30 min)."""
    base, _ = runs
    fail = wrapper(tmp_path, "fail", """
        real_step, calls = torch.optim.AdamW.step, [0]
        def step(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 3 and os.environ["RANK"] == "1":
                raise RuntimeError("injected failure on rank 1 at step 3")
            return real_step(self, *args, **kwargs)
        torch.optim.AdamW.step = step
    """)
    start = time.time()
    proc = run(flags(base, out=str(tmp_path / "out"), batch_size=4, max_steps=50), script=fail, nproc=2,
               timeout=90)
    assert proc.returncode != 0
    assert time.time() - start < 60
    assert "injected failure on rank 1 at step 3" in proc.stdout + proc.stderr
