"""tools/seeds.py (issue 23, item 3): one configuration over several seeds, mean and sample standard
deviation of the held-out scores, checked against each seed's own metrics.jsonl; a finished seed is
not run again; a failing run and bad --seeds are refused in one line."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from test_tasks import SINGLE, make_task_teacher, single_label_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seeds_cmd(*argv):
    return subprocess.run([sys.executable, "-m", "tools.seeds", *argv], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    teacher = make_task_teacher(str(root / "teacher"), SINGLE, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
    train, valid = single_label_csv(root / "train.csv", 64, 1), single_label_csv(root / "valid.csv", 16, 2)
    flags = ["--teacher", teacher, "--train", train, "--valid", valid, "--max-steps", "3", "--batch-size", "8",
             "--seq-len", "32", "--dtype", "fp32", "--no-progress", "--cache-dir", str(root / "cache")]
    return root, flags


def last_valid(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "valid_accuracy" in r][-1]


def test_two_seeds_mean_and_std_from_their_metrics_and_resume(task):
    root, flags = task
    out = str(root / "two")
    done = seeds_cmd("--seeds", "0,1", "--out", out, "--", *flags)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.load(open(os.path.join(out, "seeds.json")))
    assert result["seeds"] == [0, 1] and [r["seed"] for r in result["runs"]] == [0, 1]
    assert all(r["seconds"] > 0 and not r["resumed"] for r in result["runs"])
    finals = [last_valid(os.path.join(out, f"seed-{s}")) for s in (0, 1)]
    for name in ("valid_accuracy", "valid_macro_f1", "valid_agreement", "teacher_accuracy"):
        values = [r[name] for r in finals]
        got = result["scores"][name]
        assert got["values"] == values
        assert got["mean"] == pytest.approx(statistics.mean(values))
        assert got["std"] == pytest.approx(statistics.stdev(values))  # the sample (n - 1) one
    # each seed's own run: its run.json records the seed, and the two runs differ in what they learnt
    assert [json.load(open(os.path.join(out, f"seed-{s}", "run.json")))["seed"] for s in (0, 1)] == [0, 1]
    assert "| valid_accuracy |" in done.stdout
    # resume: both finished, nothing is trained again (the logs do not grow), the same summary
    logs = [open(os.path.join(out, f"seed-{s}.log")).read() for s in (0, 1)]
    again = seeds_cmd("--seeds", "0,1", "--out", out, "--", *flags)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("not run again") == 2
    assert [open(os.path.join(out, f"seed-{s}.log")).read() for s in (0, 1)] == logs
    assert json.load(open(os.path.join(out, "seeds.json")))["scores"] == result["scores"]
    # other flags into the same OUT: refused in one line, not answered with the old runs' scores
    other = seeds_cmd("--seeds", "0,1", "--out", out, "--", *[f if f != "3" else "4" for f in flags])
    assert other.returncode != 0 and "finished with other train.py flags" in other.stderr, other.stderr
    assert "(differing: 3 4)" in other.stderr, other.stderr  # --max-steps 3 then 4
    assert [open(os.path.join(out, f"seed-{s}.log")).read() for s in (0, 1)] == logs


def test_a_failing_run_names_its_seed_and_log(task):
    root, flags = task
    out = str(root / "fails")
    bad = [f if f != "3" else "0" for f in flags]  # --max-steps 0: train.py refuses it
    done = seeds_cmd("--seeds", "4", "--out", out, *bad)
    assert done.returncode != 0
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: seed 4:") and os.path.join(out, "seed-4.log") in line and "max-steps" in line
    assert not os.path.exists(os.path.join(out, "seeds.json"))


@pytest.mark.parametrize("argv,words", [(["--seeds", "0,x"], "whole numbers"), (["--seeds", "1,1"], "distinct"),
                                        (["--seeds", "0", "--seed", "3"], "--seed is this script's")])
def test_bad_input_is_one_line(tmp_path, argv, words):
    done = seeds_cmd(*argv, "--out", str(tmp_path / "o"), "--train", "x.csv")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and words in done.stderr
