"""Shared test fixtures: a tiny BERT teacher saved as a Hugging Face folder, and tiny corpora.

Everything is built from a config and a vocabulary written here, so the tests run offline.
"""

import os
import random
import sys

import pytest

# The modules under test sit at the repository root, one folder up: importable under a plain `pytest`
# too (`python -m pytest` adds the working directory itself).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the cat sat on a mat and dog ran to big red house in small green park with old man who saw "
         "bird fly over tree near river under blue sky every day because it was warm").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_bert_vocab(path, words=WORDS):
    vocab = SPECIAL + sorted(set(words)) + list("abcdefghijklmnopqrstuvwxyz.,") + \
        ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    with open(path, "w") as f:
        f.write("\n".join(vocab) + "\n")
    return vocab


def make_bert_teacher(folder, n_layers=4, hidden=32, heads=2, seed=0, max_positions=64, **config):
    """Save a tiny randomly initialised BertForMaskedLM and its tokenizer in `folder`."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab = write_bert_vocab(os.path.join(folder, "vocab.txt"))
    tokenizer = BertTokenizer(vocab=os.path.join(folder, "vocab.txt"))
    torch.manual_seed(seed)
    model = BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=n_layers,
                                       num_attention_heads=heads, intermediate_size=2 * hidden,
                                       max_position_embeddings=max_positions, **config))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_corpus(path, n_docs=300, min_words=5, max_words=40, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) + ".\n")
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """Folder of a 4-layer, hidden-32 BERT masked LM with its WordPiece tokenizer."""
    return make_bert_teacher(str(tmp_path_factory.mktemp("teacher")))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """(train.txt, valid.txt) of random sentences over the tiny vocabulary."""
    folder = tmp_path_factory.mktemp("corpus")
    return (write_corpus(str(folder / "train.txt"), 300, seed=1),
            write_corpus(str(folder / "valid.txt"), 40, seed=2))


@pytest.fixture(scope="session")
def tiny_teacher_no_dropout(tmp_path_factory):
    """The tiny teacher with dropout 0 (the student inherits it): runs that are compared are deterministic."""
    return make_bert_teacher(str(tmp_path_factory.mktemp("teacher_no_dropout")), hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)
