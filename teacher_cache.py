"""The task teacher's logits for every training record (and every --augment rewrite), computed in one
pass before training and read from disk by the step instead of a teacher forward (--teacher-cache).

A task run whose losses read only the teacher's logits (KD and MSE on the task's logits: DistilBERT
(D)'s recipe, TinyBERT's prediction-layer stage) runs the teacher forward on every record once per
epoch; its logits are the same every time (the teacher is in eval mode: no dropout), so one pass is
enough. The cache is one .npy file beside the token cache, memory-mapped read-only:

    sequence tasks:        (records, num_labels), row i = record i's logits
    token classification:  (tokens, num_labels), aligned with Examples.input_ids (every token's row;
                           the step reads each word's first piece)

stored in the run's compute dtype (fp32: float32; fp16: float16; bf16: its bits as int16, numpy
having no bfloat16), so that the step reads what a live teacher under the same autocast would give.
The losses then equal the live teacher's to the dtype's rounding (the padding of the cache's batches
is not the training batches', so the last bits can differ); tests/test_augment.py checks it in fp32.

The key (logits_key) is what the logits are a function of: the teacher's weights and config
(model_digest, a hash of every tensor's bytes), the records' token ids, lengths and segments (so a
change of data, tokenizer or --seq-len that changes any token is another cache), the compute dtype and
the number of labels. Batches carry the gathered rows: TaskBatches calls TeacherLogits.at on the host
(in the DataLoader's worker) and the batch holds "teacher_logits" (kd rows, num_labels), which
tasks.task_step reads instead of running the teacher; no indexing happens on the device.

Not for losses that read the teacher's hidden states or attention (--alpha-cos/-hidden/-attn/-relation:
refused in one line; those are (tokens x hidden) per layer, recomputed live), nor for masked-LM runs
(docs/tasks.md#teacher-outputs-computed-once says why).
"""

import hashlib
import json
import os

import numpy as np
import torch
from tqdm import tqdm

from distil import prepared_mask
from precision import DTYPES, pick_dtype
from cluster import file_lock
from token_cache import LOCK_WAIT_S, DataError, unique_tmp

CACHE_VERSION = 1
# how each compute dtype is stored: numpy has no bfloat16, so bf16 logits keep their 16 bits as int16
STORED = {"fp32": np.float32, "fp16": np.float16, "bf16": np.int16}


def model_digest(model):
    """sha256 (hex) of a model's config and every tensor of its state_dict (names, dtypes, shapes and
    bytes): the same weights give the same digest wherever the folder is; any changed weight, another.
    Hashing reads each tensor once (about 0.5 s for bert-base's 440 MB)."""
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name} {flat.dtype} {tuple(tensor.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_teacher_cache(args, kind, teacher):
    """Refuse --teacher-cache, in one line, where cached logits cannot replace the teacher: a masked-LM
    or sentence-embedding run, fine-tuning without a teacher, a recipe that reads the teacher's hidden
    states or attention (--alpha-cos/-hidden/-attn/-relation > 0), or one that reads no logits at all."""
    if not getattr(args, "teacher_cache", False):
        return
    if kind is None or kind == "embedding":
        raise DataError("--teacher-cache stores a task teacher's logits; a masked-LM or sentence-embedding teacher's "
                        "outputs are not cached (docs/tasks.md#teacher-outputs-computed-once says why): drop it")
    if teacher is None:
        raise DataError("--teacher-cache: --task fine-tunes without a teacher, there are no teacher logits: drop it")
    hidden = [f"--alpha-{k}" for k in ("cos", "hidden", "attn", "relation") if getattr(args, f"alpha_{k}") > 0]
    if hidden:
        raise DataError(f"--teacher-cache stores the teacher's logits only, and {', '.join(hidden)} read its hidden "
                        "states or attention, computed live every step: drop --teacher-cache, or those losses")
    if not args.alpha_kd and not args.alpha_mse:
        raise DataError("--teacher-cache: no loss reads the teacher's logits (--alpha-kd and --alpha-mse are 0): drop it")


def logits_key(teacher_digest, examples, dtype_name, num_labels):
    """The cache key: the teacher (model_digest), the records' tokens (ids, lengths, segments), the task
    kind, the compute dtype and the number of labels."""
    h = hashlib.sha256(teacher_digest.encode())
    for array in (examples.input_ids, examples.lengths, examples.token_type_ids):
        if array is not None:
            h.update(np.ascontiguousarray(array).tobytes())
    h.update(json.dumps([CACHE_VERSION, examples.kind, dtype_name, num_labels]).encode())
    return h.hexdigest()[:20]


def _stored(logits, dtype_name):
    """Logits (device tensor) as the cache stores them (numpy, STORED[dtype_name])."""
    logits = logits.detach()
    if dtype_name == "bf16":
        return logits.to(torch.bfloat16).view(torch.int16).cpu().numpy()
    return logits.to(torch.float16 if dtype_name == "fp16" else torch.float32).cpu().numpy()


def as_logits(cached):
    """A batch's "teacher_logits" tensor as logits: bf16 ones arrive as their int16 bits."""
    return cached.view(torch.bfloat16) if cached.dtype == torch.int16 else cached


@torch.no_grad()
def compute_logits(teacher, examples, pad_id, dtype_name, device, autocast, path, batch_size=32, progress=False):
    """Write the teacher's logits of every record of `examples` to `path` (.npy, the module's layout).

    The teacher runs as train.place_models leaves it (on `device`, its weights in the compute dtype
    unless fp32) and as tasks.task_step calls it (the same inputs and mask, under `autocast`), in
    length-sorted batches of `batch_size` records. Written to a temporary file, then renamed: the
    cache is complete or absent."""
    from tasks import task_batch
    teacher.to(device)
    if dtype_name != "fp32":
        teacher.to(DTYPES[dtype_name])
    token = examples.kind == "token_classification"
    rows = len(examples.input_ids) if token else len(examples.starts)
    tmp = unique_tmp(path) + ".npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=STORED[dtype_name],
                                    shape=(rows, teacher.config.num_labels))
    order = np.argsort(examples.lengths, kind="stable")
    for b in tqdm(range(0, len(order), batch_size), desc="teacher logits", disable=not progress, dynamic_ncols=True):
        idx = order[b:b + batch_size]
        batch = task_batch(examples, idx, pad_id)
        inputs = {"input_ids": torch.as_tensor(batch["input_ids"], device=device)}
        if "token_type_ids" in batch:
            inputs["token_type_ids"] = torch.as_tensor(batch["token_type_ids"], device=device)
        mask = torch.as_tensor(batch["attention_mask"], device=device) if batch["padded"] else None
        with autocast():
            logits = teacher(**inputs, attention_mask=prepared_mask(teacher, mask)).logits
        stored = _stored(logits, dtype_name)
        if token:
            for r, i in enumerate(idx):
                out[examples.starts[i]:examples.starts[i] + examples.lengths[i]] = stored[r, :examples.lengths[i]]
        else:
            out[idx] = stored
    out.flush()
    del out
    os.replace(tmp, path)


class TeacherLogits:
    """The cached logits of one run's training examples, memory-mapped read-only on first use in each
    process (a DataLoader worker maps the file itself: pickling sends the path, not the array)."""

    def __init__(self, path, kind):
        self.path, self.kind, self._array = path, kind, None

    def __getstate__(self):
        return {"path": self.path, "kind": self.kind, "_array": None}

    def array(self):
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def at(self, examples, indices):
        """The teacher's logits at a batch's KD rows, in task_rows' order: numpy (rows, num_labels) in the
        stored dtype. Sequence tasks: one row per record of `indices`; token classification: each word's
        first piece (Examples.word_mask), record by record, position by position."""
        array = self.array()
        if self.kind != "token_classification":
            return np.asarray(array[np.asarray(indices)])
        rows = [examples.starts[i] + np.flatnonzero(examples.word_mask[examples.starts[i]:examples.starts[i]
                                                                       + examples.lengths[i]]) for i in indices]
        return np.asarray(array[np.concatenate(rows)])


def teacher_logits_for_run(args, teacher, examples, pad_id, device, autocast, master):
    """--teacher-cache's TeacherLogits for the run's training examples (rewrites included): from the
    cache under --cache-dir when it is there, else computed (compute_logits) and written. Under
    torchrun every rank calls this before the process group starts: the first computes the logits while
    the others wait on the lock, then every rank maps the file and reads its own rows."""
    dtype_name = pick_dtype(args.dtype, device)[0]
    key = logits_key(model_digest(teacher), examples, dtype_name, teacher.config.num_labels)
    name = os.path.basename(str(args.train).rstrip("/"))
    os.makedirs(args.cache_dir, exist_ok=True)
    path = os.path.join(args.cache_dir, f"{name}.logits.{key}.npy")
    with file_lock(path + ".lock", wait_s=LOCK_WAIT_S):  # flock, or a soft lock where the filesystem has none
        made = not os.path.exists(path)
        if made:
            compute_logits(teacher, examples, pad_id, dtype_name, device, autocast, path, args.batch_size,
                           master and args.progress)
    if master:
        size = os.path.getsize(path) / 1e6
        print(f"--teacher-cache: the teacher's logits of {len(examples.starts)} records {'computed once into' if made else 'read from'} "
              f"{path} ({size:.1f} MB, {dtype_name}); the step reads them instead of running the teacher")
    return TeacherLogits(path, examples.kind)
