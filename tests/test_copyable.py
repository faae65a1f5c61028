"""The README offers losses.py, student.py, pretrained.py (with student.py beside it) and distil.py (with
losses.py beside it) for copying into
another codebase. Each is copied here into an empty folder and used there, in a fresh Python whose
sys.path holds that folder and the installed packages only: an import of another project module
fails the test.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run first in every script: prove that the project is out of reach and the copies are what is imported.
PREAMBLE = """
import os, sys
here = os.path.dirname(os.path.abspath(__file__))
assert not any(os.path.isfile(os.path.join(p or os.getcwd(), "train.py")) for p in sys.path), sys.path
"""

# losses.py alone: each loss against its definition written out with plain torch.
USE_LOSSES = """
import torch
import torch.nn.functional as F
import losses
assert os.path.dirname(losses.__file__) == here
torch.manual_seed(0)
s, t = torch.randn(6, 50), torch.randn(6, 50)
T = 2.0
expected = T ** 2 * F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                             reduction="sum") / 6
torch.testing.assert_close(losses.kd_loss(s, t, T), expected)
labels = torch.randint(0, 50, (6,))
torch.testing.assert_close(losses.mlm_loss(s, labels), F.cross_entropy(s, labels))
h1, h2 = torch.randn(6, 8), torch.randn(6, 8)
torch.testing.assert_close(losses.cosine_loss(h1, h2), (1 - F.cosine_similarity(h1, h2, dim=-1)).mean())
torch.testing.assert_close(losses.hidden_mse_loss(h1, h2), ((h1 - h2) ** 2).mean(-1).mean())
print("ok")
"""

# student.py alone: a tiny BERT from a config, a student of two of its layers, saved and reloaded.
# pretrained.py with it: the same student saved by save_student (checked on reload) and loaded as a teacher.
USE_STUDENT = """
import torch
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM, BertTokenizer
import student
assert os.path.dirname(student.__file__) == here
with open("vocab.txt", "w") as f:
    f.write("\\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat"]) + "\\n")
tokenizer = BertTokenizer(vocab="vocab.txt")
assert len(tokenizer) == 10
torch.manual_seed(0)
teacher = BertForMaskedLM(BertConfig(vocab_size=10, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)).eval()
s = student.make_student(teacher, [0, 2]).eval()
assert len(student.encoder_layers(s)) == 2
for k, i in enumerate([0, 2]):
    for a, b in zip(student.encoder_layers(s)[k].parameters(), student.encoder_layers(teacher)[i].parameters()):
        assert torch.equal(a, b)
SAVE
reloaded = AutoModelForMaskedLM.from_pretrained("out").eval()
ids = torch.tensor([tokenizer("the cat sat on the mat")["input_ids"]])
with torch.no_grad():
    torch.testing.assert_close(reloaded(input_ids=ids).logits, s(input_ids=ids).logits, rtol=0, atol=0)
print("ok")
"""

# distil.py with losses.py: every loss on, attention and relation losses included (they capture the
# attention internals of chosen layers, which is what once imported student.py).
USE_DISTIL = """
import copy
import torch
from transformers import BertConfig, BertForMaskedLM
import distil
assert os.path.dirname(distil.__file__) == here
torch.manual_seed(0)
config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=32)
teacher = BertForMaskedLM(config).eval().requires_grad_(False)
small = copy.deepcopy(config)
small.num_hidden_layers = 2
student = BertForMaskedLM(small)
input_ids = torch.randint(5, 40, (3, 12))
attention_mask = torch.ones_like(input_ids)
attention_mask[1, 8:] = 0
labels = torch.full_like(input_ids, -100)
labels[:, 3] = input_ids[:, 3]
batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
cfg = distil.DistilConfig(alpha_hidden=1.0, alpha_attn=1.0, alpha_relation=1.0, layer_map=((0, 0), (2, 1), (4, 2)))
total, terms = distil.distil_step(student, teacher, batch, cfg)
assert set(terms) == {"kd", "mlm", "cos", "hidden", "attn", "relation"}, terms
assert torch.isfinite(total) and all(torch.isfinite(v) and v > 0 for v in terms.values()), terms
total.backward()
assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.bert.encoder.parameters())
print("ok")
"""

USE_PRETRAINED = USE_STUDENT.replace("SAVE", """
import pretrained
assert os.path.dirname(pretrained.__file__) == here
pretrained.save_student(s, tokenizer, "out")
assert not pretrained.load_teacher("out").training
""")
USE_STUDENT = USE_STUDENT.replace("SAVE", """s.save_pretrained("out")""")

CASES = {"losses.py alone": (["losses.py"], USE_LOSSES),
         "student.py alone": (["student.py"], USE_STUDENT),
         "pretrained.py with student.py": (["pretrained.py", "student.py"], USE_PRETRAINED),
         "distil.py with losses.py": (["distil.py", "losses.py"], USE_DISTIL)}


@pytest.mark.parametrize("case", list(CASES))
def test_file_works_copied_alone(case, tmp_path):
    files, use = CASES[case]
    for name in files:
        shutil.copy(os.path.join(HERE, name), tmp_path)
    script = tmp_path / "use.py"
    script.write_text(PREAMBLE + textwrap.dedent(use))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-s", str(script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
