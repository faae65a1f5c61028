"""Build a student from some of a teacher's layers; load teachers and save students in Hugging Face format.

The student is the teacher with fewer encoder layers (DistilBERT, Sanh et al. 2019, section 3):
same class, same embeddings, same MLM head, and a subset of the layers, copied in order. Nothing
here names a parameter: the layer list is found from the model's structure, so every BERT-family
masked LM that transformers has (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA generators, DeBERTa-v2,
multilingual and domain BERTs) works the same way.

`make_distilbert_student` instead converts a BERT teacher into DistilBERT's own architecture
(DistilBertForMaskedLM, as the released distilbert-base-uncased), exactly.
"""

import copy
import os

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, AutoTokenizer, BertForMaskedLM, DistilBertConfig,
                          DistilBertForMaskedLM)
from transformers.activations import ACT2FN
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING


class StudentError(ValueError):
    """A bad teacher, tokenizer or layer choice: the message says what is wrong and how to fix it."""


def default_layers(n_teacher_layers):
    """An evenly spread half of the teacher's layers, first and last included.

    For a 12-layer teacher this is DistilBERT's choice, [0, 2, 4, 7, 9, 11].
    """
    k = max(1, n_teacher_layers // 2)
    if k == 1:
        return [n_teacher_layers - 1] if n_teacher_layers > 1 else [0]
    return [round(i * (n_teacher_layers - 1) / (k - 1)) for i in range(k)]


def encoder_layers(model):
    """The model's list of transformer layers: the first ModuleList with one entry per layer."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and len({type(m) for m in module}) == 1:
            return module
    raise StudentError(f"cannot find the {n} encoder layers of {type(model).__name__}: a student keeps some of "
                       "the teacher's layers, so the teacher needs one module per layer, as BERT-family masked LMs "
                       "have (ALBERT shares one layer across its depth)")


def check_layers(layers, n_teacher_layers):
    """Validate a list of teacher layer indices (0-based) and return it as a list of ints;
    None stands for default_layers(n_teacher_layers)."""
    layers = default_layers(n_teacher_layers) if layers is None else list(layers)
    if not layers:
        raise StudentError("--layers is empty: give at least one teacher layer, e.g. --layers 0,2,4")
    bad = [i for i in layers if not 0 <= i < n_teacher_layers]
    if bad:
        raise StudentError(f"--layers {','.join(map(str, layers))}: layer(s) {bad} out of range; "
                           f"the teacher has {n_teacher_layers} layers, numbered 0 to {n_teacher_layers - 1}")
    if len(set(layers)) != len(layers):
        raise StudentError(f"--layers {','.join(map(str, layers))} repeats a layer; give each layer once")
    return layers


def make_student(teacher, layers=None, init="teacher"):
    """A model of the teacher's class with the teacher's `layers` (in that order).

    init="teacher" copies embeddings, the chosen layers and the MLM head (with its transform);
    init="random" builds the same shape with fresh weights (the "no teacher initialisation"
    ablation). The teacher is left untouched.
    """
    n = teacher.config.num_hidden_layers
    layers = check_layers(layers, n)
    student = copy.deepcopy(teacher)  # keeps tied weights tied, and any module outside the layer list
    student_layers = encoder_layers(student)
    kept = [student_layers[i] for i in layers]
    for i in reversed(range(n)):
        del student_layers[i]
    student_layers.extend(kept)
    config = student.config
    config.num_hidden_layers = len(layers)
    for key, value in list(config.to_dict().items()):  # per-layer settings (e.g. layer_types)
        if isinstance(value, list) and len(value) == n and key != "architectures":
            setattr(config, key, [value[i] for i in layers])
    if init == "random":
        student = type(teacher)(config)
    elif init != "teacher":
        raise StudentError(f"init={init!r}: use 'teacher' or 'random'")
    else:
        check_representable(teacher, student, layers, same_width=True)
    student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def _layer_names(model):
    """For each encoder layer, the sorted names of its weights and buffers (relative to the layer)."""
    return [sorted(layer.state_dict()) for layer in encoder_layers(model)]


def check_representable(teacher, student, layers, same_width):
    """Refuse, in one line, a student whose class cannot hold the teacher layers in the positions chosen.

    What --out holds is what `type(student)(student.config)` builds and loads the weights into, so
    the student must have exactly the weights that model has. Some families build their layers
    differently by position: ModernBERT's layer 0 has no attention LayerNorm (the embeddings' norm
    precedes it), so teacher layer 1 in the student's position 0 would lose its LayerNorm on
    saving, and the reloaded student would not be the trained one. The model the config describes
    is built on the meta device (no memory, no time) and its layers' weights compared, by name,
    with those of the teacher layers chosen for each position; with same_width, the whole
    state_dict is compared as well, shapes included. The message names a choice that works.
    """
    with torch.device("meta"):
        fresh = type(student)(copy.deepcopy(student.config))
    wanted, available = _layer_names(fresh), _layer_names(teacher)
    bad = [(j, i) for j, i in enumerate(layers) if available[i] != wanted[j]]
    choice = ",".join(map(str, layers))
    if bad:
        j, i = bad[0]
        lost = sorted(set(available[i]) ^ set(wanted[j]))
        # a choice that works: in each position, the chosen layer if it fits, else the nearest that does
        suggestion = []
        for position, layer in enumerate(layers):
            fits = [k for k in range(len(available)) if available[k] == wanted[position] and k not in suggestion]
            if not fits:
                suggestion = None
                break
            suggestion.append(layer if layer in fits else min(fits, key=lambda k: abs(k - layer)))
        hint = f"e.g. --layers {','.join(map(str, suggestion))}" if suggestion else "e.g. keep layer 0 first"
        raise StudentError(f"--layers {choice}: {type(student).__name__} cannot hold teacher layer {i} in the "
                           f"student's position {j} (the weights that differ: {', '.join(lost[:3])}"
                           f"{', ...' if len(lost) > 3 else ''}), so the saved student would not reload as trained; "
                           f"choose layers that fit their positions, {hint}")
    if same_width:
        mine = {k: tuple(v.shape) for k, v in student.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()))
            raise StudentError(f"--layers {choice}: the student does not match the model its config describes "
                               f"({', '.join(name for name, _ in diff[:3])}), so it could not be saved and reloaded "
                               "as trained; keep other layers, or report it with the teacher's name")


def make_narrow_student(teacher, layers=None, hidden_size=None, num_heads=None, init="teacher"):
    """A student of the teacher's class, narrower as well as shallower: `hidden_size` and `num_heads`
    of its own, the feed-forward width scaled by the same factor.

    init="teacher" starts every weight as the top-left block of the teacher's matching weight (the
    first rows and columns: the first heads' dimensions, the first hidden units), with the layers
    mapped through `layers`; init="random" starts from fresh weights. A student of the teacher's
    width is make_student's. Losses that compare hidden states (cosine, hidden) need
    add_projection; KD, MLM and the relation loss do not.
    """
    c = teacher.config
    layers = check_layers(layers, c.num_hidden_layers)
    hidden_size, num_heads = hidden_size or c.hidden_size, num_heads or c.num_attention_heads
    if hidden_size % num_heads or hidden_size > c.hidden_size:
        raise StudentError(f"--student-hidden {hidden_size} --student-heads {num_heads}: the hidden size must be a "
                           f"multiple of the heads and at most the teacher's {c.hidden_size}")
    config = copy.deepcopy(c)
    config.num_hidden_layers, config.hidden_size, config.num_attention_heads = len(layers), hidden_size, num_heads
    config.intermediate_size = c.intermediate_size * hidden_size // c.hidden_size
    if getattr(c, "embedding_size", None) == c.hidden_size:  # ELECTRA's embeddings follow the width
        config.embedding_size = hidden_size
    student = type(teacher)(config).to(teacher.device)
    if init == "teacher":
        check_representable(teacher, student, layers, same_width=False)
        # the layer list's own name (e.g. "bert.encoder.layer") maps student layer j to teacher layer layers[j]
        prefix = next(name for name, m in teacher.named_modules() if m is encoder_layers(teacher)) + "."
        source = dict(teacher.named_parameters())
        with torch.no_grad():
            for name, p in student.named_parameters():
                if name.startswith(prefix):
                    j, rest = name[len(prefix):].split(".", 1)
                    name = f"{prefix}{layers[int(j)]}.{rest}"
                p.copy_(source[name][tuple(slice(0, n) for n in p.shape)])
    elif init != "random":
        raise StudentError(f"init={init!r}: use 'teacher' or 'random'")
    return student.train().requires_grad_(True)


def add_projection(student, teacher_hidden_size, identity=True):
    """A learned map from the student's hidden size to the teacher's, for the losses that compare
    hidden states (TinyBERT's W_h). It is a submodule of the student, so the optimizer, the DDP
    wrap and the checkpoints cover it; save_student leaves it out of the saved model. identity=True
    starts it as [I; 0]: right for a student cut from the teacher's first dimensions."""
    projection = nn.Linear(student.config.hidden_size, teacher_hidden_size, bias=False).to(student.device)
    if identity:
        with torch.no_grad():
            projection.weight.copy_(torch.eye(teacher_hidden_size, student.config.hidden_size))
    student.distil_projection = projection
    return student


def build_student(teacher, layers=None, init="teacher", arch="teacher", hidden_size=None, num_heads=None,
                  compares_hidden_states=False):
    """The student train.py's flags ask for: the teacher's class or DistilBERT's, as wide as the
    teacher or narrower (with a projection when a loss compares hidden states)."""
    if arch == "distilbert":
        if hidden_size or num_heads:
            raise StudentError("--student-hidden/--student-heads do not combine with --student-arch distilbert")
        return make_distilbert_student(teacher, layers, init)
    if not (hidden_size or num_heads):
        return make_student(teacher, layers, init)
    student = make_narrow_student(teacher, layers, hidden_size, num_heads, init)
    if student.config.hidden_size != teacher.config.hidden_size and compares_hidden_states:
        add_projection(student, teacher.config.hidden_size, identity=init == "teacher")
    return student


def check_distilbert_teacher(teacher):
    """Raise a one-line StudentError if DistilBERT's architecture cannot compute what this teacher does."""
    config = teacher.config
    fix = "; drop --student-arch distilbert to keep the teacher's own architecture"
    if not isinstance(teacher, BertForMaskedLM):
        raise StudentError(f"--student-arch distilbert converts BERT teachers only, not {type(teacher).__name__}{fix}")
    if config.layer_norm_eps != 1e-12:  # DistilBERT hard-codes eps=1e-12 in all its LayerNorms
        raise StudentError(f"--student-arch distilbert: the teacher's LayerNorm epsilon is {config.layer_norm_eps:g}, "
                           f"DistilBERT's is fixed at 1e-12{fix}")
    if not (isinstance(config.hidden_act, str) and config.hidden_act in ACT2FN):
        raise StudentError(f"--student-arch distilbert: the teacher's activation {config.hidden_act!r} is not one "
                           f"DistilBERT can name (a transformers ACT2FN key){fix}")
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type != "absolute":  # DistilBERT has one table of learned absolute positions
        raise StudentError(f"--student-arch distilbert: the teacher uses position_embedding_type={position_type!r}, "
                           f"DistilBERT only absolute positions{fix}")
    if config.is_decoder:
        raise StudentError(f"--student-arch distilbert: the teacher is a decoder (causal attention), "
                           f"DistilBERT attends both ways{fix}")


def make_distilbert_student(teacher, layers=None, init="teacher"):
    """A DistilBertForMaskedLM with a BERT teacher's `layers` (in that order), converted exactly.

    With every layer the student computes the teacher's logits (up to float rounding); with a
    subset, those of make_student(teacher, layers). What DistilBERT lacks is folded in:
    - BERT adds a token-type (segment) embedding to every token; DistilBERT has none. Inputs here
      are single segments, so every token gets segment 0's row, a constant vector: adding it to
      every row of the position table gives the same sum word + position + type before the
      embedding LayerNorm, the only place these embeddings meet. Segment 1 is lost (type_vocab_size
      > 1 is accepted): use the student on single-segment inputs, as distillation does.
    - the MLM head: its transform (dense, activation, LayerNorm) becomes vocab_transform and
      vocab_layer_norm, its decoder (tied to the word embeddings, with its bias) vocab_projector.
    Each layer maps query/key/value/output to q_lin/k_lin/v_lin/out_lin, the attention and output
    LayerNorms to sa_layer_norm/output_layer_norm, the feed-forward to ffn.lin1/lin2.
    init="random" builds the same DistilBERT shape with fresh weights.
    """
    check_distilbert_teacher(teacher)
    if init not in ("teacher", "random"):
        raise StudentError(f"init={init!r}: use 'teacher' or 'random'")
    c = teacher.config
    layers = check_layers(layers, c.num_hidden_layers)
    config = DistilBertConfig(
        vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings, sinusoidal_pos_embds=False,
        n_layers=len(layers), n_heads=c.num_attention_heads, dim=c.hidden_size, hidden_dim=c.intermediate_size,
        activation=c.hidden_act, dropout=c.hidden_dropout_prob, attention_dropout=c.attention_probs_dropout_prob,
        initializer_range=c.initializer_range, pad_token_id=c.pad_token_id, tie_word_embeddings=c.tie_word_embeddings,
        chunk_size_feed_forward=c.chunk_size_feed_forward)  # qa/seq_classif dropouts: for later task heads
    student = DistilBertForMaskedLM(config).to(device=teacher.device, dtype=teacher.dtype)
    if init == "random":
        return student.train()
    bert, distil, head = teacher.bert, student.distilbert, teacher.cls.predictions
    pairs = [(distil.embeddings.word_embeddings, bert.embeddings.word_embeddings),
             (distil.embeddings.LayerNorm, bert.embeddings.LayerNorm),
             (student.vocab_transform, head.transform.dense), (student.vocab_layer_norm, head.transform.LayerNorm),
             (student.vocab_projector, head.decoder)]  # weight tied to the word embeddings unless the teacher's is not
    for block, i in zip(distil.transformer.layer, layers):
        t = bert.encoder.layer[i]
        pairs += [(block.attention.q_lin, t.attention.self.query), (block.attention.k_lin, t.attention.self.key),
                  (block.attention.v_lin, t.attention.self.value), (block.attention.out_lin, t.attention.output.dense),
                  (block.sa_layer_norm, t.attention.output.LayerNorm), (block.ffn.lin1, t.intermediate.dense),
                  (block.ffn.lin2, t.output.dense), (block.output_layer_norm, t.output.LayerNorm)]
    with torch.no_grad():
        for student_module, teacher_module in pairs:
            student_module.load_state_dict(teacher_module.state_dict())
        # segment 0's vector joins every position's: the LayerNorm sees the same word + position + segment sum
        distil.embeddings.position_embeddings.weight.copy_(
            bert.embeddings.position_embeddings.weight + bert.embeddings.token_type_embeddings.weight[0])
    return student.train()


def compile_layers(model):
    """torch.compile each encoder layer's forward on its own (one graph, reused by every layer), and
    leave the rest in Python: the embeddings, transformers' recording of hidden states (forward hooks
    on the layers, outside the compiled forward) and the row selection before the MLM head.

    transformers records attention maps through forward hooks on the attention modules, inside the
    layers, which read a ContextVar that torch.compile cannot trace: a graph break in every layer.
    Attention maps are never asked of the student (the attention losses capture their own), so those
    hooks are removed. They are installed at the first forward: call this after one.
    """
    for layer in encoder_layers(model):
        for module in layer.modules():
            for key, hook in list(module._forward_hooks.items()):
                if module is not layer and getattr(hook, "__name__", "") == "output_capturing_hook":
                    del module._forward_hooks[key]
        layer.forward = torch.compile(layer.forward)
    return model


def usable_positions(model):
    """How many tokens a sequence may have: RoBERTa-style models number positions from padding_idx + 1."""
    config = model.config
    embeddings = getattr(model.base_model, "embeddings", None)
    offset = embeddings.padding_idx + 1 if getattr(embeddings, "padding_idx", None) is not None else 0
    return config.max_position_embeddings - offset


def _means_local_folder(name_or_path):
    """True when the user means a folder on this machine, not a hub id: an existing folder, a string
    written as a path (./x, /x, ~/x), a name whose first part is a folder here (teachers/x when
    ./teachers exists), or one that no hub id can be (more than one "/": ids are NAME or OWNER/NAME)."""
    first = name_or_path.split("/")[0]
    return os.path.isdir(name_or_path) or name_or_path.startswith((".", "/", "~")) or \
        ("/" in name_or_path and os.path.isdir(first)) or name_or_path.count("/") > 1


def missing_folder_hint(name_or_path):
    """", the nearest existing: X" for a mistyped folder name, from the folders beside where it would be."""
    import difflib
    path = os.path.expanduser(name_or_path.rstrip("/"))
    parent = os.path.dirname(path) or "."
    while parent not in (".", "/", "") and not os.path.isdir(parent):  # the deepest folder that exists
        path, parent = parent, os.path.dirname(parent) or "."
    try:
        names = [n for n in os.listdir(parent) if os.path.isdir(os.path.join(parent, n))]
    except OSError:
        return ""
    near = difflib.get_close_matches(os.path.basename(path), names, n=1, cutoff=0.6)
    return f"; the nearest existing: {os.path.join(parent, near[0]) if parent != '.' else near[0]}" if near else ""


# A teacher fine-tuned on a task: its class names the task (transformers' architectures field).
TASK_CLASSES = {"ForSequenceClassification": AutoModelForSequenceClassification,
                "ForTokenClassification": AutoModelForTokenClassification}


def auto_class(model_or_config):
    """The Auto class that loads this model (or a model of this config) back: a task class or the masked LM."""
    architectures = getattr(model_or_config, "architectures", None) or []
    name = type(model_or_config).__name__ if isinstance(model_or_config, nn.Module) else " ".join(architectures)
    return next((cls for suffix, cls in TASK_CLASSES.items() if suffix in name), AutoModelForMaskedLM)


def task_kind(config):
    """What a task model predicts (one of distil.KINDS), from its config; None for a masked LM."""
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
        raise StudentError(f"--teacher {name_or_path}: no such folder{missing_folder_hint(name_or_path)}; pass a "
                           "folder holding config.json and the weights, or a Hugging Face hub name")
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
    if not os.path.isdir(os.path.expanduser(folder)):
        raise StudentError(f"--student {folder}: no such folder{missing_folder_hint(folder)}; pass the folder "
                           "save_pretrained wrote")
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
    if tokenizer_path and _means_local_folder(tokenizer_path) and not os.path.isdir(os.path.expanduser(tokenizer_path)):
        raise StudentError(f"--tokenizer {tokenizer_path}: no such folder{missing_folder_hint(tokenizer_path)}; pass "
                           "the folder holding the teacher's tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if words and _byte_level(tokenizer) and not getattr(tokenizer, "add_prefix_space", False):
            # A byte-level BPE (RoBERTa, GPT-2 style) spells a word after a space with its own tokens
            # ("Ġcat", not "cat"); words given one by one have no space before them. transformers 4 refused
            # them without add_prefix_space, transformers 5 encodes them without it, silently: always ask
            # for it, so each word is encoded as in running text, as run_ner.py fine-tunes its teachers.
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
    for name in names:
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


def _byte_level(tokenizer):
    """Whether a fast tokenizer splits text with a byte-level pre-tokenizer (RoBERTa's, GPT-2's)."""
    import json
    try:
        return '"ByteLevel"' in json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer"))
    except Exception:  # a slow tokenizer has no backend: load_tokenizer refuses it next
        return False


def _has_vocabulary(tokenizer):
    """Whether the tokenizer has tokens besides its special ones."""
    return bool(set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens))


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
