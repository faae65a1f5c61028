"""Downstream retention: fine-tune a teacher and its student on the same labelled data, with the same
budget, and report the student's score as a percentage of the teacher's (DistilBERT's "97% of BERT's
GLUE score" is this number, averaged over GLUE's tasks).

    python -m tools.retention --teacher teachers/minilm-l6-quick --student runs/quickstart \
        --task single_label_classification --train corpus/rotten-tomatoes/train.csv \
        --valid corpus/rotten-tomatoes/valid.csv --out runs/retention [train.py flags...]

Each model is fine-tuned by train.py (--task, no teacher: a fresh task head on its encoder, the
labels alone), with the same flags: steps, batch, learning rate, seed. Any flag this script does
not know goes to both runs. The table (and OUT/retention.json) gives each model's held-out score,
its parameters and its fine-tuning wall time.
"""

import argparse
import json
import math
import os
import sys
import time

import train
from heldout import PRIMARY


def final_scores(out_dir):
    """The last held-out scores a run logged (its metrics.jsonl's last record with valid_ keys)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if '"valid_' in line]
    if not records:
        sys.exit(f"error: {out_dir}/metrics.jsonl holds no held-out scores; did the run get --valid?")
    return {k[len("valid_"):]: v for k, v in records[-1].items() if k.startswith("valid_")}


def n_parameters(folder):
    """The parameters saved in a model folder (its safetensors files' tensor sizes)."""
    from safetensors import safe_open
    total = 0
    for name in (f for f in os.listdir(folder) if f.endswith(".safetensors")):
        with safe_open(os.path.join(folder, name), "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="the pre-trained teacher (e.g. the masked LM distilled from)")
    p.add_argument("--student", required=True, help="the pre-trained student (e.g. train.py's output)")
    p.add_argument("--task", required=True, help="the task, as train.py's --task")
    p.add_argument("--train", required=True)
    p.add_argument("--valid", required=True)
    p.add_argument("--out", required=True, help="folder: OUT/teacher, OUT/student, OUT/retention.json")
    args, extra = p.parse_known_args(argv)
    rows = {}
    for name, checkpoint in (("teacher", args.teacher), ("student", args.student)):
        out = os.path.join(args.out, name)
        start = time.perf_counter()
        train.main(["--task", args.task, "--student", checkpoint, "--train", args.train, "--valid", args.valid,
                    "--out", out, *extra])
        rows[name] = {"checkpoint": checkpoint, "scores": final_scores(out), "seconds": time.perf_counter() - start,
                      "parameters": n_parameters(out)}
    metric = PRIMARY[args.task]
    if metric not in rows["teacher"]["scores"]:  # token classification without IOB tags: word accuracy
        metric = "accuracy"
    teacher_score, student_score = rows["teacher"]["scores"][metric], rows["student"]["scores"][metric]
    retention = 100 * student_score / teacher_score if teacher_score else float("nan")
    result = {"metric": metric, "retention_percent": retention, "flags": extra, **rows}
    with open(os.path.join(args.out, "retention.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n| fine-tuned | {metric} | parameters | wall time |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} (`{row['checkpoint']}`) | {100 * row['scores'][metric]:.2f} | "
              f"{row['parameters'] / 1e6:.1f}M | {row['seconds'] / 60:.1f} min |")
    print(f"\nthe student keeps {retention:.1f}% of the teacher's {metric}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (train.StudentError, train.DataError, train.CheckpointError) as e:
        sys.exit(f"error: {e}")
