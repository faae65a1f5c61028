"""The compiled step (--compile, issue 20), on the CPU.

1. Static rows: a compiled step's batches pad their row indices to fixed sizes with rows that weigh
   zero (distil.batch_rows, tasks.task_rows). Every loss, packed and padded, masked LM and every task
   kind: the losses and the gradients are those of the unpadded indices (eager, float32).
2. One graph per batch shape: the whole step (both forwards, the losses, the backward through
   AOTAutograd) traced by Dynamo with no graph break, and no recompilation over batches whose masked
   counts, labelled rows and lengths vary (Dynamo's decisions do not depend on the backend, so these
   use the quick "aot_eager"; a real run below uses Inductor).
3. train.py --compile end to end, with Inductor: no graph break, one graph per batch shape, the same
   losses and held-out perplexity as the eager run.
4. The fallback: a broken compiler (CXX=/bin/false makes Inductor's C++ backend fail on a CPU, its
   caches off and empty) gives one warning line per compiled thing, and the eager numbers.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters
from transformers import BertConfig, BertForMaskedLM

import train
from data import make_batch, make_sequences, mask_spec, masked_size, static_length, to_device
from distil import DistilConfig, batch_rows, count_rows, distil_step
from pretrained import load_teacher, load_tokenizer
from student import make_student
from tasks import count_task_rows, task_rows, task_step
from test_meta import RECIPES, TASKS, TINY, LAYERS, MAP, masked_lm_batch
from token_cache import load_corpus

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def terms_and_grads(step, student, batch, *args, count):
    """The step's terms and the student's gradients, each batch divided by its own row counts."""
    student.zero_grad(set_to_none=True)
    denominators = {k: torch.tensor(float(v)) for k, v in count(batch).items()}
    loss, terms = step(student, *args[:1], to_device(batch, "cpu"), *args[1:], denominators=denominators)
    loss.backward()
    return terms, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def assert_same(a, b):
    (terms_a, grads_a), (terms_b, grads_b) = a, b
    assert set(terms_a) == set(terms_b) and set(grads_a) == set(grads_b)
    for name in terms_a:
        torch.testing.assert_close(terms_a[name], terms_b[name], rtol=1e-5, atol=1e-7, msg=name)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def masked_lm_models():
    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(**TINY)).eval().requires_grad_(False)
    return teacher, make_student(teacher, LAYERS).eval()


# ---- 1. static rows: the same losses and gradients ----

@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_rows_padded_to_a_fixed_size_give_the_same_losses_and_gradients(masked_lm_models, recipe, padded):
    teacher, student = masked_lm_models
    cfg = RECIPES[recipe]
    batch = masked_lm_batch(padded)
    mask, labels = batch["attention_mask"], batch["labels"]
    static = {**batch, **batch_rows(mask, labels, masked_size(mask.shape, 0.3))}
    assert len(static["masked_rows"]) > batch["n_masked"]  # padding rows really are there
    count = lambda b: count_rows(b, cfg)
    assert count(static) == count(batch)  # the denominators count the real rows only
    assert_same(terms_and_grads(distil_step, student, batch, teacher, cfg, count=count),
                terms_and_grads(distil_step, student, static, teacher, cfg, count=count))


@pytest.mark.parametrize("kind", list(TASKS))
def test_task_rows_padded_to_a_fixed_size_give_the_same_losses_and_gradients(kind):
    model_class, extra, labels = TASKS[kind]
    torch.manual_seed(0)
    teacher = model_class(BertConfig(**TINY, **extra)).eval().requires_grad_(False)
    student = make_student(teacher, LAYERS).eval()
    batch = masked_lm_batch(padded=True)
    if kind == "token_classification":
        labels = np.where(batch["attention_mask"] == 1, batch["input_ids"] % 4, -100)
        labels[0, 1] = -100  # a predicted word without a label
    mask = batch["attention_mask"]
    base = {"input_ids": batch["input_ids"], "attention_mask": mask, "labels": labels}
    dynamic, static = {**base, **task_rows(mask, labels, kind)}, {**base, **task_rows(mask, labels, kind, static=True)}
    assert len(static["label_rows"]) > len(dynamic["label_rows"])  # a row without a label became padding
    cfg = DistilConfig(alpha_kd=1.0, alpha_mlm=0.0, alpha_cos=1.0, alpha_label=1.0, alpha_mse=1.0,
                       alpha_hidden=1.0, layer_map=MAP)
    count = lambda b: count_task_rows(b, cfg)
    assert count(static) == count(dynamic)
    assert_same(terms_and_grads(task_step, student, dynamic, teacher, cfg, kind, count=count),
                terms_and_grads(task_step, student, static, teacher, cfg, kind, count=count))


def test_the_masked_size_bounds_every_batch_of_a_shape():
    """data.masked_size is the most mask_tokens can choose: never exceeded, over many batches and
    both kinds of masking (uniform and frequency-smoothed)."""
    class Tok:
        all_special_ids, pad_token_id, cls_token_id, sep_token_id, mask_token_id = [0, 1, 2, 3], 0, 1, 2, 3

        def __len__(self):
            return 50
    from data import MaskSpec, mask_tokens
    rng = np.random.default_rng(0)
    for weights in (None, rng.random(50) + 0.01):
        spec = MaskSpec(3, np.array([0, 1, 2, 3]), np.arange(4, 50), weights, 0.15)
        most = 0
        for seed in range(300):
            ids = rng.integers(4, 50, (4, 27))
            mask = np.ones_like(ids)
            _, labels = mask_tokens(ids, mask, np.arange(4) + 4 * seed, seed, 0, spec)
            most = max(most, int((labels != -100).sum()))
        assert most <= masked_size((4, 27), 0.15) == 4 * (4 + 1)
        assert most >= masked_size((4, 27), 0.15) - 4  # and the bound is not loose: 4 x 5 against 4 x 4.05 + 4
    assert [static_length(n, 128) for n in (1, 64, 65, 128, 130)] == [64, 64, 128, 128, 130]


# ---- 2. one graph per shape, no graph break, no recompilation ----

def static_batches(tiny_teacher, tiny_corpus, tmp_path, pack, n, seq_len=64):
    teacher = load_teacher(tiny_teacher)
    tokenizer = load_tokenizer(teacher, tiny_teacher)
    seqs = make_sequences(load_corpus(tiny_corpus[0], tokenizer, str(tmp_path / "cache"), progress=False), seq_len,
                          pack=pack)
    spec = mask_spec(tokenizer)
    return teacher, [make_batch(seqs, np.arange(4 * i, 4 * i + 4), tokenizer, spec, 0, 0, max_length=seq_len)
                     for i in range(n)]


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
def test_the_whole_step_is_one_graph_that_never_recompiles(tiny_teacher, tiny_corpus, tmp_path, pack):
    teacher, batches = static_batches(tiny_teacher, tiny_corpus, tmp_path, pack, 16)
    student = make_student(teacher, [0, 2])
    cfg = DistilConfig(kd_on="all" if not pack else "masked", alpha_hidden=1.0, alpha_attn=1.0,
                       layer_map=((0, 0), (2, 1), (4, 2)))
    shapes = {(b["input_ids"].shape, b["padded"]) for b in batches}
    assert len({b["n_masked"] for b in batches}) > 1  # the masked counts vary from batch to batch
    if not pack:
        assert len({b["n_real"] for b in batches}) > 3  # and so do the padded batches' real positions
    distil_step(student, teacher, to_device(batches[0], "cpu"), cfg)[0].backward()  # the eager probe step
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(distil_step, backend="aot_eager")
    for batch in batches:
        denominators = {k: torch.tensor(float(v)) for k, v in count_rows(batch, cfg).items()}
        loss, terms = step(student, teacher, to_device(batch, "cpu"), cfg, denominators=denominators)
        loss.backward()
        assert torch.isfinite(loss)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == len(shapes), (dict(counters["stats"]), shapes)


def test_a_task_step_is_one_graph_per_shape(tmp_path):
    model_class, extra, _ = TASKS["single_label_classification"]
    torch.manual_seed(0)
    teacher = model_class(BertConfig(**TINY, **extra)).eval().requires_grad_(False)
    student = make_student(teacher, LAYERS)
    rng = np.random.default_rng(0)
    batches = []
    for i in range(10):  # lengths 20 to 40 (one static length, 64) and 0 to 3 rows without a label
        lengths = rng.integers(20, 41, 4)
        length = static_length(int(lengths.max()), 64)
        mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
        labels = np.where(rng.random(4) < 0.3, -100, rng.integers(0, 3, 4))
        batches.append({"input_ids": rng.integers(5, 60, mask.shape) * mask, "attention_mask": mask, "labels": labels,
                        **task_rows(mask, labels, "single_label_classification", static=True)})
    cfg = DistilConfig(alpha_kd=0.5, alpha_mlm=0.0, alpha_cos=0.0, alpha_label=0.5)
    task_step(student, teacher, to_device(batches[0], "cpu"), cfg, "single_label_classification")[0].backward()
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(task_step, backend="aot_eager")
    for batch in batches:
        denominators = {k: torch.tensor(float(v)) for k, v in count_task_rows(batch, cfg).items()}
        step(student, teacher, to_device(batch, "cpu"), cfg, "single_label_classification",
             denominators=denominators)[0].backward()
    assert len({b["n_label"] for b in batches}) > 1
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


# ---- 3. train.py --compile, with Inductor ----

def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_py_compiled_matches_eager_with_no_graph_break(tiny_teacher_no_dropout, tiny_corpus, tmp_path):
    """A --no-pack run of 24 steps (batches padded, and some not), evaluated twice: compiled, no graph
    break and a graph for each of the two kinds of batch; the same losses and perplexities as eager.
    Without dropout: the compiled run's batches are padded longer (data.static_length), so dropout's
    random masks, drawn per position, would differ."""
    common = ["--teacher", tiny_teacher_no_dropout, "--train", tiny_corpus[0], "--valid", tiny_corpus[1],
              "--max-steps", "24", "--batch-size", "4", "--seq-len", "32", "--no-pack", "--eval-every", "12",
              "--log-every", "6", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    train.main(common + ["--out", str(tmp_path / "eager"), "--compile", "off"])
    torch._dynamo.reset()
    counters.clear()
    train.main(common + ["--out", str(tmp_path / "compiled"), "--compile"])
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # padded batches, and unpadded ones
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert [sorted(r) for r in eager] == [sorted(r) for r in compiled]
    for e, c in zip(eager, compiled):
        for key in ("loss", "kd", "mlm", "cos", "valid_ppl"):
            if key in e:
                assert c[key] == pytest.approx(e[key], rel=1e-4, abs=1e-6), (key, e, c)


def test_compiled_under_torchrun_equals_eager_under_torchrun(tiny_teacher, tiny_corpus, tmp_path):
    """2 gloo ranks, each compiling the step of its DDP-wrapped student (Dynamo splits the graph at
    DDP's buckets): the same losses and perplexities as the eager run of 2 ranks."""
    from test_resume import flags, metrics, ok, run
    base = dict(teacher=tiny_teacher, train=tiny_corpus[0], valid=tiny_corpus[1], max_steps=8, batch_size=4,
                seq_len=32, eval_every=4, log_every=2, no_progress=True, cache_dir=str(tmp_path / "cache"))
    ok(run(flags(base, out=str(tmp_path / "eager"), compile="off"), nproc=2, timeout=600))
    ok(run(flags(base, out=str(tmp_path / "compiled"), compile="on"), nproc=2, timeout=900))
    eager, compiled = metrics(str(tmp_path / "eager")), metrics(str(tmp_path / "compiled"))
    for e, c in zip(eager, compiled):
        for key in ("loss", "kd", "mlm", "cos", "valid_ppl"):
            if key in e:
                assert c[key] == pytest.approx(e[key], rel=1e-4, abs=1e-6), (key, e, c)
    assert sum("valid_ppl" in r for r in compiled) == 2


def test_a_compile_mode_that_cannot_apply_says_so(tiny_teacher, tiny_corpus, tmp_path, capsys):
    common = ["--teacher", tiny_teacher, "--train", tiny_corpus[0], "--max-steps", "1", "--batch-size", "2",
              "--seq-len", "16", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    train.main(common + ["--out", str(tmp_path / "a"), "--compile-mode", "reduce-overhead"])
    assert "warning: --compile-mode reduce-overhead does nothing without --compile on" in capsys.readouterr().err
    train.main(common + ["--out", str(tmp_path / "b"), "--compile-mode", "default"])
    assert "warning" not in capsys.readouterr().err


def test_compile_auto_is_off_on_a_cpu():
    assert train.use_compile("auto", torch.device("cpu")) is False
    assert train.use_compile("auto", torch.device("cuda")) is True
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train.use_compile("on", cpu) is True and train.use_compile("off", cuda) is False
    # a resumed run keeps its start's decision, which OUT/run.json holds as a bool
    assert train.use_compile(True, cpu) is True and train.use_compile(False, cuda) is False


# ---- 4. the fallback when no compiler works ----

FALLBACK = """
import sys
import torch
import torch.nn.functional as F
sys.path.insert(0, {root!r})
import losses
from distil import DistilConfig, batch_rows, distil_step
from student import make_student
from train_step import compile_step
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

# the whole step (train.py --compile): one line, the eager step's numbers
teacher = BertForMaskedLM(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)).eval()
student = make_student(teacher, [0, 2]).eval()
ids = torch.randint(5, 30, (2, 8))
labels = torch.where(torch.rand(2, 8) < 0.3, ids, -100)
batch = {{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
         **{{k: torch.as_tensor(v) if not isinstance(v, (bool, int)) else v
            for k, v in batch_rows(torch.ones_like(ids).numpy(), labels.numpy(), 8).items()}}}}
cfg = DistilConfig()
eager = distil_step(student, teacher, batch, cfg)[0]
step = compile_step(distil_step, "default", torch.device("cpu"))
for _ in range(2):
    torch.testing.assert_close(step(student, teacher, batch, cfg)[0], eager)
print("done")
"""


def run_fallback(tmp_path, broken):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), TORCHINDUCTOR_FX_GRAPH_CACHE="0",
               TORCHINDUCTOR_AUTOGRAD_CACHE="0")
    if broken:
        env["CXX"] = "/bin/false"
    script = tmp_path / "fallback.py"
    script.write_text(FALLBACK.format(root=HERE))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)


def test_a_broken_compiler_falls_back_to_eager_with_one_line(tmp_path):
    result = run_fallback(tmp_path, broken=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kl block: eager" in result.stdout and "done" in result.stdout, result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: torch.compile")]
    assert len(warnings) == 2, result.stderr[-3000:]  # one for the KL block, one for the step
    assert "the KL block" in warnings[0] and "InvalidCxxCompiler" in warnings[0], warnings
    assert "the training step" in warnings[1], warnings
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_a_working_compiler_is_used(tmp_path):
    """The same script with the compiler left alone: the compiled block is kept, no warning."""
    result = run_fallback(tmp_path, broken=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kl block: compiled" in result.stdout and "done" in result.stdout, result.stdout
    assert "warning: torch.compile" not in result.stderr, result.stderr[-3000:]
