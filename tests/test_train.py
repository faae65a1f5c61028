"""train.py end to end, through its command line: tiny runs on CPU, one process and two (torchrun, gloo)."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30


def run(args, cwd=ROOT, launcher=(sys.executable,), timeout=300, **env):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT, **env)
    return subprocess.run([*launcher, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def train(*args, **kwargs):
    return run(["train.py", *args], **kwargs)


def tiny_args(teacher, corpus, out, cache, steps=STEPS, batch_size=8):
    return ["--teacher", teacher, "--train", corpus[0], "--valid", corpus[1], "--out", out, "--cache-dir", cache,
            "--layers", "0,3", "--seq-len", "32", "--batch-size", str(batch_size), "--max-steps", str(steps),
            "--dtype", "fp32", "--lr", "1e-3", "--log-every", "1", "--eval-every", "10", "--save-every", "10",
            "--keep", "5", "--no-progress"]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_losses(out):
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("token_cache"))


@pytest.fixture(scope="session")
def finished_run(tiny_teacher_no_dropout, tiny_corpus, cache_dir, tmp_path_factory):
    """A 30-step run, one process, fp32, dropout 0, checkpoints every 10 steps."""
    out = str(tmp_path_factory.mktemp("run") / "out")
    assert_ok(train(*tiny_args(tiny_teacher_no_dropout, tiny_corpus, out, cache_dir)))
    return out


def test_loss_goes_down_and_output_loads(finished_run):
    from transformers import AutoModelForMaskedLM, pipeline

    losses = step_losses(finished_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    early, late = [losses[s] for s in range(1, 6)], [losses[s] for s in range(STEPS - 4, STEPS + 1)]
    assert sum(late) / 5 < sum(early) / 5 - 0.05, (early, late)
    valid = [r["valid_ppl"] for r in metrics(finished_run) if "valid_ppl" in r]
    assert len(valid) == 3 and valid[-1] < valid[0]
    assert any("teacher_ppl" in r and r["step"] == 0 for r in metrics(finished_run))

    student = AutoModelForMaskedLM.from_pretrained(finished_run)
    assert student.config.num_hidden_layers == 2
    fill_mask = pipeline("fill-mask", model=finished_run)
    predictions = fill_mask("the cat sat on the [MASK].")
    assert len(predictions) == 5 and all("[MASK]" not in p["sequence"] for p in predictions)


def test_resume_continues_and_finishes(finished_run, tiny_teacher_no_dropout, tiny_corpus, cache_dir, tmp_path):
    """Simulate a crash after the step-10 checkpoint: later checkpoints and the model gone, metrics written on."""
    out = str(tmp_path / "out")
    shutil.copytree(finished_run, out)
    for name in os.listdir(out):
        if name not in ("checkpoints", "metrics.jsonl", "run.json"):
            os.remove(os.path.join(out, name))
    for step in (20, 30):
        os.remove(os.path.join(out, "checkpoints", f"step-{step:08d}.pt"))
    assert not os.path.exists(os.path.join(out, "config.json"))

    result = train(*tiny_args(tiny_teacher_no_dropout, tiny_corpus, out, cache_dir), "--resume")
    assert_ok(result)
    assert "at step 10" in result.stdout
    assert os.path.exists(os.path.join(out, "config.json"))
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # no step logged twice, none missing
    # fp32, dropout 0: the resumed steps retrace the uninterrupted run
    resumed, original = step_losses(out), step_losses(finished_run)
    for step in range(11, STEPS + 1):
        assert resumed[step] == pytest.approx(original[step], rel=1e-4, abs=1e-5), step
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == \
        [f"step-{s:08d}.pt" for s in (10, 20, 30)]


def test_torchrun_two_processes(finished_run, tiny_teacher_no_dropout, tiny_corpus, tmp_path):
    """Two ranks of batch 4 see the global batches of one rank of batch 8: same losses, one output.

    A fresh cache folder: both ranks race for it, one tokenizes while the other waits on the lock."""
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    result = train(*tiny_args(tiny_teacher_no_dropout, tiny_corpus, out, cache, batch_size=4),
                   launcher=launcher, OMP_NUM_THREADS="1")  # one thread per rank on a 2-core machine
    assert_ok(result)
    assert [name for name in os.listdir(out) if name.endswith(".safetensors")] == ["model.safetensors"]
    assert not os.path.exists(os.path.join(out, ".saving"))
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # rank 0 alone writes metrics
    two, one = step_losses(out), step_losses(finished_run)
    for step in range(1, STEPS + 1):
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), step
    from transformers import AutoModelForMaskedLM
    assert AutoModelForMaskedLM.from_pretrained(out).config.num_hidden_layers == 2
    assert len([name for name in os.listdir(cache) if name.endswith(".tokens")]) == 2  # train and valid, once


def readme_snippet():
    text = open(os.path.join(ROOT, "README.md")).read()
    match = re.search(r"^## Use it from a notebook\n.*?^```python\n(.*?)^```", text, re.S | re.M)
    assert match, "README.md has no ```python block under '## Use it from a notebook'"
    return match.group(1)


def test_readme_notebook_snippet_runs(tiny_teacher, tiny_corpus, tmp_path):
    code = readme_snippet()
    # The few substitutions that make it run on the tiny model; each must match exactly once.
    for old, new in (('load_teacher("bert-base-uncased")', f"load_teacher({tiny_teacher!r})"),
                     ('AutoTokenizer.from_pretrained("bert-base-uncased")',
                      f"AutoTokenizer.from_pretrained({tiny_teacher!r})"),
                     ('"corpus/train.txt"', repr(tiny_corpus[0])),
                     ('"/path/to/bert-distil"', repr(ROOT)),
                     ("seq_len=128", "seq_len=32")):
        assert code.count(old) == 1, f"the README snippet changed shape: {old!r} is not in it once; update this test"
        code = code.replace(old, new)
    assert "bert-base-uncased" not in code
    (tmp_path / "snippet.py").write_text(code)
    # from any folder, with nothing on PYTHONPATH: the snippet's own sys.path line finds the modules
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(tmp_path / "snippet.py")], cwd=str(tmp_path), capture_output=True,
                            text=True, timeout=300, env=dict(env, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    assert_ok(result)
    printed = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 20 and all({"kd", "mlm", "cos"} <= set(ast.literal_eval(line)) for line in printed)
    from transformers import AutoModelForMaskedLM
    assert AutoModelForMaskedLM.from_pretrained(str(tmp_path / "my-student")).config.num_hidden_layers == 2


def test_shipped_config_runs(tiny_teacher, tiny_corpus, cache_dir, tmp_path):
    config = os.path.join(ROOT, "configs", "distilbert-base-uncased.json")
    shipped = json.load(open(config))
    out = str(tmp_path / "out")
    result = train("--config", config, "--teacher", tiny_teacher, "--train", tiny_corpus[0], "--out", out,
                   "--cache-dir", cache_dir, "--layers", "0,3", "--seq-len", "32", "--batch-size", "4",
                   "--grad-accum", "2", "--max-steps", "3", "--no-progress")
    assert_ok(result)
    recorded = json.load(open(os.path.join(out, "run.json")))
    for key, value in shipped.items():  # the config's values reach the run, the command line wins
        if not key.startswith("_") and key not in ("teacher", "layers", "seq_len", "batch_size", "grad_accum"):
            assert recorded[key] == value, key
    assert recorded["seq_len"] == 32 and recorded["teacher"] == tiny_teacher and recorded["kd_on"] == "all"
    assert os.path.exists(os.path.join(out, "model.safetensors"))


def one_line_error(result):
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode != 0, result.stdout + result.stderr
    assert len(lines) == 1, "expected a one-line error, got:\n" + "\n".join(lines)
    return lines[0]


def test_config_with_unknown_key(tiny_teacher, tiny_corpus, tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"teacher": tiny_teacher, "learning_rate": 1e-4, "alpha-kd": 2.0}))
    line = one_line_error(train("--config", str(config), "--train", tiny_corpus[0], "--out", str(tmp_path / "o")))
    assert "learning_rate" in line and "alpha" not in line.split("learning_rate")[1] and "unknown" in line
    assert not os.path.exists(tmp_path / "o")


def test_config_not_json(tmp_path):
    from flags import parse_args
    config = tmp_path / "bad.json"
    config.write_text("{not json")
    with pytest.raises(SystemExit) as info:
        parse_args(["--config", str(config)])
    assert str(info.value).startswith("error: --config") and "bad.json" in str(info.value)
    assert "\n" not in str(info.value)


def test_config_not_an_object_and_bad_flag_values_are_one_line(tmp_path):
    config = tmp_path / "list.json"
    config.write_text("[1, 2]")
    assert "a JSON object" in one_line_error(train("--config", str(config)))
    line = one_line_error(train("--teacher", "t", "--train", "x.txt", "--out", str(tmp_path / "o"),
                                "--batch-size", "many"))
    assert "--batch-size" in line and "many" in line and line.startswith("error:")
    assert "--teacher is required" in one_line_error(train("--train", "x.txt", "--out", str(tmp_path / "o")))


def test_config_values_and_command_line_precedence(tmp_path):
    from flags import parse_args
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"teacher": "t", "train": "x.txt", "out": "o", "layers": [0, 3],
                                  "adam-betas": [0.9, 0.98], "seq_len": 64, "lr": 1e-4}))
    args = parse_args(["--config", str(config), "--lr", "2e-4"])
    assert (args.layers, args.adam_betas, args.seq_len, args.lr) == ("0,3", "0.9,0.98", 64, 2e-4)


@pytest.fixture(scope="session")
def bad_teachers(tiny_teacher, tmp_path_factory):
    """Folders of a model that is no masked LM (GPT-2) and of a BERT saved without its MLM head."""
    from transformers import BertModel, GPT2Config, GPT2LMHeadModel

    from pretrained import load_teacher
    folder = tmp_path_factory.mktemp("bad_teachers")
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        folder / "gpt2")
    BertModel(load_teacher(tiny_teacher).config).save_pretrained(folder / "headless")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_teacher, name), folder / "headless")
    return {"gpt2": str(folder / "gpt2"), "headless": str(folder / "headless")}


# case -> (flags to change, words the error must contain)
BAD_RUNS = {
    "missing corpus": ({"--train": "{tmp}/nope.txt"}, "no such file"),
    "empty corpus": ({"--train": "{tmp}/empty.txt"}, "is empty"),
    "csv without column": ({"--train": "{tmp}/table.csv"}, "no column 'text'"),
    "not a masked LM": ({"--teacher": "{gpt2}"}, "no masked-LM class"),
    "MLM head missing": ({"--teacher": "{headless}"}, "no trained masked-LM head"),
    "hub name offline": ({"--teacher": "nobody-here/no-such-model"}, "pass a local folder"),
    "layer out of range": ({"--layers": "0,4"}, "out of range"),
    "layer repeated": ({"--layers": "1,1"}, "repeats a layer"),
    "layer not a number": ({"--layers": "0,x"}, "--layers"),
    "seq-len too long": ({"--seq-len": "65"}, "64 positions"),
}


@pytest.fixture(scope="session")
def bad_runs(tiny_teacher, tiny_corpus, bad_teachers, tmp_path_factory):
    """{case: (its folder, the finished process)}, two runs at a time: mostly start-up, one core each."""
    def bad_run(case):
        folder = tmp_path_factory.mktemp("bad_run")
        (folder / "empty.txt").write_text("")
        (folder / "table.csv").write_text("body,label\nthe cat sat on the mat,1\n")
        flags = {"--teacher": tiny_teacher, "--train": tiny_corpus[0], "--out": str(folder / "out"),
                 "--cache-dir": str(folder / "cache"), "--layers": "0,3", "--seq-len": "32", "--batch-size": "8",
                 "--max-steps": "5", "--dtype": "fp32", "--no-progress": None}
        flags.update({k: v.format(tmp=folder, **bad_teachers) for k, v in BAD_RUNS[case][0].items()})
        return folder, train(*[x for k, v in flags.items() for x in ((k,) if v is None else (k, v))],
                             OMP_NUM_THREADS="1")

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(BAD_RUNS, pool.map(bad_run, BAD_RUNS)))


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_input_stops_at_once(case, bad_runs):
    folder, result = bad_runs[case]
    line = one_line_error(result)
    assert line.startswith("error") and BAD_RUNS[case][1] in line, line
    # stopped before any work: no output folder, and the corpus not even tokenized
    assert not os.path.exists(folder / "out")
    assert not os.path.exists(folder / "cache") or \
        all(name.endswith(".lock") for name in os.listdir(folder / "cache")), os.listdir(folder / "cache")
