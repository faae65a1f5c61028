"""The output folder's README.md in the Hugging Face model-card format, and --push-to-hub.

train.py calls `write_model_card` after saving the student, so every finished run documents
itself: a YAML header the Hub reads (library, pipeline, base model, language, license, tags) and
a body that states how the student was made (recipe, layers, losses and weights, data, steps,
batch) and how good it is (held-out perplexity of student and teacher). `push_to_hub` is a thin
call to huggingface_hub's own create_repo and upload_folder. huggingface_hub comes with
transformers, but is imported only here, only when asked.
"""

import json
import os

from token_cache import first_line
from heldout import format_score


class HubError(RuntimeError):
    """The upload failed; the message says where the student is and how to push it by hand."""


def _is_hub_name(name_or_path):
    """True for a Hub id (a model, or a dataset's NAME[:CONFIG[:SPLIT]]); False for a file or folder
    on this machine, or anything written as a path (./x, /x, ~/x), whose name must not be published."""
    return not (os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")))


def teacher_card_metadata(teacher_name_or_path):
    """The teacher's model-card header as a dict (language, license, ...), or {} when it has none
    or the Hub cannot be reached: a missing card never stops the run."""
    from huggingface_hub import ModelCard

    source = teacher_name_or_path
    if not _is_hub_name(source):
        source = os.path.join(os.path.expanduser(source), "README.md")
        if not os.path.isfile(source):
            return {}
    try:
        return ModelCard.load(source, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # offline, no card, a malformed card: the header then just says less
        return {}


def _source_name(source):
    """A corpus as the card names it: a file's name (not the user's local path), or a dataset name."""
    return source if _is_hub_name(source) else os.path.basename(os.path.normpath(source))


def _and(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def model_card(run, teacher, student, mask_token, layers, steps, corpora, valid_ppl, teacher_ppl):
    """The text of README.md.

    run: train.py's run configuration (its flags, plus global_batch); teacher, student: the
    models; layers: the teacher layers kept, in order; steps: optimizer steps done; corpora:
    {"train": (source, n_tokens), "valid": (source, n_tokens)}; valid_ppl, teacher_ppl: final
    held-out masked-LM perplexities (None without --valid).
    """
    from huggingface_hub import ModelCardData

    teacher_name = run["teacher"]
    local_teacher = not _is_hub_name(teacher_name)
    known = teacher_card_metadata(teacher_name)
    language = run.get("language") or known.get("language")
    if isinstance(language, str) and "," in language:
        language = [code.strip() for code in language.split(",") if code.strip()]
    hub_datasets = sorted({src.split(":")[0] for src, _ in corpora.values() if src and _is_hub_name(src)})
    def n_params(model):
        n = sum(p.numel() for p in model.parameters())
        return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"

    kd_on = "every non-padding position" if run["kd_on"] == "all" else "the masked positions only"
    layer_map = f" (teacher:student layers {run['layer_map']})" if run.get("layer_map") else ""
    # (weight, name, definition, what of the teacher's it makes the student reproduce): only the
    # terms that were on are described, so a card never claims what its run did not do.
    terms = [(w, name, what, aim) for w, name, what, aim in [
        (run["alpha_kd"], "KD", f"T²·KL(softmax(teacher/T) ‖ softmax(student/T)) at temperature "
                                f"T = {run['temperature']:g}, over {kd_on}", "the teacher's output distribution"),
        (run["alpha_mlm"], "MLM", "cross-entropy against the true tokens at the masked positions", None),
        (run["alpha_cos"], "COS", "1 − cosine between the last hidden states", "the teacher's last hidden states"),
        (run["alpha_mse"], "MSE", f"squared error between the logits, over {kd_on}", "the teacher's logits"),
        (run.get("alpha_hidden", 0), "HIDDEN", f"{run.get('hidden_loss', 'mse')} between hidden states{layer_map}",
         "the teacher's intermediate hidden states"),
        (run.get("alpha_attn", 0), "ATTN", f"{run.get('attn_loss', 'kl')} between attention maps{layer_map}",
         "the teacher's attention maps"),
        (run.get("alpha_relation", 0), "RELATION", f"MiniLMv2 query/key/value relations{layer_map}",
         "the teacher's self-attention relations")] if w > 0]
    loss = " + ".join(f"{w:g}·{name}" for w, name, _, _ in terms) + ", where " + "; ".join(
        f"{name} = {what}" for _, name, what, _ in terms)
    aims = [aim for _, _, _, aim in terms if aim]
    task = "the masked-language-modelling task" if run["alpha_mlm"] > 0 else ""
    distilled = bool(aims)
    header = ModelCardData(
        library_name="transformers", pipeline_tag="fill-mask",
        # The Hub reads base_model as a Hub model id: a local folder's path would be a broken link.
        base_model=None if local_teacher else teacher_name,
        language=language, license=known.get("license"), datasets=hub_datasets or None,
        tags=(["distillation"] if distilled else []) + (["distilbert-recipe"] if run["alpha_kd"] > 0 else [])
        + [teacher.config.model_type])

    init = (f"teacher layers {', '.join(map(str, layers))} (of {teacher.config.num_hidden_layers}), with the "
            "teacher's embeddings and masked-LM head" if run.get("student_init", "teacher") == "teacher"
            else f"random weights in the shape of {len(layers)} teacher layers (no teacher initialisation)")
    teacher_ref = f"a local `{_source_name(teacher_name)}` checkpoint" if local_teacher else \
        f"[{teacher_name}](https://huggingface.co/{teacher_name})"
    ppl = lambda x: "–" if x is None else f"{x:.2f}"
    data = "\n".join(f"  - {split}: `{_source_name(src)}`, {n_tokens:,} tokens" for split, (src, n_tokens)
                     in corpora.items() if src)
    smoothing = f", rare tokens favoured (P ∝ count^-{run['mlm_smoothing']:g})" if run.get("mlm_smoothing") else ""
    ppl_note = "" if valid_ppl is None else (
        "\nPerplexity is exp(mean cross-entropy) at 15% uniformly masked positions of the validation set,\n"
        "with masks fixed by a constant seed, so it compares across runs.\n")
    if distilled:
        recipe = " with the DistilBERT recipe (Sanh et al., 2019)" if run["alpha_kd"] > 0 else ""
        summary = (f"A {len(layers)}-layer student distilled from {teacher_ref}{recipe}: it was trained to "
                   f"reproduce {_and(aims)}{' while learning ' + task if task else ''}.")
        columns = "teacher | student"
    else:
        summary = (f"A {len(layers)}-layer model made from {teacher_ref} and trained on {task} alone: no "
                   "distillation loss was on, so it never saw the teacher's outputs (the teacher lent its "
                   f"{'layers' if run.get('student_init', 'teacher') == 'teacher' else 'shape'} and is the "
                   "reference in the table).")
        columns = "teacher (source) | this model"
    name = run.get("push_to_hub") or os.path.basename(os.path.normpath(run["out"]))
    body = f"""
# {name.split("/")[-1]}

{summary}

| | {columns} |
|---|---|---|
| layers | {teacher.config.num_hidden_layers} | {len(layers)} |
| hidden size | {teacher.config.hidden_size} | {student.config.hidden_size} |
| parameters | {n_params(teacher)} | {n_params(student)} |
| held-out masked-LM perplexity | {ppl(teacher_ppl)} | {ppl(valid_ppl)} |

## Training

- {'Student initialised' if distilled else 'Initialised'} from {init}.
- Loss = {loss}.
- Masking: {100 * run.get('mlm_prob', 0.15):g}% of the tokens (80% {mask_token}, 10% random, 10% unchanged){smoothing}.
- {steps:,} optimizer steps of {run['global_batch']:,} sequences of up to {run.get('seq_len_used') or run['seq_len']} tokens
  ({'packed' if run.get('pack', True) else 'one document each'}); AdamW, peak learning rate {run['lr']:g},
  betas ({run['adam_betas']}), eps {run['adam_eps']:g}, weight decay {run['weight_decay']:g},
  {100 * run['warmup']:g}% linear warmup then linear decay, gradient clipping at {run['clip']:g}, seed {run['seed']}.
- Data:
{data}
{ppl_note}
## How to use

```python
from transformers import pipeline
fill = pipeline("fill-mask", model="{name}")
print(fill("The capital of France is {mask_token}."))
```

To fine-tune it, load it like any BERT-family encoder:

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForSequenceClassification.from_pretrained("{name}", num_labels=2)
```
"""
    return f"---\n{header.to_yaml()}\n---\n{body}"


def write_model_card(out_dir, run, teacher, student, mask_token, layers, steps, corpora, valid_ppl, teacher_ppl):
    """Write OUT/README.md (see model_card for the arguments); returns its path."""
    path = os.path.join(out_dir, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(model_card(run, teacher, student, mask_token, layers, steps, corpora, valid_ppl, teacher_ppl))
    return path


PIPELINE_TAGS = {"single_label_classification": "text-classification", "multi_label_classification":
                 "text-classification", "regression": "text-classification",
                 "token_classification": "token-classification"}


def task_model_card(run, teacher, student, kind, steps, scores, teacher_scores):
    """The text of README.md for a task run (train.py with a fine-tuned teacher, or --task): what was
    trained on what, the losses that were on, and the held-out scores of student and teacher.
    scores, teacher_scores: heldout.task_metrics dicts (None without --valid, or without a teacher)."""
    from huggingface_hub import ModelCardData

    teacher_name = run.get("teacher")
    local_teacher = not teacher_name or not _is_hub_name(teacher_name)
    n_params = lambda model: f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"
    terms = [(w, name, what) for w, name, what in [
        (run["alpha_kd"], "KD", "the teacher's predictions: " + (
            "squared error to them" if kind == "regression" else
            f"T²·KL of the softened {'per-label sigmoid' if kind.startswith('multi') else 'softmax'} distributions, "
            f"T = {run['temperature']:g}")),
        (run.get("alpha_label", 0), "LABEL", {"regression": "squared error to the gold scores",
                                              "multi_label_classification": "binary cross-entropy on the gold labels"}
         .get(kind, "cross-entropy on the gold labels")),
        (run.get("alpha_cos", 0), "COS", "1 − cosine between the last hidden states"),
        (run.get("alpha_mse", 0), "MSE", "squared error between the logits"),
        (run.get("alpha_hidden", 0), "HIDDEN", "hidden-state loss on --layer-map"),
        (run.get("alpha_attn", 0), "ATTN", "attention loss on --layer-map"),
        (run.get("alpha_relation", 0), "RELATION", "MiniLMv2 relations")] if w > 0]
    loss = " + ".join(f"{w:g}·{name}" for w, name, _ in terms) + ", where " + "; ".join(
        f"{name} = {what}" for _, name, what in terms)
    distilled = any(name != "LABEL" for _, name, _ in terms)
    header = ModelCardData(library_name="transformers", pipeline_tag=PIPELINE_TAGS[kind],
                           base_model=None if local_teacher else teacher_name,
                           tags=(["distillation"] if distilled else []) + [student.config.model_type])
    source = f"a local `{_source_name(teacher_name)}` checkpoint" if teacher_name and local_teacher else \
        f"[{teacher_name}](https://huggingface.co/{teacher_name})" if teacher_name else None
    start = f"`{_source_name(run['student'])}`" if run.get("student") else "the teacher's layers"
    if distilled:
        summary = f"A {student.config.num_hidden_layers}-layer student distilled from {source} on its task ({kind})."
    else:
        summary = f"A {student.config.num_hidden_layers}-layer model fine-tuned on labelled data ({kind}), no teacher."
    rows = ""
    names = sorted({k for d in (scores or {}, teacher_scores or {}) for k in d if k != "examples"})
    # a regression's scores, its agreement included (a Pearson correlation with the teacher), are correlations
    fmt = lambda d, k: "–" if not d or k not in d else format_score(kind, d[k])
    for k in names:
        rows += f"| held-out {k.replace('_', ' ')} | {fmt(teacher_scores, k)} | {fmt(scores, k)} |\n"
    labels = ", ".join(str(student.config.id2label[i]) for i in sorted(student.config.id2label))
    name = run.get("push_to_hub") or os.path.basename(os.path.normpath(run["out"]))
    pipeline = PIPELINE_TAGS[kind]
    body = f"""
# {name.split("/")[-1]}

{summary}

| | teacher | this model |
|---|---|---|
| layers | {teacher.config.num_hidden_layers if teacher is not None else '–'} | {student.config.num_hidden_layers} |
| parameters | {n_params(teacher) if teacher is not None else '–'} | {n_params(student)} |
{rows}
Scores in % (Pearson and Spearman as correlations); agreement is with the teacher's predictions.

## Training

- Started from {start}; labels: {labels}.
- Loss = {loss}.
- {steps:,} optimizer steps of {run['global_batch']:,} examples of up to {run.get('seq_len_used') or run['seq_len']} tokens; AdamW, peak
  learning rate {run['lr']:g}, {100 * run['warmup']:g}% warmup then linear decay, clipping at {run['clip']:g},
  seed {run['seed']}.
- Data: `{_source_name(run['train'])}`{f", held out: `{_source_name(run['valid'])}`" if run.get('valid') else ''}.

## How to use

```python
classify = pipeline("{pipeline}", model="{name}")
```
"""
    return f"---\n{header.to_yaml()}\n---\n{body}"


def write_task_model_card(out_dir, run, teacher, student, kind, steps, scores, teacher_scores):
    """Write OUT/README.md for a task run (see task_model_card); returns its path."""
    path = os.path.join(out_dir, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(task_model_card(run, teacher, student, kind, steps, scores, teacher_scores))
    return path


# What a training run leaves in OUT that does not belong in a model repository: the checkpoints
# (training state: optimizer moments and the run's settings, several times the model's size, for
# --resume on this machine), the lock, the folder of an interrupted save, W&B's local files; and
# run.json, which is uploaded as a copy without local paths (public_run_config).
NOT_PUBLISHED = ("checkpoints", ".saving", "wandb", "wandb-run-id", ".lock", ".lock.soft", ".nonce", "inductor-cache",
                 "run.json")


def public_run_config(run):
    """run.json as published: each local path (teacher, corpora, --out, --cache-dir, --config...)
    reduced to its last component, as the model card names them; Hub names are kept."""
    return {key: os.path.basename(os.path.normpath(value)) if isinstance(value, str) and value
            and not _is_hub_name(value) else value for key, value in run.items()}


def upload_plan(out_dir):
    """What --push-to-hub uploads: a sorted list of (path in the repository, local file path or
    bytes). Every file under out_dir except NOT_PUBLISHED, and run.json with local paths removed."""
    plan = []
    for folder, subfolders, files in os.walk(out_dir):
        relative = os.path.relpath(folder, out_dir)
        subfolders[:] = [d for d in subfolders if os.path.normpath(os.path.join(relative, d)) not in NOT_PUBLISHED]
        for name in files:
            path_in_repo = os.path.normpath(os.path.join(relative, name)).replace(os.sep, "/")
            if path_in_repo not in NOT_PUBLISHED and not name.endswith(".tmp"):
                plan.append((path_in_repo, os.path.join(folder, name)))
    run_json = os.path.join(out_dir, "run.json")
    if os.path.isfile(run_json):
        with open(run_json, encoding="utf-8") as f:
            plan.append(("run.json", json.dumps(public_run_config(json.load(f)), indent=1).encode()))
    return sorted(plan, key=lambda item: item[0])


def push_to_hub(out_dir, repo_id):
    """Create (if needed) the Hub model repository `repo_id` and upload the student's folder to it in
    one commit: weights, tokenizer, README.md, metrics.jsonl, run.json without local paths and the
    TensorBoard logs (the Hub shows them as training metrics); see upload_plan. Returns the
    repository's URL. Raises HubError (one line) if huggingface_hub is missing or the upload fails."""
    try:
        from huggingface_hub import CommitOperationAdd, create_commit, create_repo
    except ImportError:
        raise HubError("--push-to-hub needs the huggingface_hub package: pip install huggingface_hub") from None
    try:
        url = create_repo(repo_id, exist_ok=True)
        create_commit(repo_id, [CommitOperationAdd(path_in_repo=name, path_or_fileobj=source)
                                for name, source in upload_plan(out_dir)],
                      commit_message="Distilled student from bert-distil")
        return url
    except Exception as e:  # no token, offline, no rights: the student is saved, say how to push it later
        raise HubError(f"--push-to-hub {repo_id}: upload failed ({first_line(e)}); the student is saved in {out_dir}; "
                       f"log in with `hf auth login`, then run: hf upload {repo_id} {out_dir} "
                       "--exclude 'checkpoints/*' --exclude .lock --exclude run.json") from None
