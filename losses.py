"""The distillation losses, as pure functions: tensors in, a scalar tensor out.

Conventions shared by every function here:
- Logits have shape (..., V) and hidden states (..., D). Every leading dimension indexes a
  position ("row"); the caller has already selected the rows that count (no padding is passed in).
- Each loss is a SUM over rows divided by `denominator`, which defaults to the number of rows the
  function was given. A training loop passes the number of rows counted over all ranks and all
  gradient-accumulation micro-steps instead: the sum of the micro-step losses is then exactly the
  mean over the whole global batch, however unevenly the masked positions fall between batches.
  The denominator may be a Python number or a 0-d tensor on the device (so a loop need not read it
  back from the GPU). Zero rows is legal: the sum is 0, and a denominator of 0 counts as 1, so a
  micro-batch (or a whole step) without a masked position adds 0 instead of crashing or dividing
  by zero.
- `weights` (optional, every loss): a float (rows,) tensor of 0s and 1s, the rows of weight 0 counting
  for nothing. A compiled step pads its row indices to a fixed size with such rows, so that the shapes,
  and the compiled graph, stay the same from batch to batch (distil.batch_rows); the loss is then
  exactly the per-row mean over the real rows, as without padding. None: every row counts.
- Nothing here reads a value back from the device (no .item(), no boolean-mask indexing): rows are
  selected by the caller, with index tensors computed on the host (see distil.py).
- Softmax, KL, cross-entropy and cosine are computed in float32 whatever the input dtype: in
  bf16/fp16 a softmax over a 30k-250k vocabulary loses the small probabilities that carry the
  teacher's "dark knowledge".
"""

import sys

import torch
import torch.nn.functional as F


def _rows(x):
    return x.shape[:-1].numel()


def _weighted_sum(per_row, weights):
    """The sum of per_row (rows,) over the rows, each times its weight when `weights` is given."""
    return per_row.sum() if weights is None else (per_row * weights).sum()


def per_head_weights(weights, n_heads):
    """Row weights (rows,) repeated for each of n_heads, as (rows * n_heads,): attention losses' rows."""
    return None if weights is None else weights[:, None].expand(-1, n_heads).reshape(-1)


def _per_row_mean(total, denominator, rows):
    """total / denominator (default: the number of rows), with 0 rows giving 0, not NaN. Only 0 is
    replaced: a loop dividing a global count by its number of ranks may pass fractions below 1."""
    n = rows if denominator is None else denominator
    if torch.is_tensor(n):
        return total / torch.where(n > 0, n, torch.ones_like(n))
    return total / (n if n > 0 else 1)


def kd_loss(student_logits, teacher_logits, temperature=2.0, denominator=None, weights=None):
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
    without holding several float32 copies of the (rows, V) logits. A teacher probability of
    exactly 0 (a masked key in attention_kl_loss) contributes 0, as in the limit p log p -> 0.

    student_logits, teacher_logits: (..., V), any float dtype; weights: (rows,) or None (see the
    module's docstring); returns a float32 scalar tensor.
    """
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    kl = _ChunkedKL.apply(s, t, float(temperature), weights)
    return _per_row_mean(kl * temperature**2, denominator, s.shape[0])


def _kl_block(student_block, teacher_block, temperature, weights=None):
    """KL summed over one block of rows (each times its weight, if given), and its gradient w.r.t.
    the student's logits (float32)."""
    log_p_s = F.log_softmax(student_block.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_block.float() / temperature, dim=-1)
    p_t = log_p_t.exp()
    # where p_t is 0 (a key masked with -inf) the term is 0: 0 * (-inf - x) would be NaN
    kl = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0)
    grad = (log_p_s.exp() - p_t) / temperature
    if weights is None:
        return kl.sum(), grad
    return (kl.sum(-1) * weights).sum(), grad * weights[:, None]


_warned = set()


def compiled_or_eager(fn, what, devices=("cuda",), **options):
    """`fn` run through torch.compile(fn, **options) on the `devices` types, decided once per process
    by compiling and running it at its first call there: compilation happens then, not when
    torch.compile() returns, so a try/except around torch.compile() alone catches nothing. If that
    first call fails (no C compiler, a broken Triton: Inductor raises BackendCompilerFailed), one
    line on stderr says so and `fn` runs eagerly from then on; it computes the same numbers, more
    slowly. A later compilation failure (a recompile for a new shape) falls back the same way.
    Elsewhere `fn` itself. The first tensor among the arguments says the device; devices=None: always
    compiled (the caller has decided)."""
    choice = {}

    def fall_back(error):
        choice["fn"] = fn
        if what in _warned:  # one line per compiled thing, not one per layer or per call
            return
        _warned.add(what)
        first = (str(error).strip().splitlines() or [""])[0]
        line = (f"warning: torch.compile of {what} failed ({type(error).__name__}: {first[:200]}); running it "
                "eagerly (the same numbers, slower)")
        try:  # above a tqdm progress bar if one is drawn (train.py's), not glued to its end
            from tqdm import tqdm
            tqdm.write(line, file=sys.stderr)
        except ImportError:
            print(line, file=sys.stderr, flush=True)

    def call(*args, **kwargs):
        if torch.compiler.is_compiling():  # inside a compiled step: traced into its graph
            return fn(*args, **kwargs)
        device = next((a.device for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
        if devices is not None and (device is None or device.type not in devices):
            return fn(*args, **kwargs)
        if "fn" not in choice:
            choice["fn"] = torch.compile(fn, **options)
            try:
                return choice["fn"](*args, **kwargs)
            except Exception as error:  # the first compilation: any failure means no working compiler
                fall_back(error)
                return fn(*args, **kwargs)
        try:
            return choice["fn"](*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            fall_back(error)
            return fn(*args, **kwargs)
    call.choice = choice  # {"fn": what runs} once decided (tests read it)
    return call


# On a GPU, _kl_block compiled into one fused kernel (it reads each block of logits once and writes its
# gradient once, instead of about 23 passes of separate kernels); on a CPU the eager function, which
# was as fast there and needs no compiler.
kl_block = compiled_or_eager(_kl_block, "the KL block (losses._kl_block)", dynamic=True)


class _ChunkedKL(torch.autograd.Function):
    """sum_rows KL(softmax(t/T) || softmax(s/T)) and its gradient, one block of rows at a time.

    Autograd through log_softmax and kl_div keeps several float32 (rows, V) tensors alive and runs
    about a dozen passes over them: with a 30k vocabulary at every position that is gigabytes, and
    on a CPU it costs more than the whole student forward-backward. Here each block of rows is
    upcast, softmaxed and differentiated while it sits in cache (on a GPU, in one compiled kernel);
    the gradient w.r.t. s, which is (p_s - p_t) / T, is written straight into one buffer: of the
    logits' dtype under bf16 (whose exponent range is float32's), but float32 under fp16, where the
    small gradients would flush to zero before the gradient scaler's factor reaches them.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature, weights=None):
        # On a CPU, ~1 MiB float32 blocks stay in cache; on a GPU, ~256 MiB blocks bound the memory
        # while keeping the kernel launches few.
        block_elements = (1 << 18) if student_logits.device.type == "cpu" else (1 << 26)
        rows_per_block = max(1, block_elements // max(1, student_logits.shape[-1]))
        grad_dtype = torch.float32 if student_logits.dtype == torch.float16 else student_logits.dtype
        grad = torch.empty_like(student_logits, dtype=grad_dtype) if student_logits.requires_grad else None
        kl = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        for i in range(0, student_logits.shape[0], rows_per_block):
            block = slice(i, i + rows_per_block)
            block_kl, block_grad = kl_block(student_logits[block], teacher_logits[block], temperature,
                                            None if weights is None else weights[block])
            kl += block_kl
            if grad is not None:
                grad[i:i + rows_per_block] = block_grad
        ctx.save_for_backward(grad)
        ctx.logits_dtype = student_logits.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        (grad,) = ctx.saved_tensors
        # the incoming factor (T^2 / n, and under fp16 the loss scale) is applied before any cast
        return (grad * grad_kl.to(grad.dtype)).to(ctx.logits_dtype), None, None, None


def cross_entropy_loss(student_logits, labels, denominator=None, weights=None):
    """Cross-entropy on the true labels: DistilBERT's L_mlm on masked tokens, the hard-label loss
    of a classification or token-classification task.

        ce = -1/n * sum_{rows with label != -100} log softmax(s)[label]

    `labels` has the logits' leading shape; -100 marks a row that is not predicted (skipped by
    cross_entropy's ignore_index: no boolean indexing, so no read-back from the device). n defaults
    to the number of labelled rows (so the default is the usual mean cross-entropy); the caller
    that selected only labelled rows (distil.py) passes its host-side count.
    """
    labels = labels.reshape(-1)
    logits = student_logits.reshape(-1, student_logits.shape[-1])
    if weights is None:
        total = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    else:
        total = _weighted_sum(F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none"), weights)
    n = (labels != -100).sum() if denominator is None else denominator
    return _per_row_mean(total, n, None)


mlm_loss = cross_entropy_loss  # the masked-LM loss is cross-entropy on the masked positions' true tokens


def cosine_loss(student_hidden, teacher_hidden, denominator=None, weights=None):
    """Cosine embedding loss between hidden states (DistilBERT's L_cos, target +1).

        cos = 1/n * sum_rows (1 - <s, t> / (|s| |t|))

    It aligns the directions of the student's and the teacher's hidden vectors, not their
    norms. The student's hidden size must equal the teacher's.
    """
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.detach().float(), dim=-1)
    return _per_row_mean(_weighted_sum(1.0 - cos, weights), denominator, _rows(student_hidden))


def mse_loss(student_logits, teacher_logits, denominator=None, weights=None):
    """Squared error between logits, summed over the vocabulary (DistilBERT's optional L_mse).

        mse = 1/n * sum_rows sum_v (s[v] - t[v])^2

    This is the original DistilBERT normalisation (`MSELoss(reduction="sum") / n_rows`). Other
    implementations (the Catalyst-based project among them) also divide by the vocabulary size V,
    which makes the same alpha_mse V times weaker.
    """
    if weights is None:
        sq = F.mse_loss(student_logits.float(), teacher_logits.detach().float(), reduction="sum")
    else:
        sq = _weighted_sum(((student_logits.float() - teacher_logits.detach().float()) ** 2).sum(-1), weights)
    return _per_row_mean(sq, denominator, _rows(student_logits))


def multi_label_kd_loss(student_logits, teacher_logits, temperature=2.0, denominator=None, weights=None):
    """Knowledge distillation for a multi-label task: each label is its own yes/no question, so the
    softened distributions are Bernoulli (sigmoid) ones, one per label.

        kd = T^2 / n * sum_rows 1/C * sum_c KL( Bern(sigmoid(t_c / T)) || Bern(sigmoid(s_c / T)) )

    i.e. the binary cross-entropy of the student against the teacher's softened probabilities,
    minus the teacher's own entropy, so that it is 0 when the two agree (as kd_loss). T^2 for the
    same reason as in kd_loss. logits: (..., C), any float dtype; returns a float32 scalar.
    """
    s, t = student_logits.float() / temperature, teacher_logits.detach().float() / temperature
    p_t = torch.sigmoid(t)
    kl = (F.binary_cross_entropy_with_logits(s, p_t, reduction="none")
          - F.binary_cross_entropy_with_logits(t, p_t, reduction="none"))
    return _per_row_mean(_weighted_sum(kl.mean(-1), weights) * temperature**2, denominator, _rows(student_logits))


def binary_cross_entropy_loss(student_logits, targets, denominator=None, weights=None):
    """The hard-label loss of a multi-label task (transformers' BCEWithLogitsLoss when n = rows).

        bce = -1/n * sum_rows 1/C * sum_c [y_c log sigmoid(s_c) + (1 - y_c) log(1 - sigmoid(s_c))]

    targets: (..., C), 1.0 where the label applies and 0.0 where not; returns a float32 scalar.
    """
    bce = F.binary_cross_entropy_with_logits(student_logits.float(), targets.float(), reduction="none")
    return _per_row_mean(_weighted_sum(bce.mean(-1), weights), denominator, _rows(student_logits))


def regression_loss(student_predictions, targets, denominator=None, weights=None):
    """Squared error of a regression head (STS-B): against the gold scores as the hard-label loss,
    against the teacher's predictions as its KD (a regression has no distribution to soften, so
    no temperature).

        reg = 1/n * sum_rows 1/C * sum_c (s_c - y_c)^2

    predictions, targets: (..., C) with C outputs (1 for STS-B); transformers' MSELoss when n = rows.
    """
    sq = (student_predictions.float() - targets.detach().float()) ** 2
    return _per_row_mean(_weighted_sum(sq.mean(-1), weights), denominator, _rows(student_predictions))


# ---------------------------------------------------------------------------------------------
# Intermediate-layer losses (off in the DistilBERT recipe; from the later literature)
# ---------------------------------------------------------------------------------------------

def hidden_mse_loss(student_hidden, teacher_hidden, denominator=None, weights=None):
    """Hidden-state regression between a mapped pair of layers (TinyBERT, Jiao et al. 2020; PKD).

        hidden_mse = 1/n * sum_rows 1/D * sum_d (s[d] - t[d])^2

    i.e. the mean squared error over all elements when n is the number of rows, as TinyBERT's
    MSELoss. The student's hidden size must equal the teacher's (project it first otherwise).
    Its cosine counterpart is `cosine_loss`.
    """
    if weights is None:
        sq = F.mse_loss(student_hidden.float(), teacher_hidden.detach().float(), reduction="sum")
    else:
        sq = _weighted_sum(((student_hidden.float() - teacher_hidden.detach().float()) ** 2).sum(-1), weights)
    return _per_row_mean(sq / student_hidden.shape[-1], denominator, _rows(student_hidden))


def attention_kl_loss(student_scores, teacher_scores, denominator=None, weights=None):
    """Self-attention distribution transfer (MiniLM, Wang et al. 2020).

        attn_kl = 1/n * sum_rows KL( softmax(t) || softmax(s) )

    Each row is one query position of one head; its entries are the attention scores
    (q.k / sqrt(d), with the padding mask added) over the key positions, so softmax gives the
    attention distribution. n defaults to the number of rows: the mean over heads and positions.
    The same computation as kd_loss at temperature 1 (masked keys have probability 0 in both).
    """
    return kd_loss(student_scores, teacher_scores, 1.0, denominator, weights)


def attention_mse_loss(student_scores, teacher_scores, key_mask=None, denominator=None, weights=None):
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
    return _per_row_mean(_weighted_sum(per_row.reshape(-1), weights), denominator, _rows(student_scores))


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


def relation_loss(student_x, teacher_x, attention_mask, n_heads, denominator=None, query_rows=None, weights=None):
    """Self-attention relation transfer (MiniLMv2, Wang et al. 2021), for one of q, k or v.

        relation = 1/n * sum_{real query positions i, relation heads r}
                   KL( softmax(T_r[i] . T_r^T / sqrt(d_t)) || softmax(S_r[i] . S_r^T / sqrt(d_s)) )

    where T_r, S_r are the teacher's and the student's vectors (all heads concatenated, (B, L, D))
    split into `n_heads` relation heads. The relations are L x L whatever the hidden sizes and head
    counts, so a student of another width needs no projection. MiniLMv2 sums this over q, k and v.
    `attention_mask` (B, L), 1 = real, or None: padded keys are left out of each softmax;
    `query_rows` (int64, flat indices into the B * L positions, computed on the host) are the query
    positions that count; None: the real ones of attention_mask (found on the device: a read-back
    a training step avoids by passing them); `weights`, one per query row. n defaults to (query
    rows) x n_heads.
    """
    if query_rows is None and attention_mask is not None:
        query_rows = attention_mask.reshape(-1).nonzero().squeeze(1)
    student_rel = relation_scores(student_x, attention_mask, n_heads).flatten(0, 1)  # (B * L, R, L)
    teacher_rel = relation_scores(teacher_x.detach(), attention_mask, n_heads).flatten(0, 1)
    if query_rows is not None:
        student_rel, teacher_rel = student_rel.index_select(0, query_rows), teacher_rel.index_select(0, query_rows)
    return kd_loss(student_rel, teacher_rel, 1.0, denominator, per_head_weights(weights, n_heads))


def embedding_loss(student_embeddings, teacher_embeddings, denominator=None, kind="mse"):
    """Sentence-embedding distillation: one row per text, the embeddings as the models output them
    (after pooling, Dense and Normalize modules). (..., D) each, any float dtype; a float32 scalar.

        mse = 1/n * sum_rows 1/D * sum_d (s[d] - t[d])^2       (kind="mse")
        cos = 1/n * sum_rows (1 - cos(s, t))                   (kind="cos")

    "mse" is sentence-transformers' MSELoss (nn.MSELoss() over the (n, D) embeddings, a mean over
    both), the loss of its distillation example; dividing by D keeps alpha comparable across
    widths. For unit-length embeddings (a Normalize module) mse = 2/D * cos, so the two differ by a
    constant factor there and by the embeddings' lengths otherwise.
    """
    s, t = student_embeddings.float(), teacher_embeddings.detach().float()
    if kind == "cos":
        total = (1 - F.cosine_similarity(s, t, dim=-1)).sum()
    elif kind == "mse":
        total = F.mse_loss(s, t, reduction="sum") / s.shape[-1]
    else:
        raise ValueError(f"embedding loss {kind!r}: use 'mse' or 'cos'")
    return _per_row_mean(total, denominator, _rows(s))
