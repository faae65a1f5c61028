"""One distillation step: teacher forward (no grad), student forward, the weighted losses.

    loss = alpha_kd * KD + alpha_mlm * MLM + alpha_cos * COS + alpha_mse * MSE
         + alpha_hidden * HIDDEN + alpha_attn * ATTN + alpha_relation * RELATION

over the rows that each loss reads:
- KD and MSE: every non-padding position (kd_on="all", as the released DistilBERT) or only the
  masked ones (kd_on="masked", several times cheaper: the output projection onto the vocabulary
  then runs at 15% of the positions);
- MLM: the masked positions, against the true tokens;
- COS: every non-padding position, on the last hidden states;
- HIDDEN, ATTN, RELATION (off by default): every non-padding position, on the pairs of layers of
  `layer_map` (see DistilConfig).

`distil_step` is usable from any training loop: call it under your autocast context and
backpropagate the total. Only what the active losses read is computed: the teacher does not run
at all when no loss reads it, each model's vocabulary projection runs only at the rows a loss
reads, and attention internals are captured only for the layers an attention loss reads.

Nothing in the step reads a value back from the GPU, so the host queues the next kernels while the
GPU runs: which rows each loss reads is decided on the host, before the forward, from the numpy
attention mask and labels (`batch_rows`), and travels with the batch as index tensors; the losses
gather with `index_select`, and divide by row counts the host already knows. A batch without
padding runs with attention_mask=None, so the model builds no mask and SDPA takes its fastest
kernel; a padded batch gives the models their 4-D mask ready-made (prepared_mask), so that
transformers need not check the mask for padding, which reads it back. For a compiled step
(train.py --compile) the index tensors have fixed sizes, padded with rows that weigh zero
(batch_rows' masked_size), so that one graph serves every batch of a shape.
"""

from dataclasses import dataclass

import numpy as np
import torch

from losses import (attention_kl_loss, attention_mse_loss, cosine_loss, hidden_mse_loss, kd_loss, mlm_loss, mse_loss,
                    per_head_weights, relation_loss)


@dataclass
class DistilConfig:
    """The recipe. Defaults are those of the released DistilBERT (Sanh et al. 2019)."""
    temperature: float = 2.0
    alpha_kd: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    alpha_mse: float = 0.0
    kd_on: str = "masked"  # "all" or "masked": which positions KD and MSE read
    # Intermediate layers. layer_map pairs (teacher, student) layers numbered as in
    # `hidden_states`: 0 is the embedding output, i the output of the i-th layer counted from 1.
    alpha_hidden: float = 0.0
    hidden_loss: str = "mse"  # "mse" (TinyBERT) or "cos"; averaged over the pairs of layer_map
    alpha_attn: float = 0.0
    attn_loss: str = "kl"  # "kl" of attention distributions (MiniLM) or "mse" of raw scores (TinyBERT)
    alpha_relation: float = 0.0  # MiniLMv2 q-q, k-k, v-v relations of the last pair of layer_map
    relation_heads: int = 0  # 0: the student's number of attention heads
    layer_map: tuple = ()
    alpha_label: float = 0.0  # task runs: the hard-label loss on the task's labels (task_step)
    alpha_embed: float = 0.0  # sentence-embedding runs: the sentence embeddings' loss (embeddings.embedding_step)
    embed_loss: str = "mse"  # "mse" (sentence-transformers' MSELoss) or "cos"

    def needs_teacher(self):
        return any(w > 0 for w in (self.alpha_kd, self.alpha_mse, self.alpha_cos, self.alpha_hidden,
                                   self.alpha_attn, self.alpha_relation))

    def needs_teacher_logits(self):
        return self.alpha_kd > 0 or self.alpha_mse > 0

    def needs_hidden_states(self):
        return self.alpha_cos > 0 or self.alpha_hidden > 0

    def needs_attention(self):
        return self.alpha_attn > 0 or self.alpha_relation > 0


def default_layer_map(layers):
    """The student's layers paired with the teacher layers they were copied from, and the embeddings (0:0)."""
    return ((0, 0),) + tuple((t + 1, s + 1) for s, t in enumerate(layers))


def parse_layer_map(text, kept_layers, n_teacher_layers):
    """"t:s,t:s,..." as ((t, s), ...), checked against both depths; None: default_layer_map(kept_layers)."""
    if text is None:
        return default_layer_map(kept_layers)
    try:
        pairs = tuple((int(t), int(s)) for t, s in (pair.split(":") for pair in text.split(",") if pair.strip()))
    except ValueError:
        raise ValueError(f"--layer-map {text}: give teacher:student pairs separated by commas, e.g. 0:0,6:3,12:6")
    bad = [f"{t}:{s}" for t, s in pairs if not (0 <= t <= n_teacher_layers and 0 <= s <= len(kept_layers))]
    if not pairs or bad:
        raise ValueError(f"--layer-map {text}: {', '.join(bad) or 'no pairs'}; teacher layers are "
                         f"0..{n_teacher_layers} and student layers 0..{len(kept_layers)} (0 = the embeddings)")
    return pairs


def batch_rows(attention_mask, labels, masked_size=None):
    """Where the losses read, decided on the host: numpy (B, L) attention_mask and labels in,
    numpy int64 flat indices into the B * L positions out.

        real_rows:      every non-padding position (COS, HIDDEN, ATTN, RELATION; KD with kd_on="all")
        masked_rows:    the positions with a label (MLM; KD with kd_on="masked")
        masked_labels:  the labels there
        masked_in_real: where each masked row sits among the real rows (MLM when the logits are
                        computed at the real rows)
        padded:         a Python bool, False when every position is real
        n_real, n_masked: how many rows are real and masked (Python ints: the denominators' parts)
    Computed once per batch in the data loader's workers, never on the device.

    `masked_size` (a compiled step, whose graph wants the same shapes every batch): the row indices
    get fixed sizes, padded with rows that weigh zero (pad_rows): masked_rows to masked_size (their
    labels with -100), real_rows to B * L; real_weight and masked_weight go to the losses (see
    losses.py), which then give exactly the per-row means over the rows that count.
    data.masked_size gives the size no batch exceeds.
    """
    attention_mask, labels = np.asarray(attention_mask).reshape(-1), np.asarray(labels).reshape(-1)
    real, masked = np.flatnonzero(attention_mask), np.flatnonzero(labels != -100)
    rows = {"real_rows": real, "masked_rows": masked, "masked_labels": labels[masked].astype(np.int64),
            "masked_in_real": np.searchsorted(real, masked), "padded": len(real) < len(attention_mask),
            "n_real": len(real), "n_masked": len(masked)}
    if masked_size is None:
        return rows
    rows["real_rows"], rows["real_weight"] = pad_rows(real, len(attention_mask))
    rows["masked_rows"], rows["masked_weight"] = pad_rows(masked, masked_size)
    rows["masked_in_real"] = pad_rows(rows["masked_in_real"], masked_size)[0]
    rows["masked_labels"] = np.pad(rows["masked_labels"], (0, masked_size - len(masked)), constant_values=-100)
    return rows


def pad_rows(rows, size):
    """A row index padded to a fixed size for a compiled step: (rows then position 0 up to `size`,
    float32 weights: 1.0 for each of the rows, 0.0 for the padding). Raises ValueError if rows exceed size."""
    if len(rows) > size:
        raise ValueError(f"{len(rows)} rows, more than the fixed size {size} of the compiled step's row index")
    pad = size - len(rows)
    return np.pad(rows, (0, pad)), np.pad(np.ones(len(rows), np.float32), (0, pad))


def with_rows(batch):
    """`batch` with batch_rows' entries added if it lacks them. For callers whose batch did not come
    from data.make_batch: on tensors already on a GPU this reads the mask and labels back once."""
    if "real_rows" in batch:
        return batch
    cpu = lambda x: x.detach().cpu().numpy() if torch.is_tensor(x) else x
    device = batch["input_ids"].device if torch.is_tensor(batch["input_ids"]) else None
    rows = {k: torch.as_tensor(v, device=device) if isinstance(v, np.ndarray) else v
            for k, v in batch_rows(cpu(batch["attention_mask"]), cpu(batch["labels"])).items()}
    return {**batch, **rows}


def count_rows(batch, cfg):
    """How many rows each loss reads in `batch` (host ints, from the index lengths): summed over ranks
    and micro-steps, the denominators."""
    n_real, n_masked = batch.get("n_real", len(batch["real_rows"])), batch.get("n_masked", len(batch["masked_rows"]))
    return {"kd": n_real if cfg.kd_on == "all" else n_masked, "mlm": n_masked, "cos": n_real}


def unwrap(model):
    """The model inside a DistributedDataParallel or torch.compile wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def at_rows(x, rows):
    """(B, L, ...) -> (len(rows), ...): the positions at `rows` (flat int64 indices into the B * L
    positions, gathered with index_select), or all of them, flattened, when rows is None."""
    flat = x.flatten(0, 1)
    return flat if rows is None else flat.index_select(0, rows)


def prepared_mask(model, attention_mask):
    """The attention mask `model` builds from the (B, L) padding mask, built here, as the (B, 1, L, L)
    mask its attention functions take: boolean for SDPA, additive (0 or the dtype's minimum, in the
    embeddings' dtype) for eager attention and distil_capture, by transformers' own mask builder.

    Given a 2-D mask, transformers asks `padding_mask.all()` in every forward (to drop a mask that
    masks nothing), a read-back that drains a GPU's queue; given a 4-D mask, it uses it as it is.
    The batch is known to be padded (the caller passes None otherwise), so the answer is known:
    the mask is built without asking, exactly as the model would build it. Models whose attention
    does not go through transformers' attention functions (DeBERTa, MPNet: relative positions), or
    whose layers take different masks (ModernBERT's sliding windows), build their own masks: they
    get the 2-D mask, as before.
    """
    inner = unwrap(model)
    # one mask for every layer: not for models with sliding-window layers (ModernBERT builds a second mask)
    full_attention = all(kind == "full_attention" for kind in getattr(inner.config, "layer_types", None) or ())
    if attention_mask is None or not getattr(inner, "_supports_attention_backend", False) or not full_attention:
        return attention_mask
    from transformers.masking_utils import create_bidirectional_mask
    # only the shape, dtype and device of the embeddings are read: a zero-stride stand-in
    embeds = torch.empty((), dtype=inner.get_input_embeddings().weight.dtype,
                         device=attention_mask.device).expand(*attention_mask.shape, 1)
    return create_bidirectional_mask(config=inner.config, inputs_embeds=embeds, attention_mask=attention_mask,
                                     allow_is_bidirectional_skip=False)


def forward_at_rows(model, input_ids, attention_mask, rows, output_hidden_states):
    """Run a masked LM, projecting onto the vocabulary only at `rows` (int64 flat indices into the
    B * L positions, or None for all of them).

    The vocabulary projection (hidden -> 30k-250k logits) costs as much as several encoder layers
    and its output dwarfs every other activation, so the encoder's output is cut down to `rows`
    before the model's own MLM head sees it (a forward hook on the base model). This works for
    every masked-LM class whose forward is `head(base_model(...)[0])`, which is all of them.
    Returns the logits, shape (len(rows), V), and the hidden states (or None).
    """
    keep = row_hook(model)
    keep.update(on=True, rows=rows)
    try:
        out = model(input_ids=input_ids, attention_mask=prepared_mask(model, attention_mask),
                    output_hidden_states=output_hidden_states)
    finally:
        keep.update(on=False, rows=None)
    return out.logits, out.hidden_states


def row_hook(model):
    """What forward_at_rows keeps, {"on": bool, "rows": None (every position) or an index tensor},
    read by a forward hook on the model's base model. The hook is registered once, at the first
    call, and stays: registering one per call would break a compiled step's graph (torch.compile
    cannot trace the registration). Off (any other caller of the model), it changes nothing."""
    base = unwrap(model).base_model
    if not hasattr(base, "distil_keep_rows"):
        base.distil_keep_rows = {"on": False, "rows": None}
        base.register_forward_hook(_keep_rows)
    return base.distil_keep_rows


def _keep_rows(module, args, output):
    # read from the module (not a closure): a deep copy of the model (a student made from a teacher
    # that has run) then reads its own copy
    keep = module.distil_keep_rows
    if keep["on"]:
        output.last_hidden_state = at_rows(output.last_hidden_state, keep["rows"])
    return output


# ---- capturing attention internals (only when an attention or relation loss is on) ----
# transformers returns no queries, keys, values or pre-softmax scores, and its default SDPA
# attention returns no attention maps at all. So the models are switched to an attention function
# of our own: plain (eager) attention that keeps q, k, v and the scores on the attention module,
# in the layers an attention loss reads, and SDPA in all the others. The cost: those layers
# materialise the (B, heads, L, L) scores, as eager attention does.

def _attention_with_capture(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if not getattr(module, "distil_capture", False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = query @ key.transpose(2, 3) * scaling  # (B, heads, L, L), before the padding mask
    module.distil_captured = {"query": query, "key": key, "value": value, "scores": scores, "mask": attention_mask}
    masked_scores = scores + attention_mask if attention_mask is not None else scores
    probs = torch.nn.functional.dropout(masked_scores.softmax(-1), p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), probs


def check_capture(model):
    """Attention losses read attention through transformers' attention functions: say so if a model has none."""
    model = unwrap(model)
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{type(model).__name__} does not compute its attention through transformers' attention "
                         "functions (DeBERTa and MPNet add relative-position terms in their own), so attention and "
                         "relation losses cannot read it; use --alpha-hidden instead")


def _encoder_layers(model):
    """The model's list of transformer layers: the first ModuleList with one module per layer, all of
    one type (student.encoder_layers' rule, repeated here so that this file needs only losses.py)."""
    n = model.config.num_hidden_layers
    layers = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n
                   and len({type(x) for x in m}) == 1), None)
    if layers is None:
        raise ValueError(f"cannot find the {n} encoder layers of {type(model).__name__} to capture attention in")
    return layers


def enable_capture(model, layer_indices):
    """Route `model`'s attention through _attention_with_capture, capturing in layers `layer_indices` (0-based)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    check_capture(model)
    model = unwrap(model)
    if model.config._attn_implementation != "distil_capture":
        AttentionInterface.register("distil_capture", _attention_with_capture)
        AttentionMaskInterface.register("distil_capture", eager_mask)  # an additive mask, as eager attention takes
        model.set_attn_implementation("distil_capture")
    for i, layer in enumerate(_encoder_layers(model)):
        for module in layer.modules():
            module.distil_capture = i in layer_indices


def captured(model, layer_index):
    """What the attention of layer `layer_index` (0-based) kept in the last forward."""
    layer = _encoder_layers(unwrap(model))[layer_index]
    return next(m.distil_captured for m in layer.modules() if hasattr(m, "distil_captured"))


def distil_step(student, teacher, batch, cfg, denominators=None):
    """Losses of one (micro-)batch. Returns (weighted total, {term name: detached value}).

    `batch` holds input_ids, attention_mask and labels (-100 where no token is predicted), (B, L)
    int64 tensors on the models' device, and the index tensors of `batch_rows` (data.make_batch
    adds them on the host; without them `with_rows` finds them here, reading the batch back once).
    `denominators` maps "kd", "mlm", "cos" to the row counts to divide by (see losses.py: Python
    numbers or 0-d device tensors); None divides by this batch's own counts. A batch without a
    masked position adds 0 to the masked-position terms.
    """
    batch = with_rows(batch)
    input_ids = batch["input_ids"]
    # no padding (packed sequences): no mask at all, so the model builds none and SDPA runs its fastest kernel
    attention_mask = batch["attention_mask"] if batch["padded"] else None
    real_rows = batch["real_rows"] if batch["padded"] else None  # None: every position
    # rows of weight 0 pad the row indices of a compiled step to fixed sizes (batch_rows); None: all count
    real_weight = batch.get("real_weight") if batch["padded"] else None
    denominators = denominators or count_rows(batch, cfg)
    # The student's logits are needed where KD/MSE read them, else only at the masked positions.
    logits_at_real = cfg.needs_teacher_logits() and cfg.kd_on == "all"
    student_rows = real_rows if logits_at_real else batch["masked_rows"]
    kd_weight = real_weight if logits_at_real else batch.get("masked_weight")
    prepare_layer_losses(student, teacher, cfg)

    teacher_logits = teacher_hidden = None
    if cfg.needs_teacher():
        # no_grad rather than inference_mode: inference tensors may not be saved for the
        # backward of the losses that read them (KL saves its target).
        with torch.no_grad():
            teacher_rows = student_rows if cfg.needs_teacher_logits() else batch["masked_rows"][:0]
            teacher_logits, teacher_hidden = forward_at_rows(teacher, input_ids, attention_mask,
                                                             teacher_rows, cfg.needs_hidden_states())
    student_logits, student_hidden = forward_at_rows(student, input_ids, attention_mask, student_rows,
                                                     cfg.needs_hidden_states())

    terms = {}
    if cfg.alpha_kd > 0:
        terms["kd"] = kd_loss(student_logits, teacher_logits, cfg.temperature, denominators["kd"], kd_weight)
    if cfg.alpha_mlm > 0:
        # logits at the real rows: the masked ones among them (without padding, at their own flat index)
        masked_logits = student_logits.index_select(0, batch["masked_in_real"]) if logits_at_real else student_logits
        terms["mlm"] = mlm_loss(masked_logits, batch["masked_labels"], denominators["mlm"])
    if cfg.alpha_mse > 0:
        terms["mse"] = mse_loss(student_logits, teacher_logits, denominators["kd"], kd_weight)
    terms.update(layer_terms(student, teacher, student_hidden, teacher_hidden, attention_mask, real_rows,
                             denominators["cos"], cfg, real_weight))
    return weighted(terms, cfg)


def weighted(terms, cfg):
    """(the weighted total, the terms detached): each term times its cfg.alpha_<name>."""
    total = sum(getattr(cfg, f"alpha_{name}") * value for name, value in terms.items())
    return total, {name: value.detach() for name, value in terms.items()}


def layer_terms(student, teacher, student_hidden, teacher_hidden, attention_mask, real_rows, n_real, cfg,
                weights=None):
    """The losses between the models' layers, over the real positions (`real_rows`: flat indices,
    None for every position; `weights`: one per row, 0 for the padding of a compiled step's fixed
    sizes, or None): COS on the last hidden states, HIDDEN, ATTN and RELATION on the pairs of
    cfg.layer_map. The same for a masked LM and a task model: they read the encoder only."""
    at_real = lambda hidden: at_rows(hidden, real_rows)  # (B, L, D) -> (real rows, D)
    attn_pairs = [(t - 1, s - 1) for t, s in cfg.layer_map if t > 0 and s > 0]  # 0-based layers
    # A student narrower than its teacher compares hidden states through a learned projection.
    projection = getattr(unwrap(student), "distil_projection", None)
    project = projection if projection is not None else (lambda hidden: hidden)
    terms = {}
    if cfg.alpha_cos > 0:
        terms["cos"] = cosine_loss(project(at_real(student_hidden[-1])), at_real(teacher_hidden[-1]), n_real, weights)
    if cfg.alpha_hidden > 0:
        pair_loss = hidden_mse_loss if cfg.hidden_loss == "mse" else cosine_loss
        terms["hidden"] = sum(pair_loss(project(at_real(student_hidden[s])), at_real(teacher_hidden[t]), n_real,
                                        weights) for t, s in cfg.layer_map) / len(cfg.layer_map)
    if cfg.alpha_attn > 0:
        terms["attn"] = sum(attention_loss(captured(student, s), captured(teacher, t), attention_mask, real_rows,
                                           n_real, cfg, weights) for t, s in attn_pairs) / len(attn_pairs)
    if cfg.alpha_relation > 0:
        t, s = attn_pairs[-1]
        student_qkv, teacher_qkv = captured(student, s), captured(teacher, t)
        n_heads = cfg.relation_heads or student_qkv["query"].shape[1]
        merge = lambda x: x.transpose(1, 2).flatten(2)  # (B, heads, L, d) -> (B, L, heads * d)
        terms["relation"] = sum(relation_loss(merge(student_qkv[k]), merge(teacher_qkv[k]), attention_mask, n_heads,
                                              n_real * n_heads, real_rows, weights) for k in ("query", "key", "value"))
    return terms


def prepare_layer_losses(student, teacher, cfg):
    """Check cfg.layer_map against the active layer losses, and switch on attention capture in the
    layers the attention and relation losses read."""
    attn_pairs = [(t - 1, s - 1) for t, s in cfg.layer_map if t > 0 and s > 0]  # 0-based layers
    if cfg.needs_attention() and not attn_pairs:
        raise ValueError(f"attention and relation losses compare layers above 0 (the embeddings have no attention): "
                         f"layer_map {cfg.layer_map} has no such pair")
    if (cfg.alpha_hidden > 0) and not cfg.layer_map:
        raise ValueError("the hidden-state loss needs at least one pair of layers in layer_map")
    if cfg.needs_attention():
        wanted = attn_pairs if cfg.alpha_attn > 0 else attn_pairs[-1:]
        enable_capture(teacher, {t for t, _ in wanted})
        enable_capture(student, {s for _, s in wanted})


def probe_batch(student, length=8):
    """A short batch in which every position is labelled, on the student's device: what a masked-LM
    step reads everywhere (freeze_unreached's probe)."""
    device = next(student.parameters()).device
    input_ids = (torch.arange(length, device=device) % unwrap(student).get_input_embeddings().num_embeddings)[None]
    return with_rows({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids})


def freeze_unreached(student, probe_loss):
    """Stop training the student's parameters that no active loss reaches; returns their names.

    With only hidden states compared (alpha_hidden), the MLM head runs but nothing reads its logits;
    with a --layer-map that stops before the last layer, the layers after it feed nothing. Such
    parameters get no gradient, which DistributedDataParallel takes for an error ("Expected to have
    finished reduction in the prior iteration") unless it searches the graph every step
    (find_unused_parameters, slow, and it hides such mistakes). `probe_loss` is the run's step on a
    probe batch (probe_batch, or tasks.task_probe_batch): backpropagated here, the parameters left
    without a gradient keep the teacher's values and are saved as such.
    """
    probe_loss.backward()
    unreached = [name for name, p in student.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in student.named_parameters():
        p.grad = None
        if name in unreached:
            p.requires_grad_(False)
    return unreached


def attention_loss(student_att, teacher_att, attention_mask, real_rows, n_real, cfg, weights=None):
    """ATTN for one pair of layers: rows are (real query position, head) pairs; `real_rows` and
    `weights` (one per query row) as in layer_terms, `attention_mask` None when nothing is padded."""
    n_heads = student_att["scores"].shape[1]
    weights = per_head_weights(weights, n_heads)  # one weight per (query row, head)
    if teacher_att["scores"].shape[1] != n_heads:
        raise ValueError(f"attention losses need the same number of heads in teacher and student "
                         f"({teacher_att['scores'].shape[1]} vs {n_heads}); use the relation loss instead")

    by_query = lambda x: at_rows(x.transpose(1, 2), real_rows)  # (B, heads, Lq, Lk) -> (rows, heads, Lk)

    if cfg.attn_loss == "kl":
        # float32 before the mask: in fp16 the mask's minimum plus a negative score is -inf
        with_mask = lambda att: att["scores"].float() + att["mask"].float() if att["mask"] is not None \
            else att["scores"]
        return attention_kl_loss(by_query(with_mask(student_att)), by_query(with_mask(teacher_att)), n_real * n_heads,
                                 weights)
    keys = None
    if attention_mask is not None:
        keys = by_query(attention_mask[:, None, None, :].expand_as(student_att["scores"]))
    return attention_mse_loss(by_query(student_att["scores"]), by_query(teacher_att["scores"]), keys,
                              n_real * n_heads, weights)
