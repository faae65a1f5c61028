"""Runs that survive a cluster: what a run needs when it spans several nodes and one may be lost.

- `split_global_batch`: --global-batch N fixes the sequences per optimizer step whatever the number
  of ranks; the micro-steps per step follow from it, so an elastic restart on fewer nodes is the
  same run at the same data position (data.py's order is a function of the global batch only).
- `check_shared_out`: every rank checks, before any work, that it sees the file rank 0 wrote in
  --out: rank 0 writes every checkpoint and every rank reads them back on resume.
- `process_group_options`: a collective timeout so that the ranks that survive a lost one end
  within about `--collective-timeout` seconds, and NCCL's asynchronous error handling, which turns
  that timeout into the end of the process (torchrun then restarts the group, --resume auto continues).
- `inductor_cache`: torch.compile's cache in a folder all nodes share, so a restarted group does not
  compile again.
- `file_lock`: an exclusive lock on a file that also works where the filesystem has no `flock`
  (some Lustre and NFS mounts), through `filelock`'s soft lock.
"""

import errno
import fcntl
import os
import secrets
import socket
from contextlib import contextmanager
from datetime import timedelta

# flock's errors on a filesystem that does not implement it (not: held by another process)
NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}


class ClusterError(ValueError):
    """A cluster set-up that cannot work: the message says why and what to do."""


def split_global_batch(global_batch, batch_size, world_size):
    """Micro-steps per optimizer step (--grad-accum) for `global_batch` sequences per step on
    `world_size` ranks of `batch_size` each. Raises ClusterError naming the rank counts that divide it."""
    per_rank, left = divmod(global_batch, batch_size * world_size)
    if left == 0 and per_rank >= 1:
        return per_rank
    if global_batch % batch_size:
        raise ClusterError(f"--global-batch {global_batch} is not a multiple of --batch-size {batch_size}; "
                           "choose a --batch-size that divides it")
    fits = [n for n in range(1, global_batch // batch_size + 1) if (global_batch // batch_size) % n == 0]
    raise ClusterError(f"--global-batch {global_batch} cannot be split over {world_size} ranks of --batch-size "
                       f"{batch_size}: the rank counts that divide it are {', '.join(map(str, fits))}; run on one "
                       "of those, or change --batch-size")


_STORES = []  # the stores opened here live as long as the process: rank 0's may serve init_process_group too


def rendezvous_store(rank, world_size, timeout_s=600):
    """The key-value store of torchrun's rendezvous (MASTER_ADDR:MASTER_PORT), open before the
    process group is: torchrun's agent's when it shares it, else the one rank 0 serves (multi-tenant,
    so init_process_group reuses it). None outside torchrun or in one process."""
    if world_size == 1 or "MASTER_ADDR" not in os.environ:
        return None
    import torch.distributed as dist
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent and rank == 0, timeout=timedelta(seconds=timeout_s),
                          multi_tenant=not agent)
    _STORES.append(dist.PrefixStore("bert-distil", store))
    return _STORES[-1]


def wait_for_ranks(what, rank, world_size, timeout_s=6 * 3600):
    """Every rank waits here until all have arrived, through the rendezvous store rather than a
    collective: before the process group starts (train.py: once the data is tokenized), a node that
    tokenizes for an hour keeps the others waiting here, not in init_process_group, which would give
    up after --collective-timeout. Does nothing without a store (see rendezvous_store)."""
    store = _STORES[-1] if _STORES else None
    if world_size == 1 or store is None:
        return
    store.set(f"{what}/{rank}", "1")
    store.wait([f"{what}/{r}" for r in range(world_size)], timedelta(seconds=timeout_s))


def check_restartable():
    """torchrun --max-restarts with the rendezvous store shared with the workers (torch's default) gives
    a restarted group the previous round's keys, and it cannot connect (pytorch/pytorch#135712): refuse
    that in one line, naming torch's own switch."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and \
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ClusterError("torchrun --max-restarts needs a rendezvous store per restart, or the restarted ranks "
                           "read the old round's addresses and cannot connect: launch torchrun with "
                           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment")


def check_shared_out(out_dir, rank, world_size, store=None):
    """Refuse, on every rank and before any work, an --out that is not one folder for all ranks.

    Rank 0 writes a random nonce to OUT/.nonce and publishes it through torchrun's store; every rank
    reads the file and reports what it saw; then rank 0 deletes it. A rank that sees another folder (a node-local disk) makes
    every rank raise the same ClusterError, naming the hosts that do not see it. Without a
    rendezvous store (one process, a launcher without MASTER_ADDR) nothing is checked."""
    store = store if store is not None else rendezvous_store(rank, world_size)
    if world_size == 1 or store is None:
        return
    path = os.path.join(out_dir, ".nonce")
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        nonce = secrets.token_hex(16)
        with open(path + ".tmp", "w") as f:
            f.write(nonce)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        store.set("nonce", nonce)
    nonce = store.get("nonce").decode()
    try:
        seen = open(path).read().strip() == nonce
    except OSError:
        seen = False
    store.set(f"seen/{rank}", "" if seen else socket.gethostname())
    store.wait([f"seen/{r}" for r in range(world_size)])
    blind = sorted({store.get(f"seen/{r}").decode() for r in range(world_size)} - {""})
    if rank == 0:  # every rank has looked: the file has done its work, and --out holds only the run's files
        os.remove(path)
    if blind:
        raise ClusterError(f"--out {out_dir} must be a folder all nodes share: rank 0 wrote {path}, which "
                           f"{', '.join(blind)} do{'es' if len(blind) == 1 else ''} not see; put --out on a "
                           "shared filesystem")


def process_group_options(timeout_s):
    """init_process_group's timeout, with NCCL's asynchronous error handling turned on (where the
    user has not set it): a rank left waiting in a collective for a rank that is gone gives up after
    `timeout_s` and its process ends, instead of hanging until torchrun's kill. On gloo a lost peer
    closes its connections, and the survivors fail at once."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # 1: abort the communicator, end the process
    return {"timeout": timedelta(seconds=timeout_s)}


def inductor_cache(out_dir):
    """Point torch.compile's (Inductor's) on-disk caches at OUT/inductor-cache, unless the user chose a
    folder with TORCHINDUCTOR_CACHE_DIR: a restarted group, on any node, finds the kernels and graphs
    it compiled before instead of compiling again. Returns the folder."""
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.abspath(out_dir), "inductor-cache"))


def _soft_lock(path, timeout):
    from filelock import SoftFileLock  # a dependency of transformers (huggingface_hub): always installed
    return SoftFileLock(path + ".soft", timeout=timeout)


@contextmanager
def file_lock(path, wait_s=-1):
    """Hold an exclusive lock on `path` inside the block: `flock`, or, on a filesystem without it,
    filelock's SoftFileLock on `path`.soft (an exclusively created marker file, which a process on
    the same host reclaims from a holder that died). After `wait_s` seconds (-1: forever) the block
    runs without the lock: callers only use it to avoid doing the same work twice, their writes are
    atomic renames of files with unique temporary names."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in NO_FLOCK:
                raise
        else:
            yield
            return
    from filelock import Timeout
    lock = _soft_lock(path, wait_s)
    try:
        lock.acquire()
    except Timeout:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def try_lock(path):
    """An exclusive lock on `path`, held while the returned object lives, or None when another
    process holds it. flock, or filelock's soft lock on a filesystem without flock (a holder on
    another host that died leaves its marker, `path`.soft: delete it once no run uses the folder)."""
    f = open(path, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f
    except BlockingIOError:
        f.close()
        return None
    except OSError as e:
        f.close()
        if e.errno not in NO_FLOCK:
            raise
    from filelock import Timeout
    lock = _soft_lock(path, 0)
    try:
        lock.acquire()
    except Timeout:
        return None
    return lock
