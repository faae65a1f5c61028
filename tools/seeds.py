"""Scores over seeds: run one train.py configuration with several --seed values and report the mean and
the sample standard deviation of each held-out score, so that "ahead" can be told from noise.

    python -m tools.seeds --seeds 0,1,2 --out runs/rt-distilled -- \
        --teacher runs/rt-teacher --train corpus/rotten-tomatoes/train.csv --valid corpus/rotten-tomatoes/valid.csv

Every flag after `--` (or any this script does not know) goes to train.py unchanged; the seed and the
output folder are the script's: seed N trains in OUT/seed-N (`--seed N --out OUT/seed-N`), its console
in OUT/seed-N.log. Each run's final held-out scores are the last record of its metrics.jsonl that holds
`valid_` scores (the teacher's `teacher_` scores, logged once per run, are reported beside them).
The table and OUT/seeds.json give, per score, the mean, the sample standard deviation (n - 1) and each
seed's value, and each run's wall time (start to exit of its train.py, on this machine, however loaded).

Resuming: a seed whose run finished (OUT/seed-N/seed.json, written when its train.py exited 0) is not
run again; its scores are read back. A run that was stopped continues from its checkpoint
(train.py --resume auto); its wall time is then that of the last part only, and seeds.json says so.
A run that fails stops the script with one line naming the seed, its exit status and its log.
Two invocations may share OUT (seeds run side by side): train.py's lock on OUT/seed-N keeps one run
per seed, and a seed's first record (seed.json) is never overwritten by a later one.

Standard library and numpy only: train.py runs as a subprocess (the Python running this script).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_seeds(text):
    """'0,1,2' -> [0, 1, 2]; exits with one line for anything else."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        sys.exit(f"error: --seeds {text!r}: give whole numbers separated by commas, e.g. --seeds 0,1,2")
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        sys.exit(f"error: --seeds {text!r}: give distinct seeds of 0 or more, e.g. --seeds 0,1,2")
    return seeds


def final_scores(run_dir, log):
    """{score: value} of a finished run: its last held-out record's valid_* and its teacher_* scores."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        sys.exit(f"error: {path} cannot be read ({e}); see {log}")
    held_out = [r for r in records if any(k.startswith("valid_") for k in r)]
    if not held_out:
        sys.exit(f"error: {path} holds no held-out scores; pass --valid to train.py (see {log})")
    scores = {}
    for record in records:  # the teacher's scores once per run; the newest wins
        scores.update({k: v for k, v in record.items() if k.startswith("teacher_") and isinstance(v, (int, float))})
    scores.update({k: v for k, v in held_out[-1].items() if k.startswith("valid_") and isinstance(v, (int, float))})
    return scores


def run_seed(seed, out, train_args):
    """Run (or resume, or skip when finished) seed `seed`: {"seed", "seconds", "resumed", "scores"}."""
    run_dir, log = os.path.join(out, f"seed-{seed}"), os.path.join(out, f"seed-{seed}.log")
    done = os.path.join(run_dir, "seed.json")
    command = [sys.executable, os.path.join(ROOT, "train.py"), *train_args, "--seed", str(seed),
               "--out", run_dir, "--resume", "auto"]
    if os.path.isfile(done):
        with open(done) as f:
            row = json.load(f)
        before = row.get("command", command)[2:]  # train.py's flags (not the Python or the path that ran them)
        if before != command[2:]:
            changed = sorted(set(before) ^ set(command[2:]))
            sys.exit(f"error: seed {seed}: {run_dir} finished with other train.py flags (differing: "
                     f"{' '.join(changed)[:200]}); give another --out, or delete {run_dir} to train it again")
        print(f"seed {seed}: finished before ({run_dir}), not run again")
    else:
        resumed = os.path.isdir(run_dir)
        print(f"seed {seed}: {'resuming' if resumed else 'training'} in {run_dir} (log {log})", flush=True)
        start = time.perf_counter()
        with open(log, "a") as f:
            status = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, cwd=os.getcwd())
        seconds = time.perf_counter() - start
        if status != 0:
            with open(log, errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
            last = lines[-1] if lines else "(empty)"
            sys.exit(f"error: seed {seed}: train.py exited with status {status}; its log {log} ends: {last}")
        row = {"seed": seed, "seconds": seconds, "resumed": resumed, "command": command}
        try:  # never over another invocation's record of the same run (it timed the whole of it)
            with open(done, "x") as f:
                json.dump(row, f, indent=1)
        except FileExistsError:
            with open(done) as f:
                row = json.load(f)
    row["scores"] = final_scores(run_dir, log)
    return row


def summarise(rows):
    """{score: {"mean", "std", "values"}} over the runs that have it; std is the sample one (n - 1)."""
    names = sorted(set().union(*(r["scores"] for r in rows)))
    summary = {}
    for name in names:
        values = [r["scores"][name] for r in rows if name in r["scores"]]
        a = np.asarray(values, dtype=np.float64)
        summary[name] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else None,
                         "values": values}
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="python -m tools.seeds --seeds 0,1,2 --out OUT -- TRAIN.PY FLAGS",
                                allow_abbrev=False)  # train.py's --seed is not an abbreviation of --seeds
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--out", required=True, help="folder: OUT/seed-N per seed, OUT/seeds.json")
    args, train_args = p.parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]
    for flag in ("--seed", "--out", "--resume"):
        if any(a == flag or a.startswith(flag + "=") for a in train_args):
            sys.exit(f"error: {flag} is this script's to set per seed; remove it from train.py's flags")
    seeds = parse_seeds(args.seeds)
    os.makedirs(args.out, exist_ok=True)
    rows = [run_seed(seed, args.out, train_args) for seed in seeds]
    summary = summarise(rows)
    result = {"seeds": seeds, "train_flags": train_args, "scores": summary,
              "runs": [{k: r[k] for k in ("seed", "seconds", "resumed")} for r in rows]}
    with open(os.path.join(args.out, "seeds.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n| score | mean | std (n-1) | {' | '.join(f'seed {s}' for s in seeds)} |")
    print("|---|---|---|" + "---|" * len(seeds))
    for name, s in summary.items():
        std = "-" if s["std"] is None else f"{s['std']:.4f}"
        print(f"| {name} | {s['mean']:.4f} | {std} | {' | '.join(f'{v:.4f}' for v in s['values'])} |")
    walls = ", ".join(f"seed {r['seed']} {r['seconds'] / 60:.1f} min{' (resumed)' if r['resumed'] else ''}"
                      for r in rows)
    print(f"\nwall time per run: {walls}; {args.out}/seeds.json")
    return result


if __name__ == "__main__":
    main()
