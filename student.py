"""Build a student from some of a teacher's layers (loading teachers and saving students: pretrained.py).

The student is the teacher with fewer encoder layers (DistilBERT, Sanh et al. 2019, section 3):
same class, same embeddings, same MLM head, and a subset of the layers, copied in order. Nothing
here names a parameter: the layer list is found from the model's structure, so every BERT-family
masked LM that transformers has (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA generators, DeBERTa-v2,
multilingual and domain BERTs) works the same way.

`make_distilbert_student` instead converts a BERT teacher into DistilBERT's own architecture
(DistilBertForMaskedLM, as the released distilbert-base-uncased), exactly.
"""

import copy

import torch
from torch import nn
from transformers import BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM
from transformers.activations import ACT2FN


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
