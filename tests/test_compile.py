"""torch.compile where the project uses it, on the CPU: the fallback to eager when no compiler works.

torch.compile compiles at the first call, not when torch.compile() returns: losses.compiled_or_eager
decides there, once, and falls back to the eager function with one warning line. A broken compiler
is made on purpose: CXX=/bin/false makes Inductor's C++ backend fail on a CPU (InvalidCxxCompiler),
with its caches off and empty so nothing compiled earlier is reused.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FALLBACK = """
import sys
import torch
import torch.nn.functional as F
sys.path.insert(0, {root!r})
import losses
from student import compile_layers
from transformers import BertConfig, BertForMaskedLM

torch.manual_seed(0)
# the KL block, compiled on this CPU as it is on a GPU, through kd_loss
losses.kl_block = losses.compiled_or_eager(losses._kl_block, "the KL block", devices=("cpu",), dynamic=True)
s, t = torch.randn(6, 50, requires_grad=True), torch.randn(6, 50)
for _ in range(3):  # decided at the first call, once: one warning, not one per call
    kd = losses.kd_loss(s, t, 2.0)
expected = 4.0 * F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="sum") / 6
torch.testing.assert_close(kd, expected)
kd.backward()
assert torch.isfinite(s.grad).all()
print("kl block:", "eager" if losses.kl_block.choice["fn"] is losses._kl_block else "compiled")

# the student's layers (train.py --compile): six layers, one line
model = BertForMaskedLM(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32)).eval()
ids = torch.randint(5, 30, (2, 8))
before = model(input_ids=ids).logits
compile_layers(model, lambda f: losses.compiled_or_eager(f, "the layers", devices=("cpu",)))
torch.testing.assert_close(model(input_ids=ids).logits, before)
print("done")
"""


def run_fallback(tmp_path, broken):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), TORCHINDUCTOR_FX_GRAPH_CACHE="0",
               TORCHINDUCTOR_AUTOGRAD_CACHE="0")
    if broken:
        env["CXX"] = "/bin/false"
    script = tmp_path / "fallback.py"
    script.write_text(FALLBACK.format(root=HERE))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)


def test_a_broken_compiler_falls_back_to_eager_with_one_line(tmp_path):
    result = run_fallback(tmp_path, broken=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kl block: eager" in result.stdout and "done" in result.stdout, result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: torch.compile")]
    assert len(warnings) == 2, result.stderr[-3000:]  # one for the KL block, one for all the layers
    assert "the KL block" in warnings[0] and "InvalidCxxCompiler" in warnings[0], warnings
    assert "the layers" in warnings[1], warnings
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_a_working_compiler_is_used(tmp_path):
    """The same script with the compiler left alone: the compiled block is kept, no warning."""
    result = run_fallback(tmp_path, broken=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kl block: compiled" in result.stdout, result.stdout
    assert "warning: torch.compile" not in result.stderr, result.stderr[-3000:]
