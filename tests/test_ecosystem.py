"""The project in the Hugging Face / PyTorch ecosystem: TensorBoard, plots, model cards, the Hub,
datasets, shipped configs, and the student in downstream transformers code.

One tiny real run (train.py on the tiny teacher) feeds the tests, so they check what a run
actually writes. Optional packages a test needs are skipped when absent; their absence itself is
simulated by putting None in sys.modules, which makes `import name` fail as if not installed.
"""

import glob
import json
import os
import shutil
import struct
import sys

import pytest
import torch
import yaml  # a dependency of transformers and huggingface_hub, so always there with them

import logs
import modelcard
from tools import plot
import train
from token_cache import DataError, load_corpus


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def tiny_run(tiny_teacher, tiny_corpus, tmp_path_factory):
    """A finished 12-step run in fp16 (so the scaler's scale is logged) with validation."""
    root = tmp_path_factory.mktemp("ecosystem")
    out = str(root / "run")
    train.main(["--teacher", tiny_teacher, "--train", tiny_corpus[0], "--valid", tiny_corpus[1], "--out", out,
                "--cache-dir", str(root / "cache"), "--seq-len", "32", "--batch-size", "8", "--max-steps", "12",
                "--log-every", "3", "--eval-every", "6", "--save-every", "12", "--layers", "0,3",
                "--lr", "2e-3", "--dtype", "fp16", "--no-progress"])
    return out


def single_line(message):
    assert "\n" not in str(message), f"not one line: {message!r}"
    return str(message)


# ---- TensorBoard ---------------------------------------------------------------------------

def tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_event_file_holds_every_metric_under_its_jsonl_name(tiny_run, tmp_path):
    pytest.importorskip("tensorboard")
    records = read_jsonl(os.path.join(tiny_run, "metrics.jsonl"))
    loggers = logs.open_loggers("tensorboard", str(tmp_path))
    for record in records:
        logs.write_metrics(loggers, record)
    logs.close_loggers(loggers)
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))

    scalars = tensorboard_scalars(str(tmp_path / "tensorboard"))
    expected = {}
    for record in records:
        for name, value in record.items():
            if name != "step":
                expected.setdefault(name, []).append((record["step"], value))
    assert set(scalars) == set(expected)
    assert {"loss", "kd", "mlm", "cos", "lr", "grad_norm", "tokens_per_s", "scale", "skipped_steps",
            "valid_ppl", "teacher_ppl"} <= set(scalars)
    for name, points in expected.items():
        assert [s for s, _ in scalars[name]] == [s for s, _ in points], name
        assert [v for _, v in scalars[name]] == pytest.approx([v for _, v in points], rel=1e-6), name


def test_tensorboard_resume_replaces_the_steps_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    loggers = logs.open_loggers("tensorboard", str(tmp_path))
    for step in range(10):  # the run that crashed after step 9, its checkpoint at step 5
        logs.write_metrics(loggers, {"step": step, "loss": 1.0})
    logs.close_loggers(loggers)
    loggers = logs.open_loggers("tensorboard", str(tmp_path), start_step=6)
    for step in range(6, 12):
        logs.write_metrics(loggers, {"step": step, "loss": 2.0, "note": "text is not a scalar", "ok": True})
    logs.close_loggers(loggers)
    scalars = tensorboard_scalars(str(tmp_path / "tensorboard"))
    assert set(scalars) == {"loss"}
    assert scalars["loss"] == [(s, 1.0) for s in range(6)] + [(s, 2.0) for s in range(6, 12)]


def test_log_spec_errors_are_one_line_with_the_fix(monkeypatch):
    assert logs.check_log_spec(None) == [] and logs.check_log_spec("") == []
    with pytest.raises(logs.LogError, match="unknown backend 'mlflow'.*tensorboard, wandb"):
        logs.check_log_spec("tensorboard,mlflow")
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(logs.LogError) as e:
        logs.check_log_spec("tensorboard")
    assert "pip install tensorboard" in single_line(e.value)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(logs.LogError) as e:
        logs.open_loggers("wandb", "/nonexistent")
    assert "pip install wandb" in single_line(e.value)


def test_wandb_offline_run_receives_the_metrics_and_is_resumed(tiny_run, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
                        "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(name, value)
    records = read_jsonl(os.path.join(tiny_run, "metrics.jsonl"))
    loggers = logs.open_loggers("wandb", str(tmp_path), config={"alpha_kd": 5.0})
    run = loggers[0][1]
    for record in records:
        logs.write_metrics(loggers, record)
    # W&B commits a step's values when a later step arrives: every step but the last is in the summary
    last_step = records[-1]["step"]
    expected = {}
    for record in records:
        if record["step"] < last_step:
            expected.update({k: v for k, v in record.items() if k != "step"})
    summary = dict(run.summary)
    assert {k: summary[k] for k in expected} == pytest.approx(expected)
    assert run.config["alpha_kd"] == 5.0
    logs.close_loggers(loggers)
    assert open(tmp_path / "wandb-run-id").read() == run.id
    resumed = logs.open_loggers("wandb", str(tmp_path), start_step=last_step)
    assert resumed[0][1].id == run.id  # --resume continues the same W&B run
    logs.close_loggers(resumed)
    fresh = logs.open_loggers("wandb", str(tmp_path))  # a new run in the same folder is a new W&B run
    assert fresh[0][1].id != run.id
    logs.close_loggers(fresh)


# ---- plot ----------------------------------------------------------------------------------

def test_plot_writes_a_png_of_the_run(tiny_run):
    pytest.importorskip("matplotlib")
    png = plot.main([tiny_run])
    assert png == os.path.join(tiny_run, "metrics.png")
    with open(png, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert (width, height) == (1200, 450)
    import matplotlib.image
    pixels = matplotlib.image.imread(png)
    assert pixels[..., :3].std() > 0.05  # curves and text, not a blank canvas


def test_plot_draws_every_loss_term_the_run_logged(tiny_teacher, tiny_corpus, tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "all-terms")  # a real run with every loss on: the intermediate ones too
    train.main(["--teacher", tiny_teacher, "--train", tiny_corpus[0], "--out", out, "--cache-dir", str(tmp_path / "cache"),
                "--seq-len", "32", "--batch-size", "8", "--max-steps", "2", "--log-every", "1", "--layers", "0,3",
                "--alpha-mse", "1", "--alpha-hidden", "1", "--alpha-attn", "1", "--alpha-relation", "1", "--no-progress"])
    logged = set(read_jsonl(os.path.join(out, "metrics.jsonl"))[-1])
    assert {"kd", "mlm", "cos", "mse", "hidden", "attn", "relation"} <= logged
    fig = plot.figure([out])
    drawn = fig.axes[0].get_legend_handles_labels()[1]
    assert drawn == ["loss", "kd", "mlm", "cos", "mse", "hidden", "attn", "relation"]
    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert set(records[-1]) - set(drawn) >= {"lr", "grad_norm", "tokens_per_s", "skipped_steps"}  # no rate or count
    assert plot.loss_terms(records) == drawn  # without run.json: the terms train.py knows
    run = json.load(open(os.path.join(out, "run.json")))
    assert plot.loss_terms([{**records[-1], "distil_new": 0.5}], {**run, "alpha_distil_new": 1.0}) == drawn + ["distil_new"]


def test_plot_without_matplotlib_or_metrics_says_what_to_do(tiny_run, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="no such file; pass the --out folder"):
        plot.main([str(tmp_path)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as e:
        plot.main([tiny_run, "-o", str(tmp_path / "x.png")])
    assert "pip install matplotlib" in single_line(e.value)
    assert not os.path.exists(tmp_path / "x.png")


# ---- model card ----------------------------------------------------------------------------

def front_matter(text):
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_model_card_of_a_run_has_the_hub_header_and_the_numbers(tiny_run):
    from pretrained import load_teacher
    run = json.load(open(os.path.join(tiny_run, "run.json")))
    records = read_jsonl(os.path.join(tiny_run, "metrics.jsonl"))
    valid_ppl = [r["valid_ppl"] for r in records if "valid_ppl" in r][-1]
    teacher_ppl = records[0]["teacher_ppl"]
    teacher, student = load_teacher(run["teacher"]), load_teacher(tiny_run)
    path = modelcard.write_model_card(tiny_run, run, teacher, student, "[MASK]", [0, 3], 12,
                                      {"train": (run["train"], 3456), "valid": (run["valid"], 789)},
                                      valid_ppl, teacher_ppl)
    assert path == os.path.join(tiny_run, "README.md")
    header, body = front_matter(open(path, encoding="utf-8").read())
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "fill-mask"
    assert "distillation" in header["tags"] and "bert" in header["tags"]
    assert "base_model" not in header  # a local teacher folder is no Hub id
    from huggingface_hub import ModelCard
    assert ModelCard.load(path).data.to_dict() == header  # the Hub's own parser reads the same header

    assert "teacher layers 0, 3 (of 4)" in body
    assert "| layers | 4 | 2 |" in body
    assert f"| held-out masked-LM perplexity | {teacher_ppl:.2f} | {valid_ppl:.2f} |" in body
    assert "5·KD + 2·MLM + 1·COS" in body and "T = 2," in body
    assert f"12 optimizer steps of {run['global_batch']} sequences of up to 32 tokens" in body
    assert "train: `train.txt`, 3,456 tokens" in body and "valid: `valid.txt`, 789 tokens" in body
    assert os.path.dirname(run["train"]) not in body  # the user's local paths stay private
    assert 'pipeline("fill-mask", model="run")' in body and "The capital of France is [MASK]." in body
    assert "Perplexity is exp(mean cross-entropy)" in body


def test_model_card_takes_language_and_license_from_the_teacher_card_or_the_flag(tiny_run, tiny_teacher, tmp_path):
    from pretrained import load_teacher
    teacher_dir = str(tmp_path / "teacher")
    shutil.copytree(tiny_teacher, teacher_dir)
    with open(os.path.join(teacher_dir, "README.md"), "w") as f:
        f.write("---\nlanguage:\n- en\n- fr\nlicense: apache-2.0\n---\n# a teacher\n")
    run = {**json.load(open(os.path.join(tiny_run, "run.json"))), "teacher": teacher_dir}
    teacher, student = load_teacher(teacher_dir), load_teacher(tiny_run)
    args = (teacher, student, "[MASK]", [0, 3], 12, {"train": (run["train"], 10)}, None, None)
    header, body = front_matter(modelcard.model_card(run, *args))
    assert header["language"] == ["en", "fr"] and header["license"] == "apache-2.0"
    assert "| held-out masked-LM perplexity | – | – |" in body and "Perplexity is" not in body

    # a Hub teacher (its card unreachable offline), --language, a dataset name, and the Hub repo name
    run.update(teacher="bert-base-uncased", language="de,nl", push_to_hub="someone/tiny-distil",
               train="wikitext:wikitext-103-raw-v1")
    header, body = front_matter(modelcard.model_card(run, *args[:5], {"train": (run["train"], 10)}, None, None))
    assert header["base_model"] == "bert-base-uncased" and header["language"] == ["de", "nl"]
    assert header["datasets"] == ["wikitext"] and "license" not in header
    assert "[bert-base-uncased](https://huggingface.co/bert-base-uncased)" in body
    assert 'model="someone/tiny-distil"' in body
    assert "HIDDEN" not in body
    run.update(alpha_hidden=1.0, hidden_loss="cos", layer_map="0:0,3:1")  # intermediate-layer losses
    _, body = front_matter(modelcard.model_card(run, *args))
    assert "5·KD + 2·MLM + 1·COS + 1·HIDDEN" in body and "HIDDEN = cos between hidden states" in body
    assert "(teacher:student layers 0:0,3:1)" in body


def test_model_card_of_an_mlm_only_run_claims_no_distillation(tiny_teacher, tiny_corpus, tmp_path):
    """make_teacher.py's full recipe is such a run: train.py with every distillation loss off."""
    out = str(tmp_path / "mlm-only")
    train.main(["--teacher", tiny_teacher, "--train", tiny_corpus[0], "--valid", tiny_corpus[1], "--out", out,
                "--cache-dir", str(tmp_path / "cache"), "--seq-len", "32", "--batch-size", "8", "--max-steps", "2",
                "--layers", "0,1,2,3", "--alpha-kd", "0", "--alpha-cos", "0", "--alpha-mlm", "1", "--no-progress"])
    header, body = front_matter(open(os.path.join(out, "README.md"), encoding="utf-8").read())
    assert "distillation" not in header["tags"] and "distilbert-recipe" not in header["tags"]
    assert "Loss = 1·MLM, where MLM = cross-entropy against the true tokens at the masked positions." in body
    assert "trained on the masked-language-modelling task alone: no distillation loss was on" in body
    for claim in ("distilled from", "DistilBERT recipe", "distribution", "hidden states", "KD", "COS", "T²"):
        assert claim not in body, claim


def test_model_card_names_only_the_losses_that_were_on(tiny_run, tiny_teacher):
    from pretrained import load_teacher
    run = json.load(open(os.path.join(tiny_run, "run.json")))
    args = (load_teacher(tiny_teacher), load_teacher(tiny_run), "[MASK]", [0, 3], 12, {"train": (run["train"], 10)},
            None, None)
    _, body = front_matter(modelcard.model_card({**run, "alpha_mlm": 0.0, "alpha_cos": 0.0}, *args))
    assert "Loss = 5·KD, where KD = T²·KL" in body and "MLM" not in body and "COS" not in body
    assert "reproduce the teacher's output distribution." in body and "hidden states" not in body
    header, body = front_matter(modelcard.model_card({**run, "alpha_kd": 0.0, "alpha_mlm": 0.0, "alpha_relation": 1.0}, *args))
    assert "Loss = 1·COS + 1·RELATION, where COS = 1 − cosine" in body and "KD" not in body
    assert "reproduce the teacher's last hidden states and the teacher's self-attention relations." in body
    assert "distillation" in header["tags"] and "distilbert-recipe" not in header["tags"]


# ---- the Hub -------------------------------------------------------------------------------

def test_hub_upload_leaves_out_local_paths_the_lock_and_the_checkpoints(tiny_run):
    assert os.path.isfile(os.path.join(tiny_run, ".lock")) and os.listdir(os.path.join(tiny_run, "checkpoints"))
    plan = dict(modelcard.upload_plan(tiny_run))
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "metrics.jsonl", "run.json"} <= set(plan)
    assert not [name for name in plan if name == ".lock" or name.startswith(("checkpoints/", "wandb"))]
    published = json.loads(plan["run.json"])
    local = json.load(open(os.path.join(tiny_run, "run.json")))
    assert set(published) == set(local)
    assert published["train"] == "train.txt" and published["teacher"] == os.path.basename(local["teacher"])
    assert published["lr"] == local["lr"] and published["layers"] == local["layers"]
    text = plan["run.json"].decode()
    for key in ("teacher", "train", "valid", "out", "cache_dir"):
        assert os.path.dirname(os.path.normpath(local[key])) not in text, key  # no local folder is named
    for name, source in plan.items():  # every other entry is the run's own file
        assert name == "run.json" or source == os.path.join(tiny_run, *name.split("/"))
    hub = modelcard.public_run_config({"teacher": "bert-base-uncased", "train": "wikitext:wikitext-103-raw-v1"})
    assert hub == {"teacher": "bert-base-uncased", "train": "wikitext:wikitext-103-raw-v1"}  # Hub names stay


def test_push_to_hub_offline_fails_in_one_line_and_keeps_the_student(tiny_run, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    before = sorted(os.listdir(tiny_run))
    with pytest.raises(modelcard.HubError) as e:
        modelcard.push_to_hub(tiny_run, "someone/tiny-distil")
    message = single_line(e.value)
    assert "offline" in message and f"the student is saved in {tiny_run}" in message
    assert f"hf upload someone/tiny-distil {tiny_run} --exclude 'checkpoints/*'" in message
    assert sorted(os.listdir(tiny_run)) == before
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(modelcard.HubError, match="pip install huggingface_hub"):
        modelcard.push_to_hub(tiny_run, "someone/tiny-distil")


# ---- datasets ------------------------------------------------------------------------------

def save_dataset(folder, texts, **columns):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": texts, **columns}).save_to_disk(folder)
    return folder


def test_saved_dataset_tokenizes_into_the_same_cache_as_the_file(tiny_teacher, tiny_corpus, tmp_path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    lines = [line.strip() for line in open(tiny_corpus[0]) if line.strip()]
    folder = save_dataset(str(tmp_path / "train_ds"), lines, n=list(range(len(lines))))
    cache = str(tmp_path / "cache")
    from_file = load_corpus(tiny_corpus[0], tokenizer, cache, progress=False)
    from_dataset = load_corpus(folder, tokenizer, cache, progress=False)
    assert (from_file.tokens == from_dataset.tokens).all() and (from_file.doc_starts == from_dataset.doc_starts).all()
    assert from_dataset.tokens.dtype == from_file.tokens.dtype

    built = sorted(glob.glob(os.path.join(cache, "train_ds.*.json")))
    assert len(built) == 1
    mtime = os.stat(built[0]).st_mtime_ns
    load_corpus(folder, tokenizer, cache, progress=False)  # unchanged: the cache is reused
    assert sorted(glob.glob(os.path.join(cache, "train_ds.*.json"))) == built and os.stat(built[0]).st_mtime_ns == mtime
    shutil.rmtree(folder)
    save_dataset(folder, lines[:50])  # new content in the same folder: a new cache
    changed = load_corpus(folder, tokenizer, cache, progress=False)
    assert len(glob.glob(os.path.join(cache, "train_ds.*.json"))) == 2
    assert (changed.tokens == from_file.tokens[:len(changed.tokens)]).all()
    assert len(changed.doc_starts) == 51

    with pytest.raises(DataError) as e:
        load_corpus(str(tmp_path / "train_ds"), tokenizer, cache, text_column="body", progress=False)
    assert "no column 'body' (columns: text)" in single_line(e.value)


def test_train_runs_on_a_saved_dataset(tiny_teacher, tiny_corpus, tmp_path):
    lines = [line.strip() for line in open(tiny_corpus[0]) if line.strip()]
    folder = save_dataset(str(tmp_path / "ds"), lines)
    out = str(tmp_path / "run")
    assert train.main(["--teacher", tiny_teacher, "--train", folder, "--out", out, "--cache-dir",
                       str(tmp_path / "cache"), "--seq-len", "32", "--batch-size", "8", "--max-steps", "3",
                       "--no-progress"]) == 3
    assert os.path.isfile(os.path.join(out, "config.json"))


def test_dataset_errors_are_one_line_with_the_fix(tiny_teacher, tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    import huggingface_hub.constants
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError) as e:
        load_corpus("no-such-user/no-such-corpus", tokenizer, cache, progress=False)
    assert "save_to_disk(FOLDER)" in single_line(e.value) and "pass the folder" in str(e.value)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b"]}),
                                   "validation": datasets.Dataset.from_dict({"text": ["c d"]})})
    splits.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"holds the splits train, validation; pass one of them, e.g. .*dd/train"):
        load_corpus(str(tmp_path / "dd"), tokenizer, cache, progress=False)
    save_dataset(str(tmp_path / "numbers"), ["a b"], n=[1])
    with pytest.raises(DataError, match="column 'n' holds .*int64.*not text"):
        load_corpus(str(tmp_path / "numbers"), tokenizer, cache, text_column="n", progress=False)
    assert not glob.glob(os.path.join(cache, "*.tokens*"))  # nothing half-built is left behind


def test_dataset_without_the_datasets_package_says_to_install_it(tiny_teacher, tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "state.json").write_text("{}")  # what save_to_disk leaves, enough to be recognised
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError) as e:
        load_corpus(str(folder), tokenizer, str(tmp_path / "cache"), progress=False)
    assert "is a saved Hugging Face dataset" in single_line(e.value) and "pip install datasets" in str(e.value)
    with pytest.raises(DataError, match="to read it as a Hugging Face dataset name.*pip install datasets"):
        load_corpus("wikitext", tokenizer, str(tmp_path / "cache"), progress=False)
    with pytest.raises(DataError, match="no such file"):  # a missing corpus file stays a missing file
        load_corpus(str(tmp_path / "missing.txt"), tokenizer, str(tmp_path / "cache"), progress=False)


# ---- configs -------------------------------------------------------------------------------

def test_shipped_configs_are_complete_recipes():
    paths = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "*.json")))
    configs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in paths}
    assert {"distilbert-base-uncased", "distilroberta-base", "distilbert-base-multilingual-cased"} <= set(configs)
    keys = set(configs["distilbert-base-uncased"])
    teachers = {"distilbert-base-uncased": "bert-base-uncased", "distilroberta-base": "roberta-base",
                "distilbert-base-multilingual-cased": "bert-base-multilingual-cased"}
    for name, teacher in teachers.items():
        assert set(configs[name]) == keys, name
        assert "GPU" in configs[name]["_comment"], name  # the hardware it expects
        args = train.parse_args(["--config", os.path.join("configs", f"{name}.json"), "--train", "x.txt", "--out", "o"])
        assert args.teacher == teacher and args.layers == "0,2,4,7,9,11" and args.seq_len == 512
        assert (args.alpha_kd, args.alpha_mlm, args.alpha_cos, args.temperature) == (5.0, 2.0, 1.0, 2.0)
        assert args.batch_size * args.grad_accum * 8 == 4096, name  # the recipe's step on one 8-GPU node


def test_yaml_config_sets_flags_as_its_json_twin_does(tmp_path, monkeypatch):
    pytest.importorskip("yaml")
    recipe = {"teacher": "bert-base-uncased", "layers": [0, 2, 4], "alpha_kd": 5.0, "alpha-mlm": 2,
              "adam_betas": [0.9, 0.98], "lr": 0.0005, "pack": False, "kd_on": "all"}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    (tmp_path / "recipe.yaml").write_text(
        "# the DistilBERT recipe, in YAML\nteacher: bert-base-uncased\nlayers: [0, 2, 4]\nalpha_kd: 5.0\n"
        "alpha-mlm: 2\nadam_betas: [0.9, 0.98]\nlr: 5e-4  # YAML 1.1 reads this as a string: argparse converts it\n"
        "pack: false\nkd_on: all\n")
    rest = ["--train", "x.txt", "--out", "o"]
    from_yaml = train.parse_args(["--config", str(tmp_path / "recipe.yaml"), *rest])
    from_json = train.parse_args(["--config", str(tmp_path / "recipe.json"), *rest])
    assert vars(from_yaml) == {**vars(from_json), "config": str(tmp_path / "recipe.yaml")}
    assert (from_yaml.layers, from_yaml.adam_betas, from_yaml.lr, from_yaml.pack) == ("0,2,4", "0.9,0.98", 5e-4, False)
    assert train.parse_args(["--config", str(tmp_path / "recipe.yaml"), "--lr", "1e-3", *rest]).lr == 1e-3

    (tmp_path / "bad.yml").write_text("teacher: bert-base-uncased\nlayers: [0, 2\nlr: 1\n")
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--config", str(tmp_path / "bad.yml"), *rest])
    assert single_line(e.value).startswith(f"error: --config {tmp_path / 'bad.yml'}: not valid YAML at line 3, column")
    (tmp_path / "list.yaml").write_text("- teacher\n- bert\n")
    with pytest.raises(SystemExit, match="a YAML mapping of flag names and values is expected"):
        train.parse_args(["--config", str(tmp_path / "list.yaml"), *rest])
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML missing: one line that says how to get it
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--config", str(tmp_path / "recipe.yaml"), *rest])
    assert single_line(e.value) == f"error: --config {tmp_path / 'recipe.yaml'}: a YAML config needs PyYAML: pip install pyyaml"
    assert train.parse_args(["--config", str(tmp_path / "recipe.json"), *rest]).layers == "0,2,4"  # JSON needs none


# ---- no module shadows a package used beside the project -----------------------------------

# Packages people import in a script or notebook next to this project (import names).
COMMON_PACKAGES = {
    "evaluate", "datasets", "transformers", "tokenizers", "accelerate", "peft", "trl", "optimum", "torch",
    "torchvision", "torchaudio", "numpy", "scipy", "pandas", "sklearn", "matplotlib", "seaborn", "plotly", "tqdm",
    "yaml", "wandb", "tensorboard", "mlflow", "huggingface_hub", "safetensors", "sentence_transformers",
    "sentencepiece", "nltk", "spacy", "deepspeed", "lightning", "pytorch_lightning", "catalyst", "einops", "onnx",
    "onnxruntime", "bitsandbytes", "triton", "pytest", "IPython", "jupyter", "requests", "rich", "hydra",
    "omegaconf", "fire", "absl", "ray", "pyarrow", "regex", "jieba", "faiss", "xformers", "flash_attn", "apex",
}


def test_no_project_module_shadows_a_package_used_beside_it(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = sorted(name[:-3] for name in os.listdir(root) if name.endswith(".py"))
    names += sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "__init__.py")))
    assert "heldout" in names and not set(names) & COMMON_PACKAGES, set(names) & COMMON_PACKAGES
    # Nor any module installed here (the standard library included), looked up from outside the project.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    import subprocess
    found = subprocess.run([sys.executable, "-c", "import importlib.util, sys\n"
                            "print(' '.join(n for n in sys.argv[1:] if importlib.util.find_spec(n)))", *names],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert found == [], f"project modules that hide an installed module: {found}"
    # `import evaluate` run from the project folder gets Hugging Face's evaluate, or nothing at all.
    run = subprocess.run([sys.executable, "-c", "import evaluate; print(evaluate.__file__)"], cwd=root, env=env,
                         capture_output=True, text=True)
    assert not run.stdout.strip().startswith(root), run.stdout


# ---- downstream ----------------------------------------------------------------------------

def test_student_loads_for_classification_and_trains(tiny_run):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_run)
    model, info = AutoModelForSequenceClassification.from_pretrained(tiny_run, num_labels=2,
                                                                     output_loading_info=True)
    # only the new parts start from scratch: the classifier and BERT's pooler (a masked LM has none)
    assert info["missing_keys"] and all(k.startswith(("classifier.", "bert.pooler.")) for k in info["missing_keys"])
    mlm = AutoModelForMaskedLM.from_pretrained(tiny_run)
    for name, p in mlm.bert.encoder.state_dict().items():
        assert torch.equal(model.bert.encoder.state_dict()[name], p), name

    batch = tokenizer(["the cat sat on a mat", "a dog ran to the park", "old man saw a bird", "red house"],
                      padding=True, return_tensors="pt")
    labels = torch.tensor([0, 1, 0, 1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        out = model(**batch, labels=labels)
        losses.append(out.loss.item())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert out.logits.shape == (4, 2)
    assert losses[-1] < 0.5 * losses[0]
    assert (model(**batch).logits.argmax(-1) == labels).all()


def test_student_serves_the_fill_mask_pipeline(tiny_run):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline
    fill = pipeline("fill-mask", model=tiny_run, device="cpu")
    text = "the cat [MASK] on the mat"
    predictions = fill(text, top_k=5)
    assert len(predictions) == 5
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_run), AutoModelForMaskedLM.from_pretrained(tiny_run)
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, inputs["input_ids"][0] == tokenizer.mask_token_id][0]
    assert predictions[0]["token"] == logits.argmax().item()
    assert all(p["sequence"].startswith("the cat ") for p in predictions)

def test_train_mirrors_metrics_to_tensorboard_and_writes_the_model_card(tiny_teacher, tiny_corpus, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = str(tmp_path / "run")
    argv = ["--teacher", tiny_teacher, "--train", tiny_corpus[0], "--valid", tiny_corpus[1], "--out", out,
            "--cache-dir", str(tmp_path / "cache"), "--seq-len", "32", "--batch-size", "8", "--max-steps", "6",
            "--log-every", "2", "--eval-every", "3", "--no-progress", "--log", "tensorboard", "--language", "en"]
    assert train.main(argv) == 6
    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    scalars = tensorboard_scalars(os.path.join(out, "tensorboard"))
    assert [s for s, _ in scalars["loss"]] == [r["step"] for r in records if "loss" in r]
    assert [v for _, v in scalars["valid_ppl"]] == pytest.approx([r["valid_ppl"] for r in records if "valid_ppl" in r])
    header, body = front_matter(open(os.path.join(out, "README.md"), encoding="utf-8").read())
    assert header["language"] == "en" and header["pipeline_tag"] == "fill-mask"
    final_ppl = [r["valid_ppl"] for r in records if "valid_ppl" in r][-1]
    assert f"| {records[0]['teacher_ppl']:.2f} | {final_ppl:.2f} |" in body
    with pytest.raises(modelcard.HubError, match="the student is saved in"):  # offline: a clear error, nothing lost
        train.main(argv[:argv.index("--out") + 1] + [str(tmp_path / "run2")] + argv[argv.index("--out") + 2:]
                   + ["--push-to-hub", "someone/tiny"])
    assert os.path.isfile(str(tmp_path / "run2" / "model.safetensors"))
    assert os.path.isfile(str(tmp_path / "run2" / "README.md"))
