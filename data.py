"""Token ids in, masked batches out: BERT's masking, sequences, batches for each rank.

The pipeline, top to bottom (the ids come from token_cache.load_corpus):
1. `mask_tokens` applies BERT's dynamic masking to each batch: 15% of the tokens, 80/10/10.
2. `make_sequences` cuts the ids into sequences of at most seq_len - 2 tokens (room for the
   tokenizer's own [CLS]/<s> and [SEP]/</s>): packed across documents by default, so no compute
   goes to padding (RoBERTa's FULL-SENTENCES), or one document per sequence with `pack=False`.
3. `epoch_batches` orders, shards and batches the sequences for one rank and one epoch;
   `make_batch` collates and masks one batch, and says on the host where each loss reads it.
4. `MicroBatches` and `micro_batch_loader` build the batches in DataLoader workers, ahead of the
   loop; `to_device` moves one to the GPU without making the host wait.

Everything random here is a pure function of (seed, epoch, sequence index): the order of an
epoch, and each sequence's mask. No global RNG, rank or worker enters, so a resumed run, or the
same data on another number of GPUs, sees the same masks.
"""

import sys
from dataclasses import dataclass

import numpy as np
import torch

from distil import batch_rows  # where each loss reads a batch: the step's contract, computed here on the host
from token_cache import DataError, token_counts


# ---------------------------------------------------------------------------------------------
# 1. BERT's dynamic masking
# ---------------------------------------------------------------------------------------------

@dataclass
class MaskSpec:
    mask_id: int
    special_ids: np.ndarray        # never masked, never drawn as the random replacement
    random_ids: np.ndarray         # candidates for the "random token" replacement
    weights: np.ndarray | None     # per-id weight of being chosen (mlm smoothing), or None: uniform
    prob: float = 0.15


def mask_spec(tokenizer, corpus=None, smoothing=0.0, prob=0.15):
    """What mask_tokens needs: the [MASK] id, the ids never masked, the random replacements and, with
    smoothing > 0, each id's weight count^-smoothing from the corpus's token counts (token_counts:
    counted once per cache, in chunks, so that no rank ever holds the corpus as int64)."""
    special = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    random_ids = np.setdiff1d(np.arange(len(tokenizer)), special)
    weights = None
    if smoothing > 0:
        # XLM / DistilBERT: a token's chance to be masked ~ count^-smoothing, so frequent
        # tokens (the, of, punctuation) are masked less and rare ones more.
        counts = token_counts(corpus, len(tokenizer))
        weights = np.maximum(counts, 1).astype(np.float64) ** -smoothing
    return MaskSpec(tokenizer.mask_token_id, special, random_ids, weights, prob)


def mask_tokens(input_ids, attention_mask, seq_ids, seed, epoch, spec):
    """BERT's masking: choose 15% of the non-special tokens, then 80% [MASK], 10% random, 10% kept.

    Returns (masked input_ids, labels) with labels = -100 where nothing is predicted. A sequence's
    mask depends only on (seed, epoch, its index) and its own tokens, never on the batch it sits
    in. Each sequence masks round(15% x its maskable tokens) positions (rounded at random so the
    rate is exact on average), drawn without replacement, uniformly or by `spec.weights`.
    """
    input_ids = input_ids.copy()
    labels = np.full_like(input_ids, -100)
    for row, seq_id in enumerate(seq_ids):
        n = int(attention_mask[row].sum())
        ids = input_ids[row, :n]
        rng = np.random.default_rng([seed, epoch, int(seq_id)])
        u_count, u_pick, u_action, u_token = rng.random(1), rng.random(n), rng.random(n), rng.random(n)
        maskable = ~np.isin(ids, spec.special_ids)
        k = int(np.floor(spec.prob * maskable.sum() + u_count[0]))
        if k == 0:
            continue
        # Gumbel top-k: the k largest of log(w) + Gumbel noise are a weighted draw without replacement
        weights = spec.weights[ids] if spec.weights is not None else np.ones(n)
        keys = np.where(maskable, np.log(weights) - np.log(-np.log(u_pick + 1e-12) + 1e-12), -np.inf)
        chosen = np.argsort(-keys, kind="stable")[:k]
        labels[row, chosen] = ids[chosen]
        action = u_action[chosen]
        ids[chosen[action < 0.8]] = spec.mask_id
        random_pos = chosen[(action >= 0.8) & (action < 0.9)]
        ids[random_pos] = spec.random_ids[(u_token[random_pos] * len(spec.random_ids)).astype(np.int64)]
    return input_ids, labels


# ---------------------------------------------------------------------------------------------
# 2. Sequences
# ---------------------------------------------------------------------------------------------

@dataclass
class Sequences:
    tokens: np.ndarray   # the corpus ids (memory-mapped)
    starts: np.ndarray   # int64, where each sequence's content starts in tokens
    lengths: np.ndarray  # int64, its content length (without the two special tokens)


def make_sequences(corpus, seq_len, pack=True):
    """Cut the corpus into sequences of at most seq_len tokens, [CLS] and [SEP] included.

    pack=True: consecutive windows over the whole stream, documents separated by [SEP], so every
    sequence but the last is full. pack=False: one document per sequence, long documents split
    into several.
    """
    content = seq_len - 2
    if content < 1:
        raise DataError(f"--seq-len {seq_len} leaves no room for text; use at least 8")
    if pack:
        starts = np.arange(0, len(corpus.tokens), content, dtype=np.int64)
        return Sequences(corpus.tokens, starts, np.minimum(content, len(corpus.tokens) - starts))
    doc_len = np.diff(corpus.doc_starts) - 1  # without the document's trailing separator
    pieces = -(-doc_len // content)
    doc = np.repeat(np.arange(len(doc_len)), pieces)
    piece = np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    starts = corpus.doc_starts[doc] + piece * content
    return Sequences(corpus.tokens, starts, np.minimum(content, doc_len[doc] - piece * content))


def collate(seqs, indices, tokenizer, max_length=None):
    """Sequences `indices` as (input_ids, attention_mask), padded only to the longest of them (or,
    given the run's max_length, to static_length's bucket)."""
    lengths = seqs.lengths[indices] + 2
    width = lengths.max() if max_length is None else static_length(lengths.max(), max_length)
    input_ids = np.full((len(indices), width), tokenizer.pad_token_id, dtype=np.int64)
    attention_mask = np.zeros_like(input_ids)
    for row, (i, n) in enumerate(zip(indices, lengths)):
        input_ids[row, 0] = tokenizer.cls_token_id
        input_ids[row, 1:n - 1] = seqs.tokens[seqs.starts[i]:seqs.starts[i] + n - 2]
        input_ids[row, n - 1] = tokenizer.sep_token_id
        attention_mask[row, :n] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------
# 3. Batches, sharded over ranks
# ---------------------------------------------------------------------------------------------

def batches_per_epoch(n_seqs, batch_size, world_size):
    """Full batches each rank gets per epoch (the tail that would make batches uneven is dropped)."""
    return n_seqs // world_size // batch_size


def epoch_batches(seqs, batch_size, seed, epoch, rank=0, world_size=1, group_by_length=False):
    """The list of sequence-index batches of one rank for one epoch.

    The epoch's order is a permutation seeded by (seed, epoch); rank r takes every world_size-th
    entry from r, so the b first sequences of every rank together are the world_size*b first
    sequences of the order: one rank with batch 2b sees the same global batch as two ranks with
    batch b. With group_by_length (for unpacked data), the rank's sequences are sorted by length
    within groups of 50 batches and the batches shuffled, so padding is small.
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(seqs.starts))
    n_batches = batches_per_epoch(len(order), batch_size, world_size)
    mine = order[rank::world_size][:n_batches * batch_size]
    if group_by_length:
        group = 50 * batch_size
        mine = np.concatenate([g[np.argsort(seqs.lengths[g], kind="stable")]
                               for g in np.split(mine, range(group, len(mine), group))])
        batches = mine.reshape(n_batches, batch_size)
        return list(batches[np.random.default_rng([seed, epoch, rank]).permutation(n_batches)])
    return list(mine.reshape(n_batches, batch_size))


def make_batch(seqs, indices, tokenizer, spec, seed, epoch, max_length=None):
    """The tensors-to-be of one batch, as numpy arrays: input_ids, attention_mask and labels (B, L),
    and where each loss reads them (distil.batch_rows: flat int64 indices of the real and the
    masked positions, the labels there, and whether anything is padded), so that the training
    step never has to find them on the device. `max_length` (the run's --seq-len, for a compiled
    step): the shapes are static_length's and masked_size's, the same from batch to batch."""
    input_ids, attention_mask = collate(seqs, indices, tokenizer, max_length)
    input_ids, labels = mask_tokens(input_ids, attention_mask, indices, seed, epoch, spec)
    size = None if max_length is None else masked_size(input_ids.shape, spec.prob)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            **batch_rows(attention_mask, labels, size)}


# A compiled step runs one graph per shape: its batches keep few shapes. A padded batch's length is
# rounded up to a multiple of 64 (at most --seq-len: 2 lengths at 128, 8 at 512), and the masked rows
# are padded to the most that mask_tokens can choose in a batch of that shape, with rows that weigh
# zero (distil.batch_rows), so a graph compiled for a shape serves every later batch of it.

def static_length(length, max_length, multiple=64):
    """A padded batch's length for a compiled step: its longest sequence `length` rounded up to a
    multiple of `multiple`, at most max_length (a longer batch keeps its own length)."""
    return max(length, min(max_length, -(-length // multiple) * multiple))


def masked_size(shape, prob):
    """The most positions mask_tokens masks in a (B, L) batch: each sequence masks
    floor(prob * maskable + u) of at most L positions, u < 1, so at most floor(prob * L) + 1."""
    batch_size, length = shape
    return batch_size * (int(np.floor(prob * length)) + 1)


def to_device(batch, device):
    """A batch's arrays as tensors on `device` (through pinned memory on a GPU, so the copy is
    asynchronous; a DataLoader with pin_memory=True has pinned them already); plain Python values
    (the `padded` flag) stay as they are."""
    device = torch.device(device)

    def move(value):
        if not isinstance(value, (np.ndarray, torch.Tensor)):
            return value
        value = torch.as_tensor(value)
        if device.type == "cuda" and not value.is_pinned():
            value = value.pin_memory()
        return value.to(device, non_blocking=True)
    return {k: move(v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# 4. Batches off the critical path: DataLoader workers
# ---------------------------------------------------------------------------------------------

class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch number m of one rank's run, counted across epochs: a pure function of m.

    Item m is batch m % n_batches of epoch m // n_batches (epoch_batches), collated and masked
    (make_batch). A DataLoader then builds the batches in worker processes, ahead of the loop,
    and the order and content do not depend on the number of workers.
    """

    def __init__(self, seqs, tokenizer, spec, batch_size, seed, n_batches, rank=0, world_size=1,
                 group_by_length=False, max_length=None):
        self.seqs, self.tokenizer, self.spec, self.seed = seqs, tokenizer, spec, seed
        self.batch_size, self.n_batches, self.rank, self.world_size = batch_size, n_batches, rank, world_size
        self.group_by_length, self.max_length = group_by_length, max_length  # max_length: static shapes
        self._epoch = self._batches = None  # the last epoch's order, cached per process

    def __getitem__(self, m):
        epoch, i = divmod(m, self.n_batches)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.seqs, self.batch_size, self.seed, epoch, self.rank,
                                                              self.world_size, self.group_by_length)
        return make_batch(self.seqs, self._batches[i], self.tokenizer, self.spec, self.seed, epoch, self.max_length)


def micro_batch_loader(dataset, start, stop, num_workers=0, pin_memory=False):
    """Micro-batches start, start + 1, ..., stop - 1 of `dataset`, in order, as CPU tensors.

    num_workers > 0 builds them in that many processes, up to 4 batches each ahead of the loop;
    pin_memory (on a GPU) puts them in page-locked memory, so that .to(device, non_blocking=True)
    copies them while the GPU computes.
    """
    # fork, where there is one: a worker then shares the memory-mapped corpus with its parent, where a
    # spawned one (Python 3.14's default on Linux is forkserver) would be sent a pickled copy of it.
    context = "fork" if num_workers and sys.platform != "win32" else None
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, stop), num_workers=num_workers,
                                       pin_memory=pin_memory, prefetch_factor=4 if num_workers else None,
                                       multiprocessing_context=context)
