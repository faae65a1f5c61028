"""The distillation losses, as pure functions: tensors in, a scalar tensor out.

Conventions shared by every function here:
- Logits have shape (..., V) and hidden states (..., D). Every leading dimension indexes a
  position ("row"); the caller has already selected the rows that count (no padding is passed in).
- Each loss is a SUM over rows divided by `denominator`, which defaults to the number of rows the
  function was given. A training loop passes the number of rows counted over all ranks and all
  gradient-accumulation micro-steps instead: the sum of the micro-step losses is then exactly the
  mean over the whole global batch, however unevenly the masked positions fall between batches.
- Softmax, KL, cross-entropy and cosine are computed in float32 whatever the input dtype: in
  bf16/fp16 a softmax over a 30k-250k vocabulary loses the small probabilities that carry the
  teacher's "dark knowledge".
"""

import torch
import torch.nn.functional as F


def _rows(x):
    return x.shape[:-1].numel()


def kd_loss(student_logits, teacher_logits, temperature=2.0, denominator=None):
    """Knowledge distillation (Hinton et al. 2015; DistilBERT's L_ce).

        kd = T^2 / n * sum_rows KL( softmax(t / T) || softmax(s / T) )
           = T^2 / n * sum_rows sum_v p_t[v] * (log p_t[v] - log p_s[v])

    with s, t the student and teacher logits, T the temperature and n = `denominator` (default:
    the number of rows). Why T^2: the gradient of the softened KL with respect to the student
    logits is (p_s - p_t) / T, and p_s - p_t itself shrinks roughly as 1/T for large T, so the
    gradient scales as 1/T^2. Multiplying by T^2 keeps the KD term's pull comparable to the
    hard-label MLM term whatever temperature is chosen, so alpha_kd need not be retuned with T.
    The teacher's logits carry no gradient (they should come from a no-grad forward).

    Computed in chunks of rows (see _ChunkedKL): the same numbers as
    T^2 * F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True, reduction="sum") / n,
    without holding several float32 copies of the (rows, V) logits.
    """
    n = _rows(student_logits) if denominator is None else denominator
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    return _ChunkedKL.apply(s, t, float(temperature)) * temperature**2 / n


class _ChunkedKL(torch.autograd.Function):
    """sum_rows KL(softmax(t/T) || softmax(s/T)) and its gradient, one block of rows at a time.

    Autograd through log_softmax and kl_div keeps several float32 (rows, V) tensors alive and runs
    about a dozen passes over them: with a 30k vocabulary at every position that is gigabytes, and
    on a CPU it costs more than the whole student forward-backward. Here each block of rows is
    upcast, softmaxed and differentiated while it sits in cache; the gradient w.r.t. s, which is
    (p_s - p_t) / T, is written straight into one buffer of the logits' own dtype.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature):
        # On a CPU, ~1 MiB float32 blocks stay in cache; on a GPU, ~256 MiB blocks bound the memory
        # while keeping the kernel launches few.
        block_elements = (1 << 18) if student_logits.device.type == "cpu" else (1 << 26)
        rows_per_block = max(1, block_elements // student_logits.shape[-1])
        grad = torch.empty_like(student_logits) if student_logits.requires_grad else None
        kl = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        for i in range(0, student_logits.shape[0], rows_per_block):
            log_p_s = F.log_softmax(student_logits[i:i + rows_per_block].float() / temperature, dim=-1)
            log_p_t = F.log_softmax(teacher_logits[i:i + rows_per_block].float() / temperature, dim=-1)
            p_t = log_p_t.exp()
            kl += (p_t * (log_p_t - log_p_s)).sum()
            if grad is not None:
                grad[i:i + rows_per_block] = (log_p_s.exp() - p_t) / temperature
        ctx.save_for_backward(grad)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        (grad,) = ctx.saved_tensors
        return grad * grad_kl.to(grad.dtype), None, None


def mlm_loss(student_logits, labels, denominator=None):
    """Masked-language-modelling cross-entropy on the true tokens (DistilBERT's L_mlm).

        mlm = -1/n * sum_{rows with label != -100} log softmax(s)[label]

    `labels` has the logits' leading shape; -100 marks a row that is not predicted. n defaults
    to the number of labelled rows (so the default is the usual mean cross-entropy).
    """
    labels = labels.reshape(-1)
    logits = student_logits.reshape(labels.numel(), -1)
    labelled = labels != -100  # drop unlabelled rows before the softmax, not after
    total = F.cross_entropy(logits[labelled].float(), labels[labelled], reduction="sum")
    n = labelled.sum() if denominator is None else denominator
    return total / n


def cosine_loss(student_hidden, teacher_hidden, denominator=None):
    """Cosine embedding loss between hidden states (DistilBERT's L_cos, target +1).

        cos = 1/n * sum_rows (1 - <s, t> / (|s| |t|))

    It aligns the directions of the student's and the teacher's hidden vectors, not their
    norms. The student's hidden size must equal the teacher's.
    """
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.detach().float(), dim=-1)
    n = _rows(student_hidden) if denominator is None else denominator
    return (1.0 - cos).sum() / n


def mse_loss(student_logits, teacher_logits, denominator=None):
    """Squared error between logits, summed over the vocabulary (DistilBERT's optional L_mse).

        mse = 1/n * sum_rows sum_v (s[v] - t[v])^2

    This is the original DistilBERT normalisation (`MSELoss(reduction="sum") / n_rows`). Other
    implementations (the Catalyst-based project among them) also divide by the vocabulary size V,
    which makes the same alpha_mse V times weaker.
    """
    sq = F.mse_loss(student_logits.float(), teacher_logits.detach().float(), reduction="sum")
    n = _rows(student_logits) if denominator is None else denominator
    return sq / n


# ---------------------------------------------------------------------------------------------
# Intermediate-layer losses (off in the DistilBERT recipe; from the later literature)
# ---------------------------------------------------------------------------------------------

def hidden_mse_loss(student_hidden, teacher_hidden, denominator=None):
    """Hidden-state regression between a mapped pair of layers (TinyBERT, Jiao et al. 2020; PKD).

        hidden_mse = 1/n * sum_rows 1/D * sum_d (s[d] - t[d])^2

    i.e. the mean squared error over all elements when n is the number of rows, as TinyBERT's
    MSELoss. The student's hidden size must equal the teacher's (project it first otherwise).
    Its cosine counterpart is `cosine_loss`.
    """
    sq = F.mse_loss(student_hidden.float(), teacher_hidden.detach().float(), reduction="sum")
    n = _rows(student_hidden) if denominator is None else denominator
    return sq / (n * student_hidden.shape[-1])


def attention_kl_loss(student_scores, teacher_scores, denominator=None):
    """Self-attention distribution transfer (MiniLM, Wang et al. 2020).

        attn_kl = 1/n * sum_rows KL( softmax(t) || softmax(s) )

    Each row is one query position of one head; its entries are the attention scores
    (q.k / sqrt(d), with the padding mask added) over the key positions, so softmax gives the
    attention distribution. n defaults to the number of rows: the mean over heads and positions.
    The same computation as kd_loss at temperature 1 (masked keys have probability 0 in both).
    """
    return kd_loss(student_scores, teacher_scores, 1.0, denominator)


def attention_mse_loss(student_scores, teacher_scores, key_mask=None, denominator=None):
    """Attention-score regression (TinyBERT, Jiao et al. 2020).

        attn_mse = 1/n * sum_rows 1/K_row * sum_{real keys k} (s[k] - t[k])^2

    on the raw scores q.k / sqrt(d) before the padding mask and the softmax. Each row is one query
    position of one head; `key_mask` (same shape, 1 = real key) leaves padded keys out and K_row
    is the row's number of real keys. Without padding this is TinyBERT's mean over all elements.
    """
    sq = (student_scores.float() - teacher_scores.detach().float()) ** 2
    if key_mask is not None:
        sq = sq * key_mask
        per_row = sq.sum(-1) / key_mask.sum(-1).clamp(min=1)
    else:
        per_row = sq.mean(-1)
    n = _rows(student_scores) if denominator is None else denominator
    return per_row.sum() / n


def relation_scores(x, attention_mask, n_heads):
    """Scaled dot products of a layer's queries (or keys, or values) with themselves, per relation head.

    x: (B, L, D) with D divisible by n_heads; returns (B, L, n_heads, L) scores with padded keys masked.
    """
    b, length, d = x.shape
    heads = x.float().reshape(b, length, n_heads, d // n_heads).transpose(1, 2)  # (B, R, L, d_r)
    scores = heads @ heads.transpose(-1, -2) / (d // n_heads) ** 0.5  # (B, R, L, L)
    if attention_mask is not None:
        scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
    return scores.transpose(1, 2)


def relation_loss(student_x, teacher_x, attention_mask, n_heads, denominator=None):
    """Self-attention relation transfer (MiniLMv2, Wang et al. 2021), for one of q, k or v.

        relation = 1/n * sum_{real query positions i, relation heads r}
                   KL( softmax(T_r[i] . T_r^T / sqrt(d_t)) || softmax(S_r[i] . S_r^T / sqrt(d_s)) )

    where T_r, S_r are the teacher's and the student's vectors (all heads concatenated, (B, L, D))
    split into `n_heads` relation heads. The relations are L x L whatever the hidden sizes and head
    counts, so a student of another width needs no projection. n defaults to (real positions) x
    n_heads. MiniLMv2 sums this over q, k and v.
    """
    student_rel = relation_scores(student_x, attention_mask, n_heads)
    teacher_rel = relation_scores(teacher_x.detach(), attention_mask, n_heads)
    real = attention_mask != 0 if attention_mask is not None else torch.ones(student_x.shape[:2], dtype=torch.bool,
                                                                               device=student_x.device)
    return kd_loss(student_rel[real], teacher_rel[real], 1.0, denominator)
