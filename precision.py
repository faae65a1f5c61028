"""The compute dtype: one table and one rule for `--dtype`, shared by train.py, evaluate.py and bench.py.

`--dtype auto` picks the faster of half precision and fp32 on the machine it runs on:
- a CUDA GPU: bf16 where the GPU multiplies it natively (Ampere and later), else fp16 with the
  gradient scaler (V100, T4);
- a CPU: bf16 only with AMX (Intel Sapphire Rapids and later: `amx_bf16` in /proc/cpuinfo), else fp32.

Why a CPU flag and not a short timing: AVX512-BF16 without AMX multiplies bf16 no faster than fp32
(issue 11: 62 vs 69 GFLOP/s on a 2048x384 @ 384x1536 product, whole runs 15% slower), while AMX
multiplies it several times faster (here: 140-272 vs 48-75 GFLOP/s on the same product), so the flag
separates the two cases. A timing of a few tens of ms would see the AMX gap too, but where the two
dtypes are within 10% of each other its verdict is noise: eight 15 ms timings on these shared cores
ranged over 1.6x in fp32 and 1.9x in bf16. And the dtype must not flip between a run and its
resumption on the same machine (a resume refuses a changed dtype: checkpoint.check_resumable).
"""

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_has_amx():
    """True if the CPU has AMX tiles for bf16 (Linux reports `amx_bf16` in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:  # not Linux: no way to tell, fp32 is the safe choice
        return False


def pick_dtype(name, device):
    """Resolve a --dtype value ("auto", "bf16", "fp16", "fp32") on `device` (a torch.device).

    Returns (name, reason): the resolved name, a key of DTYPES (never "auto"), and a few words
    saying why, for the run's first line ("dtype: bf16 (CPU with AMX)").
    """
    if name != "auto":
        return name, f"--dtype {name}"
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"--dtype auto on {gpu}"
        return "fp16", f"--dtype auto on {gpu}, which has no native bf16"
    if cpu_has_amx():
        return "bf16", "--dtype auto on a CPU with AMX"
    return "fp32", "--dtype auto on a CPU without AMX, where bf16 is no faster"


def autocast_for(device, dtype):
    """A function returning the autocast context of `dtype` (a torch dtype) on `device`; fp32: a no-op."""
    return lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
