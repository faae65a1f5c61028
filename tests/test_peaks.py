"""tools/bench.py's card table: a card name matches whole words, the most specific name wins, and an
fp32 run with TF32 on is measured against the TF32 peak (issue 20)."""

import pytest
import torch

from tools import bench


@pytest.mark.parametrize("card, bf16, tf32, fp32", [
    ("NVIDIA L4", 121, 60, 30.3),
    ("NVIDIA L40", 181, 90.5, 90.5),  # not an L4
    ("NVIDIA L40S", 362, 183, 91.6),
    ("NVIDIA H200", 989, 494, 67),
    ("NVIDIA H200 NVL", 835, 418, 60),  # not an H200 SXM
    ("NVIDIA H100 80GB HBM3", 989, 494, 67),
    ("NVIDIA A10", 125, 62.5, 31.2),
    ("NVIDIA A100-SXM4-80GB", 312, 156, 19.5),
    ("Tesla V100-SXM2-16GB", 125, 15.7, 15.7),  # Volta has no TF32
])
def test_card_names_match_whole_words_and_tf32_has_its_own_peak(card, bf16, tf32, fp32):
    assert bench.peak_tflops(card, torch.bfloat16) == bf16
    assert bench.peak_tflops(card, torch.float32, tf32=True) == tf32
    assert bench.peak_tflops(card, torch.float32, tf32=False) == fp32


def test_an_unknown_variant_is_not_taken_for_a_known_card():
    assert bench.peak_tflops("NVIDIA A10G", torch.bfloat16) is None  # not an A10
    assert bench.peak_tflops("NVIDIA H1000", torch.bfloat16) is None


def test_gpu_check_without_a_gpu_says_so_in_one_line():
    import subprocess
    import sys
    from test_resume import ENV, ROOT
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "--gpu-check"], capture_output=True, text=True,
                          env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: --gpu-check needs a CUDA GPU (torch.cuda.is_available() is False here); run it on a GPU machine: "
        "python -m tools.bench --gpu-check"], proc.stderr


def test_gpu_check_table_rows():
    row = {"dtype": "bfloat16", "tokens_per_s": 250000.0, "ms_per_step": 16.4, "peak_mb": 9000.0, "mfu": 0.31,
           "peak_tflops": 989, "syncs_per_step": 1.0}
    table = bench.gpu_check_table([((32, 128), "eager", row), ((16, 512), "compiled", {"error": "boom\nOOM"})],
                                  "NVIDIA H100 80GB HBM3")
    lines = table.splitlines()
    assert lines[2].count("|") == lines[4].count("|") == 9
    assert lines[4] == "| 32 x 128 | eager | bfloat16 | 250000 | 16.4 | 31.0% of 989 | 9000 | 1.0 |"
    assert lines[5].startswith("| 16 x 512 | compiled | failed: ['OOM']")
