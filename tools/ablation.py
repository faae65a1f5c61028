"""DistilBERT's ablation (Sanh et al. 2019, Table 4) in miniature: one student, one change per row.

    python -m tools.make_teacher     # once: the teacher, teachers/minilm-l6-mlm
    python -m tools.ablation         # the table: about an hour on 2 CPU cores

Every row trains the same 3-layer student (layers 0, 2, 5 of the 6-layer teacher) with train.py, on
the same batches (same seed), for the same number of steps, changing one thing: a loss switched
off, the initialisation, or the positions KD reads. Each student is then scored by heldout.py on
the held-out corpus with fixed masks: masked-LM perplexity, and how often its top-1 prediction at a
masked position is the teacher's. The last row trains the default (--kd-on masked, cheaper per
step) for as long, in wall time, as the --kd-on all row took: the better student per second.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch
import transformers

from data import make_sequences
from token_cache import default_cache_dir, load_corpus
from heldout import masked_lm_sums, perplexity, valid_batches
from pretrained import load_teacher, load_tokenizer

ROWS = [  # (name, flags that differ from the full recipe)
    ("full recipe (KD 5, MLM 2, cos 1), --kd-on masked", []),
    ("full recipe, --kd-on all", ["--kd-on", "all"]),
    ("without KD", ["--alpha-kd", "0"]),
    ("without MLM", ["--alpha-mlm", "0"]),
    ("without cosine", ["--alpha-cos", "0"]),
    ("random initialisation, full recipe", ["--student-init", "random"]),
    ("MLM only: teacher's layers, no teacher (a small BERT)", ["--alpha-kd", "0", "--alpha-cos", "0"]),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="teachers/minilm-l6-mlm")
    p.add_argument("--train", default="corpus/train.txt")
    p.add_argument("--valid", default="corpus/valid.txt")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--layers", default="0,2,5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", help="comma-separated row numbers to run (default: all, then the equal-time row)")
    args = p.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    # No --valid for the runs themselves: each student is scored here afterwards, with the same masks.
    common = ["--teacher", args.teacher, "--train", args.train, "--layers", args.layers,
              "--seq-len", "128", "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--seed", str(args.seed), "--eval-every", "1000000", "--save-every", "1000000", "--keep", "1",
              "--no-progress"]
    rows = list(enumerate(ROWS))
    if args.rows:
        rows = [rows[int(i)] for i in args.rows.split(",")]

    teacher = load_teacher(args.teacher)
    tokenizer = load_tokenizer(teacher, args.teacher)
    seqs = make_sequences(load_corpus(args.valid, tokenizer, default_cache_dir(), progress=False), 128)
    results = []
    teacher_sums = masked_lm_sums(teacher, valid_batches(seqs, tokenizer, 64), torch.device("cpu"))
    results.append({"row": "the teacher (6 layers)", "ppl": perplexity(*teacher_sums[:2].tolist()),
                    "agreement": 1.0, "seconds": None, "steps": None})
    times = {}
    for i, (name, flags) in rows:
        out = os.path.join(args.out, f"row{i}")
        results.append(run_row(name, common + flags + ["--max-steps", str(args.steps), "--out", out],
                               out, teacher, tokenizer, seqs, args.steps))
        times[i] = results[-1]["seconds"]
    if not args.rows and 0 in times and 1 in times:  # row 0's recipe, given row 1's wall time
        steps = round(args.steps * times[1] / times[0])
        out = os.path.join(args.out, "equal-time")
        results.append(run_row(f"full recipe, --kd-on masked, {steps} steps (the wall time of --kd-on all)",
                               common + ["--max-steps", str(steps), "--out", out], out, teacher, tokenizer, seqs,
                               steps))
    print_table(results, args)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


def run_row(name, flags, out, teacher, tokenizer, seqs, steps):
    """Train one student with train.py (its own process), then score it against the teacher."""
    if os.path.exists(out):
        shutil.rmtree(out)
    print(f"== {name}", file=sys.stderr, flush=True)
    start = time.time()
    subprocess.run([sys.executable, "train.py", *flags], check=True)
    seconds = time.time() - start
    student = load_teacher(out)  # loads a masked LM frozen in eval mode: what we need to score it
    sums = masked_lm_sums(student, valid_batches(seqs, tokenizer, 64), torch.device("cpu"), teacher=teacher)
    return {"row": name, "ppl": perplexity(*sums[:2].tolist()), "agreement": (sums[2] / sums[1]).item(),
            "seconds": seconds, "steps": steps}


def print_table(results, args):
    print("\n| variant | steps | held-out MLM perplexity | top-1 agreement with the teacher | wall time |")
    print("|---|---|---|---|---|")
    for r in results:
        wall = f"{r['seconds'] / 60:.1f} min" if r["seconds"] else "-"
        print(f"| {r['row']} | {r['steps'] or '-'} | {r['ppl']:.2f} | {100 * r['agreement']:.1f}% | {wall} |")


if __name__ == "__main__":
    main()
