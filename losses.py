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
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
    n = _rows(student_logits) if denominator is None else denominator
    return kl * temperature**2 / n


def mlm_loss(student_logits, labels, denominator=None):
    """Masked-language-modelling cross-entropy on the true tokens (DistilBERT's L_mlm).

        mlm = -1/n * sum_{rows with label != -100} log softmax(s)[label]

    `labels` has the logits' leading shape; -100 marks a row that is not predicted. n defaults
    to the number of labelled rows (so the default is the usual mean cross-entropy).
    """
    labels = labels.reshape(-1)
    total = F.cross_entropy(student_logits.float().reshape(labels.numel(), -1), labels,
                            ignore_index=-100, reduction="sum")
    n = (labels != -100).sum() if denominator is None else denominator
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
