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
"""

from dataclasses import dataclass

import torch

from losses import (attention_kl_loss, attention_mse_loss, cosine_loss, hidden_mse_loss, kd_loss, mlm_loss,
                    mse_loss, relation_loss)


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


def loss_rows(attention_mask, labels, cfg):
    """Boolean masks of the positions each loss reads: {"kd", "mlm", "cos"} -> (B, L) bool."""
    real = attention_mask != 0  # works on torch tensors and numpy arrays alike
    masked = labels != -100
    return {"kd": real if cfg.kd_on == "all" else masked, "mlm": masked, "cos": real}


def count_rows(batch, cfg):
    """How many rows each loss reads in `batch`: summed over ranks and micro-steps, the denominators."""
    return {name: int(rows.sum()) for name, rows in loss_rows(batch["attention_mask"], batch["labels"], cfg).items()}


def unwrap(model):
    """The model inside a DistributedDataParallel or torch.compile wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def forward_at_rows(model, input_ids, attention_mask, rows, output_hidden_states):
    """Run a masked LM, projecting onto the vocabulary only at `rows` (a (B, L) bool mask).

    The vocabulary projection (hidden -> 30k-250k logits) costs as much as several encoder layers
    and its output dwarfs every other activation, so the encoder's output is cut down to `rows`
    before the model's own MLM head sees it (a forward hook on the base model). This works for
    every masked-LM class whose forward is `head(base_model(...)[0])`, which is all of them.
    Returns the logits, shape (rows.sum(), V), and the hidden states (or None).
    """
    def keep_rows(module, args, output):
        output.last_hidden_state = output.last_hidden_state[rows]
        return output

    handle = unwrap(model).base_model.register_forward_hook(keep_rows)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    output_hidden_states=output_hidden_states)
    finally:
        handle.remove()
    return out.logits, out.hidden_states


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

    `batch` holds input_ids, attention_mask and labels (-100 where no token is predicted), on the
    models' device. `denominators` maps "kd", "mlm", "cos" to the row counts to divide by (see
    losses.py); None divides by this batch's own counts.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows = loss_rows(attention_mask, labels, cfg)
    denominators = denominators or {name: r.sum() for name, r in rows.items()}
    # The student's logits are needed where KD/MSE read them, else only at the masked positions.
    student_rows = rows["kd"] if cfg.needs_teacher_logits() else rows["mlm"]
    attn_pairs = [(t - 1, s - 1) for t, s in cfg.layer_map if t > 0 and s > 0]  # 0-based layers
    if cfg.needs_attention():
        wanted = attn_pairs if cfg.alpha_attn > 0 else attn_pairs[-1:]
        enable_capture(teacher, {t for t, _ in wanted})
        enable_capture(student, {s for _, s in wanted})

    teacher_logits = teacher_hidden = None
    if cfg.needs_teacher():
        # no_grad rather than inference_mode: inference tensors may not be saved for the
        # backward of the losses that read them (KL saves its target).
        with torch.no_grad():
            teacher_rows = student_rows if cfg.needs_teacher_logits() else torch.zeros_like(student_rows)
            teacher_logits, teacher_hidden = forward_at_rows(teacher, input_ids, attention_mask,
                                                             teacher_rows, cfg.needs_hidden_states())
    student_logits, student_hidden = forward_at_rows(student, input_ids, attention_mask, student_rows,
                                                     cfg.needs_hidden_states())

    real, n_real = rows["cos"], denominators["cos"]
    # A student narrower than its teacher compares hidden states through a learned projection.
    projection = getattr(unwrap(student), "distil_projection", None)
    project = projection if projection is not None else (lambda hidden: hidden)
    terms = {}
    if cfg.alpha_kd > 0:
        terms["kd"] = kd_loss(student_logits, teacher_logits, cfg.temperature, denominators["kd"])
    if cfg.alpha_mlm > 0:
        terms["mlm"] = mlm_loss(student_logits, labels[student_rows], denominators["mlm"])
    if cfg.alpha_cos > 0:
        terms["cos"] = cosine_loss(project(student_hidden[-1][real]), teacher_hidden[-1][real], n_real)
    if cfg.alpha_mse > 0:
        terms["mse"] = mse_loss(student_logits, teacher_logits, denominators["kd"])
    if cfg.alpha_hidden > 0:
        pair_loss = hidden_mse_loss if cfg.hidden_loss == "mse" else cosine_loss
        terms["hidden"] = sum(pair_loss(project(student_hidden[s][real]), teacher_hidden[t][real], n_real)
                              for t, s in cfg.layer_map) / len(cfg.layer_map)
    if cfg.alpha_attn > 0:
        terms["attn"] = sum(attention_loss(captured(student, s), captured(teacher, t), attention_mask, real, n_real, cfg)
                            for t, s in attn_pairs) / len(attn_pairs)
    if cfg.alpha_relation > 0:
        t, s = attn_pairs[-1]
        student_qkv, teacher_qkv = captured(student, s), captured(teacher, t)
        n_heads = cfg.relation_heads or student_qkv["query"].shape[1]
        merge = lambda x: x.transpose(1, 2).flatten(2)  # (B, heads, L, d) -> (B, L, heads * d)
        terms["relation"] = sum(relation_loss(merge(student_qkv[k]), merge(teacher_qkv[k]), attention_mask, n_heads,
                                              n_real * n_heads) for k in ("query", "key", "value"))
    weights = {"kd": cfg.alpha_kd, "mlm": cfg.alpha_mlm, "cos": cfg.alpha_cos, "mse": cfg.alpha_mse,
               "hidden": cfg.alpha_hidden, "attn": cfg.alpha_attn, "relation": cfg.alpha_relation}
    total = sum(weights[name] * value for name, value in terms.items())
    return total, {name: value.detach() for name, value in terms.items()}


def attention_loss(student_att, teacher_att, attention_mask, real, n_real, cfg):
    """ATTN for one pair of layers: rows are (real query position, head) pairs."""
    n_heads = student_att["scores"].shape[1]
    if teacher_att["scores"].shape[1] != n_heads:
        raise ValueError(f"attention losses need the same number of heads in teacher and student "
                         f"({teacher_att['scores'].shape[1]} vs {n_heads}); use the relation loss instead")
    by_query = lambda x: x.transpose(1, 2)[real]  # (B, heads, Lq, Lk) -> (rows, heads, Lk)
    if cfg.attn_loss == "kl":
        with_mask = lambda att: att["scores"] + att["mask"] if att["mask"] is not None else att["scores"]
        return attention_kl_loss(by_query(with_mask(student_att)), by_query(with_mask(teacher_att)), n_real * n_heads)
    keys = attention_mask[:, None, None, :].expand_as(student_att["scores"])
    return attention_mse_loss(by_query(student_att["scores"]), by_query(teacher_att["scores"]), by_query(keys),
                              n_real * n_heads)
