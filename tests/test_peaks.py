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
