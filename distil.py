"""One distillation step: teacher forward (no grad), student forward, the weighted losses.

    loss = alpha_kd * KD + alpha_mlm * MLM + alpha_cos * COS + alpha_mse * MSE

over the rows that each loss reads:
- KD and MSE: every non-padding position (kd_on="all", as the released DistilBERT) or only the
  masked ones (kd_on="masked", several times cheaper: the output projection onto the vocabulary
  then runs at 15% of the positions);
- MLM: the masked positions, against the true tokens;
- COS: every non-padding position, on the last hidden states.

`distil_step` is usable from any training loop: call it under your autocast context and
backpropagate the total. Only what the active losses read is computed: the teacher does not run
at all when no loss reads it, and each model's vocabulary projection runs only at the rows a loss
reads.
"""

from dataclasses import dataclass

import torch

from losses import cosine_loss, kd_loss, mlm_loss, mse_loss


@dataclass
class DistilConfig:
    """The recipe. Defaults are those of the released DistilBERT (Sanh et al. 2019)."""
    temperature: float = 2.0
    alpha_kd: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    alpha_mse: float = 0.0
    kd_on: str = "masked"  # "all" or "masked": which positions KD and MSE read

    def needs_teacher(self):
        return self.alpha_kd > 0 or self.alpha_mse > 0 or self.alpha_cos > 0

    def needs_teacher_logits(self):
        return self.alpha_kd > 0 or self.alpha_mse > 0


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

    teacher_logits = teacher_hidden = None
    if cfg.needs_teacher():
        # no_grad rather than inference_mode: inference tensors may not be saved for the
        # backward of the losses that read them (KL saves its target).
        with torch.no_grad():
            teacher_rows = student_rows if cfg.needs_teacher_logits() else torch.zeros_like(student_rows)
            teacher_logits, teacher_hidden = forward_at_rows(teacher, input_ids, attention_mask,
                                                             teacher_rows, cfg.alpha_cos > 0)
    student_logits, student_hidden = forward_at_rows(student, input_ids, attention_mask, student_rows,
                                                     cfg.alpha_cos > 0)

    terms = {}
    if cfg.alpha_kd > 0:
        terms["kd"] = kd_loss(student_logits, teacher_logits, cfg.temperature, denominators["kd"])
    if cfg.alpha_mlm > 0:
        terms["mlm"] = mlm_loss(student_logits, labels[student_rows], denominators["mlm"])
    if cfg.alpha_cos > 0:
        terms["cos"] = cosine_loss(student_hidden[-1][rows["cos"]], teacher_hidden[-1][rows["cos"]],
                                   denominators["cos"])
    if cfg.alpha_mse > 0:
        terms["mse"] = mse_loss(student_logits, teacher_logits, denominators["kd"])
    weights = {"kd": cfg.alpha_kd, "mlm": cfg.alpha_mlm, "cos": cfg.alpha_cos, "mse": cfg.alpha_mse}
    total = sum(weights[name] * value for name, value in terms.items())
    return total, {name: value.detach() for name, value in terms.items()}
