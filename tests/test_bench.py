"""bench.py's --overhead and --train run (on the CPU, at tiny sizes) and print what they promise; the
peak table tells the H100 variants apart. Timings are printed, never asserted."""

import json
import re
import subprocess
import sys

import pytest
import torch

from tools import bench
from test_resume import ENV, ROOT

BENCH = ["-m", "tools.bench"]


def run_bench(*argv, nproc=1):
    launch = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(launch + [*BENCH, *argv], capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_overhead_prints_both_steps_and_their_ratio():
    out = run_bench("--overhead", "--steps", "2", "--warmup", "1", "--batch-size", "4", "--seq-len", "32",
                    "--device", "cpu", "--recompile-steps", "12")
    ours = float(re.search(r"train.py's step .*?([\d.]+) ms", out).group(1))
    minimal = float(re.search(r"minimal loop .*?([\d.]+) ms", out).group(1))
    ratio = float(re.search(r"ratio: ([\d.]+)x", out).group(1))  # of the unrounded times: the printed are rounded
    assert ratio == pytest.approx(ours / minimal, abs=0.006 + 0.05 * (1 / ours + 1 / minimal) * ours / minimal)
    assert "12-layer hidden-16 teacher -> 6 layers" in out
    # the compiled step: counted kernel calls, far fewer than the eager step's; no break, no recompilation
    eager = int(re.search(r"aten calls per optimizer step .*?: train.py's step (\d+)", out).group(1))
    compiled = int(re.search(r"kernel calls per optimizer step, compiled: (\d+)", out).group(1))
    assert 0 < compiled < eager / 3, out
    assert "0 graph breaks" in out and "0 recompilations over the next 11 steps" in out, out


@pytest.mark.parametrize("variant", ["ours-masked-padded", "ours-masked-grouped"])
def test_the_variants_that_build_their_own_batches_run(variant):
    """The unpacked variants pad or group their documents themselves: each times a step and prints its line."""
    out = run_bench("--variant", variant, "--steps", "1", "--warmup", "0", "--batch-size", "2", "--seq-len", "32",
                    "--device", "cpu")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["variant"] == variant and result["tokens_per_s"] > 0 and set(result["losses"]) == {"kd", "mlm", "cos"}


def check_train_report(out, nproc):
    loop = float(re.search(r"train.py's loop .*?: +([\d.]+) tokens/s per device", out).group(1))
    step = float(re.search(r"step benchmark .*?: +([\d.]+) tokens/s per device", out).group(1))
    assert f"{nproc} process(es)" in out and "steps 11-20" in out
    # the report divides the unrounded rates; the printed ones are rounded to whole tokens/s
    ratio = float(re.search(r"train.py's loop / step benchmark: ([\d.]+)", out).group(1))
    assert ratio == pytest.approx(loop / step, abs=0.006 + 0.5 * (1 / loop + 1 / step) * loop / step)


def test_train_times_train_py_beside_the_step_benchmark(tiny_teacher, tiny_corpus, tmp_path):
    out = run_bench("--train", "--teacher", tiny_teacher, "--corpus", tiny_corpus[0], "--steps", "10",
                    "--batch-size", "4", "--seq-len", "16", "--dtype", "fp32", "--device", "cpu",
                    "--cache-dir", str(tmp_path / "cache"), "--layers", "0,2", "--kd-on", "all")  # a train.py flag
    check_train_report(out, 1)
    assert "--kd-on all" in out


def test_train_under_torchrun(tiny_teacher, tiny_corpus, tmp_path):
    out = run_bench("--train", "--teacher", tiny_teacher, "--corpus", tiny_corpus[0], "--steps", "10",
                    "--batch-size", "2", "--seq-len", "16", "--dtype", "fp32", "--device", "cpu",
                    "--cache-dir", str(tmp_path / "cache"), "--layers", "0,2", nproc=2)
    check_train_report(out, 2)


def test_peak_table_tells_h100_variants_apart():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989  # SXM
    assert bench.peak_tflops("NVIDIA H100 PCIe", torch.bfloat16) == 756
    assert bench.peak_tflops("NVIDIA H100 NVL", torch.float16) == 835
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", torch.float32, tf32=False) == 19.5
    assert bench.peak_tflops("NVIDIA L40S", torch.bfloat16) == 362 and bench.peak_tflops("NVIDIA L4", torch.bfloat16) == 121
    assert bench.peak_tflops("Some Future GPU", torch.bfloat16) is None
