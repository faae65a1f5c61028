"""The device handling a GPU launcher exercises, checked on the CPU: the device string under launchers
that show each process one GPU, and the DataLoader's workers forked before the process group starts."""

import multiprocessing
from types import SimpleNamespace

import torch

import train


def test_local_rank_modulo_the_visible_devices(monkeypatch):
    """Slurm's srun with one GPU per task: LOCAL_RANK 3, one visible device -> cuda:0 (cuda:3 would fail)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("WORLD_SIZE", "16")
    rank, local_rank, world_size, device = train.setup_device(SimpleNamespace(device="cuda"))
    assert (rank, local_rank, world_size) == (11, 3, 16)
    assert device == torch.device("cuda:0") and chosen == [device]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # torchrun on an 8-GPU node: its own GPU
    assert train.setup_device(SimpleNamespace(device="cuda"))[3] == torch.device("cuda:3")


def test_the_workers_fork_before_the_models_move_and_the_process_group_starts(tiny_teacher, tiny_corpus, tmp_path,
                                                                              monkeypatch):
    """place_models moves the models to the device and starts NCCL: the workers must exist before."""
    alive_at_place_models = []
    real = train.place_models

    def place_models(*args, **kwargs):
        alive_at_place_models.append(len(multiprocessing.active_children()))
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "place_models", place_models)
    train.main(["--teacher", tiny_teacher, "--train", tiny_corpus[0], "--out", str(tmp_path / "run"), "--seq-len",
                "16", "--layers", "0,2", "--batch-size", "4", "--max-steps", "2", "--num-workers", "2",
                "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    assert alive_at_place_models == [2]
