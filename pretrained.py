"""Teachers in, students out, in Hugging Face format: load a teacher (a masked LM or a model
fine-tuned on a task) and check it can teach, load a --student checkpoint and the tokenizer, save
the student so that its Auto class loads it back, checked.

student.py builds the student; this file is what stands between it and the files on disk: every
problem a folder can have (no config, no trained head, a tokenizer that is not the teacher's, a
save that does not reload) is a one-line StudentError naming the flag and the fix.
"""

import os

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, AutoTokenizer)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

from student import StudentError


def usable_positions(model):
    """How many tokens a sequence may have: RoBERTa-style models number positions from padding_idx + 1."""
    config = model.config
    embeddings = getattr(model.base_model, "embeddings", None)
    offset = embeddings.padding_idx + 1 if getattr(embeddings, "padding_idx", None) is not None else 0
    return config.max_position_embeddings - offset


def _means_local_folder(name_or_path):
    """True when the user means a folder on this machine, not a hub id: an existing folder, or a
    string written as a path (./x, /x, ~/x), which is then a missing folder."""
    return os.path.isdir(name_or_path) or name_or_path.startswith((".", "/", "~"))


# A teacher fine-tuned on a task: its class names the task (transformers' architectures field).
TASK_CLASSES = {"ForSequenceClassification": AutoModelForSequenceClassification,
                "ForTokenClassification": AutoModelForTokenClassification}


def auto_class(model_or_config):
    """The Auto class that loads this model (or a model of this config) back: a task class or the masked LM."""
    architectures = getattr(model_or_config, "architectures", None) or []
    name = type(model_or_config).__name__ if isinstance(model_or_config, nn.Module) else " ".join(architectures)
    return next((cls for suffix, cls in TASK_CLASSES.items() if suffix in name), AutoModelForMaskedLM)


def task_kind(config):
    """What a task model predicts (one of tasks.KINDS), from its config; None for a masked LM."""
    cls = auto_class(config)
    if cls is AutoModelForTokenClassification:
        return "token_classification"
    if cls is AutoModelForMaskedLM:
        return None
    # transformers' own rule when problem_type is unset: one output is a regression
    return config.problem_type or ("regression" if config.num_labels == 1 else "single_label_classification")


def _check_supported_head(name_or_path, config, flag="--teacher"):
    architectures = config.architectures or []
    # (a *ForPreTraining checkpoint goes on to the masked-LM checks: BERT's has the head, ELECTRA's has not)
    other = [a for a in architectures if a.endswith(("ForQuestionAnswering", "ForMultipleChoice"))]
    if other and auto_class(config) is AutoModelForMaskedLM:
        qa = " (extractive question answering is not supported yet)" if "QuestionAnswering" in other[0] else ""
        raise StudentError(f"{flag} {name_or_path} is a {other[0]}{qa}; pass a masked LM, or a model fine-tuned "
                           "for sequence classification or token classification")


def load_teacher(name_or_path):
    """The teacher in float32 and eval mode, frozen: a masked LM, or a model fine-tuned for sequence or
    token classification (its config's architectures say which); a one-line StudentError if it cannot be one."""
    if _means_local_folder(name_or_path) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise StudentError(f"--teacher {name_or_path}: no such folder; pass a folder holding config.json "
                           "and the weights, or a Hugging Face hub name")
    if os.path.isdir(name_or_path) and not os.path.isfile(os.path.join(name_or_path, "config.json")):
        # (transformers would guess a model type from the folder's name instead)
        raise StudentError(f"--teacher {name_or_path}: not a Hugging Face model folder (no config.json); "
                           "pass the folder save_pretrained wrote")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        if _means_local_folder(name_or_path):
            raise StudentError(f"--teacher {name_or_path}: not a Hugging Face model folder ({_first_line(e)})")
        raise StudentError(f"--teacher {name_or_path}: cannot download it from the hub ({_first_line(e)}); "
                           "offline, pass a local folder with --teacher /path/to/model") from None
    _check_supported_head(name_or_path, config)
    if auto_class(config) is not AutoModelForMaskedLM:
        return _load_task_model(name_or_path, config, "--teacher").eval().requires_grad_(False)
    if type(config) not in MODEL_FOR_MASKED_LM_MAPPING:
        raise StudentError(f"--teacher {name_or_path} is a '{config.model_type}' model, which has no masked-LM "
                           "class in transformers; pass a masked-LM teacher (BERT, RoBERTa, XLM-R, ...)")
    # float32 whatever the checkpoint's dtype: autocast does the mixed precision, AdamW needs fp32 masters.
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(name_or_path, dtype=torch.float32,
                                                           output_loading_info=True)
    except Exception as e:  # no weights, or a truncated/corrupt file (safetensors raises its own error type)
        raise StudentError(f"--teacher {name_or_path}: cannot load its weights ({_first_line(e)}); "
                           "pass a folder holding config.json and model.safetensors (or pytorch_model.bin)") from None
    base = model.base_model_prefix + "."
    head_missing = sorted(k for k in info["missing_keys"] if not k.startswith(base))
    if head_missing:
        hint = ""
        if config.model_type in ("electra", "deberta-v2"):
            hint = (" (ELECTRA discriminators and DeBERTa-v3 checkpoints are trained for replaced-token "
                    "detection and have no MLM head; use a generator or a masked-LM checkpoint)")
        raise StudentError(f"--teacher {name_or_path} has no trained masked-LM head: missing "
                           f"{', '.join(head_missing[:3])}{', ...' if len(head_missing) > 3 else ''}{hint}; "
                           "transformers would start it at random, so pass a checkpoint saved as a masked LM "
                           "(or, to fine-tune it on a task, pass it as --student with --task)")
    relative = sorted(k for k in info["unexpected_keys"] if "distance_embedding" in k)
    if relative:  # transformers 5 dropped relative_key positions from BERT-style models: it would run without them
        kind = getattr(config, "position_embedding_type", "relative")
        raise StudentError(f"--teacher {name_or_path} uses position_embedding_type={kind!r}, which transformers 5 no "
                           f"longer implements for '{config.model_type}' (it would ignore {relative[0]}, ...); "
                           "pass a teacher with absolute position embeddings")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_task_model(name_or_path, config, flag, **head):
    """A task model in float32; with `head` (num_labels, id2label, label2id, problem_type) given, a
    fresh task head where the checkpoint's does not fit them. Returns the model; the names of the
    weights started at random are in model.fresh_weights."""
    cls = head.pop("cls") if head else auto_class(config)
    try:
        model, info = cls.from_pretrained(name_or_path, dtype=torch.float32, output_loading_info=True,
                                          ignore_mismatched_sizes=bool(head), **head)
    except Exception as e:
        raise StudentError(f"{flag} {name_or_path}: cannot load its weights ({_first_line(e)}); "
                           "pass a folder holding config.json and model.safetensors (or pytorch_model.bin)") from None
    fresh = sorted(set(info["missing_keys"]) | {k for k, *_ in info.get("mismatched_keys", [])})
    if fresh and not head:  # a teacher: every weight must be trained
        raise StudentError(f"{flag} {name_or_path} lacks trained weights for {', '.join(fresh[:3])}"
                           f"{', ...' if len(fresh) > 3 else ''}; transformers would start them at random, so pass "
                           "the checkpoint the task was fine-tuned into")
    base = model.base_model_prefix + "."
    lost = [k for k in fresh if k.startswith(base) and ".pooler." not in k]
    if head and lost:
        raise StudentError(f"{flag} {name_or_path}: its weights do not fit a {cls.__name__[9:]} of its own config "
                           f"(missing {', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''}); pass a checkpoint "
                           "save_pretrained wrote")
    model.fresh_weights = fresh
    return model


def load_student_checkpoint(folder, kind=None, id2label=None):
    """`--student FOLDER`: a pre-trained checkpoint to start the student from, trainable, in float32.

    kind None: a masked LM with its trained head (as load_teacher). Otherwise a model of the task:
    its encoder from the checkpoint (any head, or none: an MLM teacher, a student this project
    made, a sentence encoder), with a fresh task head for `id2label` ({id: name}; regression:
    {0: name} per output) unless the checkpoint's own head already predicts exactly those labels
    (TinyBERT's general-then-task recipe). Which weights started at random: model.fresh_weights.
    """
    if kind is None:
        model = load_teacher(folder)
        model.fresh_weights = []
        return model.train().requires_grad_(True)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise StudentError(f"--student {folder}: not a Hugging Face model folder (no config.json); pass the folder "
                           "save_pretrained wrote")
    config = AutoConfig.from_pretrained(folder)
    id2label = {int(i): str(name) for i, name in id2label.items()}
    cls = AutoModelForTokenClassification if kind == "token_classification" else AutoModelForSequenceClassification
    head = {"cls": cls, "num_labels": len(id2label), "id2label": id2label,
            "label2id": {name: i for i, name in id2label.items()}}
    if kind != "token_classification":
        head["problem_type"] = kind
    same = auto_class(config) is cls and task_kind(config) == kind and \
        {int(i): str(n) for i, n in config.id2label.items()} == id2label
    model = _load_task_model(folder, config, "--student", **head)
    if not same:  # a head for other labels (or none): only the encoder is kept
        model.fresh_weights = sorted(set(model.fresh_weights) | {n for n, _ in model.named_parameters()
                                                                 if not n.startswith(model.base_model_prefix + ".")})
        with torch.no_grad():
            for name, module in model.named_modules():
                if not name.startswith(model.base_model_prefix) and name and hasattr(module, "reset_parameters"):
                    # transformers' init functions skip a tensor marked loaded (_is_hf_initialized): unmark
                    # it, or a head of the same shape for other labels keeps the checkpoint's weights
                    for p in module.parameters(recurse=False):
                        p._is_hf_initialized = False
                    model._init_weights(module)
    return model.train().requires_grad_(True)


def check_student_vocabulary(tokenizer, folder):
    """Refuse a --student checkpoint whose saved tokenizer is not the teacher's: the same ids must mean
    the same tokens to both, or the student learns from garbage. A checkpoint saved without its
    tokenizer is taken on trust (its embedding matrix's size is checked by the caller)."""
    try:
        own = AutoTokenizer.from_pretrained(folder)
    except Exception:  # no tokenizer files, or a format needing a missing package
        return
    if _has_vocabulary(own) and own.get_vocab() != tokenizer.get_vocab():
        theirs = tokenizer.get_vocab()
        token = next(t for t in sorted(set(own.get_vocab()) | set(theirs)) if own.get_vocab().get(t) != theirs.get(t))
        raise StudentError(f"--student {folder}: its tokenizer is not the teacher's ({len(own)} vs {len(tokenizer)} "
                           f"tokens; {token!r} is id {own.get_vocab().get(token)} vs {theirs.get(token)}); start from "
                           "a checkpoint of the teacher's tokenizer")


def load_tokenizer(teacher, teacher_path, tokenizer_path=None, masked_lm=True, words=False):
    """The teacher's fast tokenizer (or `tokenizer_path`'s), checked against the teacher's embeddings.
    masked_lm=False (a task run) does not ask for a mask token; words=True (token classification)
    loads a byte-level BPE tokenizer (RoBERTa's) with add_prefix_space, which words given one by
    one need, as transformers' token-classification example does."""
    source = tokenizer_path or teacher_path
    flag = "--tokenizer" if tokenizer_path else "--teacher"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if words:
            try:
                tokenizer(["a", "word"], is_split_into_words=True)
            except Exception:  # transformers refuses pre-split words to a byte-level BPE without it
                tokenizer = AutoTokenizer.from_pretrained(source, add_prefix_space=True)
    except (OSError, ValueError, TypeError) as e:
        raise StudentError(f"{flag} {source}: cannot load a tokenizer ({_first_line(e)}); "
                           "pass --tokenizer with a folder holding the teacher's tokenizer") from None
    if not tokenizer.is_fast:
        raise StudentError(f"{flag} {source}: only a slow (Python) tokenizer is available; "
                           "save the teacher's fast tokenizer (tokenizer.json) beside it")
    if not _has_vocabulary(tokenizer):
        # transformers builds the model class's tokenizer from nothing when a folder has no tokenizer files
        raise StudentError(f"{flag} {source}: no tokenizer files there (its tokenizer would hold only the "
                           f"{len(tokenizer)} special tokens); pass --tokenizer with a folder holding the teacher's "
                           "tokenizer (tokenizer.json, or vocab.txt, or vocab.json and merges.txt)")
    missing = [name for name in ("mask_token", "pad_token", "cls_token", "sep_token")
               if getattr(tokenizer, name) is None and (masked_lm or name != "mask_token")]
    if missing:
        raise StudentError(f"{flag} {source}: the tokenizer has no {', '.join(missing)}; "
                           f"a {'masked-LM' if masked_lm else 'BERT-family'} tokenizer needs "
                           f"{'mask, ' if masked_lm else ''}pad, cls and sep tokens")
    n_embeddings = teacher.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embeddings:
        raise StudentError(f"{flag} {source}: the tokenizer has {len(tokenizer)} tokens but the teacher's "
                           f"embedding matrix only {n_embeddings} rows; use the teacher's own tokenizer")
    pad_id = teacher.config.pad_token_id
    if pad_id is not None and tokenizer.pad_token_id != pad_id:
        raise StudentError(f"{flag} {source}: the tokenizer's pad id is {tokenizer.pad_token_id} but the "
                           f"teacher's is {pad_id}; use the teacher's own tokenizer")
    try:  # a tokenizer can load and still fail on text (a WordPiece vocabulary without its unknown token)
        tokenizer("Plain text: naïve café, 東京 and ☃.")
    except Exception as e:  # the Rust backend raises a bare Exception
        raise StudentError(f"{flag} {source}: the tokenizer fails on plain text ({_first_line(e)}); "
                           "use the teacher's own tokenizer") from None
    if tokenizer_path:
        check_same_tokenizer(tokenizer, teacher_path, tokenizer_path)
    return tokenizer


def check_same_tokenizer(tokenizer, teacher_path, tokenizer_path):
    """Refuse a --tokenizer whose vocabulary or special tokens differ from the teacher's own tokenizer.

    The teacher's own is loaded however it is stored (tokenizer.json; vocab.txt; vocab.json and
    merges.txt; a SentencePiece model; a hub name in the local cache): the same words in another
    order give other ids, and a student trained on them is garbage. Only a teacher whose own
    tokenizer cannot be loaded at all (no tokenizer files, or a format needing a missing package) is
    taken on trust: then --tokenizer is the only tokenizer there is.
    """
    try:
        own = AutoTokenizer.from_pretrained(teacher_path)
    except Exception:  # none there, or unreadable: transformers, tokenizers and sentencepiece raise many kinds
        return
    if not _has_vocabulary(own):  # a folder without tokenizer files gives an empty tokenizer of its class
        return
    own_vocab, theirs = own.get_vocab(), tokenizer.get_vocab()
    if own_vocab != theirs:
        token = next(t for t in sorted(set(own_vocab) | set(theirs), key=lambda t: own_vocab.get(t, theirs.get(t)))
                     if own_vocab.get(t) != theirs.get(t))
        raise StudentError(f"--tokenizer {tokenizer_path}: its vocabulary differs from the teacher's own tokenizer "
                           f"({len(theirs)} vs {len(own_vocab)} tokens; {token!r} is id {theirs.get(token)} vs "
                           f"{own_vocab.get(token)}); drop --tokenizer to use the teacher's")
    for name in ("mask_token", "cls_token", "sep_token", "pad_token", "unk_token"):
        if getattr(own, name) is not None and getattr(tokenizer, name) != getattr(own, name):
            raise StudentError(f"--tokenizer {tokenizer_path}: its {name} is {getattr(tokenizer, name)!r} but the "
                               f"teacher's own tokenizer's is {getattr(own, name)!r}; drop --tokenizer to use the "
                               "teacher's")


def save_student(student, tokenizer, out_dir):
    """Write the student and its tokenizer so that the Auto class of its kind (AutoModelForMaskedLM,
    AutoModelForSequenceClassification, AutoModelForTokenClassification) loads it from `out_dir`.

    Files go to a temporary folder first (OUT/.saving) and are moved in with config.json last, so a
    crash while saving never leaves a folder that looks like a finished model. Before they are
    moved, the saved model is loaded back and its logits compared with the student's
    (check_reloads): if they differ, a StudentError says so and the files stay in OUT/.saving,
    where no one takes them for a finished model (the run's checkpoints hold the trained weights).
    """
    tmp = os.path.join(out_dir, ".saving")
    os.makedirs(tmp, exist_ok=True)
    # a projection used only by the losses (add_projection) is not part of the Hugging Face model
    weights = {k: v for k, v in student.state_dict().items() if not k.startswith("distil_projection.")}
    student.save_pretrained(tmp, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    check_reloads(student, tokenizer, tmp)
    names = sorted(os.listdir(tmp), key=lambda name: name == "config.json")
    # transformers 5 writes model.safetensors through a private temporary file (mode 0600): on a shared
    # cluster no one else could load the student. Every file gets what the user's umask gives new files.
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


def check_reloads(student, tokenizer, folder, atol=1e-4):
    """Raise a StudentError unless the student's Auto class's from_pretrained(folder) computes its logits.

    Two sequences, [CLS]/[SEP]-framed: a sentence, and ids spread over the whole vocabulary (every
    row of the embeddings and the output layer has a chance to show a difference). Both models run
    in float32 and eval mode on the student's device; the largest difference must be within `atol`
    times the logits' scale (the attention functions of the two may differ: the trained student may
    capture attention, the reloaded one uses SDPA). Weights dropped or left at random on reload
    (ModernBERT's layer-0 LayerNorm) move the logits by far more.
    """
    n = min(16, usable_positions(student))
    ids = tokenizer("The cat sat on the mat, and a bird flew over the house.", add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    spread = [i for i in torch.linspace(0, len(tokenizer) - 1, 4 * n).long().tolist() if i not in special]
    spread = spread or [tokenizer.cls_token_id]  # (a vocabulary of special tokens alone: any ids will do)
    rows = [[tokenizer.cls_token_id] + (x * n)[:n - 2] + [tokenizer.sep_token_id] for x in (ids or spread, spread)]
    input_ids = torch.tensor(rows, device=student.device)
    try:
        reloaded = auto_class(student).from_pretrained(folder, dtype=torch.float32).to(student.device).eval()
    except Exception as e:
        raise StudentError(f"the saved student in {folder} does not load ({_first_line(e)}); the trained weights "
                           "are in the run's checkpoints") from None
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad(), torch.autocast(student.device.type, enabled=False):
            expected = student(input_ids=input_ids).logits.float()
            got = reloaded(input_ids=input_ids).logits.float()
    finally:
        student.train(was_training)
    diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
    if not diff <= atol * max(1.0, expected.abs().max().item()):
        raise StudentError(f"the saved student does not reload as trained: {auto_class(student).__name__}.from_pretrained({folder}) "
                           f"gives logits up to {diff:.3g} away from the trained student's; the files stay in {folder} "
                           "and the trained weights in the run's checkpoints; report it with the teacher's name")


def _has_vocabulary(tokenizer):
    """Whether the tokenizer has tokens besides its special ones."""
    return bool(set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens))


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
