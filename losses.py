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
        rows_per_block = max(1, (1 << 18) // student_logits.shape[-1])  # ~1 MiB of float32 per block
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
