"""Each loss against an explicit closed-form computation, plus the properties the loop relies on."""

import math

import pytest
import torch

from losses import cosine_loss, kd_loss, mlm_loss, mse_loss

torch.manual_seed(0)
N, V, D = 7, 11, 5


def explicit_kd(s, t, T):
    total = 0.0
    for row_s, row_t in zip(s.double().tolist(), t.double().tolist()):
        zs = [x / T for x in row_s]
        zt = [x / T for x in row_t]
        ls = math.log(sum(math.exp(x) for x in zs))
        lt = math.log(sum(math.exp(x) for x in zt))
        for a, b in zip(zs, zt):
            p_t = math.exp(b - lt)
            total += p_t * ((b - lt) - (a - ls))
    return T * T * total / len(s)


def test_kd_matches_closed_form():
    s, t = torch.randn(N, V), torch.randn(N, V)
    for T in (1.0, 2.0, 4.0):
        assert kd_loss(s, t, T).item() == pytest.approx(explicit_kd(s, t, T), rel=1e-5)


def test_kd_zero_for_equal_logits_and_positive_otherwise():
    s = torch.randn(N, V)
    assert kd_loss(s, s.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    # shifting all logits of a row by a constant leaves the distribution unchanged
    assert kd_loss(s, s + 3.0, 2.0).item() == pytest.approx(0.0, abs=1e-5)
    assert kd_loss(s, torch.randn(N, V), 2.0).item() > 0


def test_kd_temperature_squared_factor():
    s, t = torch.randn(N, V), torch.randn(N, V)
    T = 3.0
    plain = kd_loss(s / T, t / T, 1.0)  # KL of the softened distributions, no factor
    assert kd_loss(s, t, T).item() == pytest.approx(T * T * plain.item(), rel=1e-5)


def test_mlm_matches_closed_form_and_ignores_unlabelled_rows():
    s = torch.randn(N, V)
    labels = torch.tensor([3, -100, 0, 10, -100, 5, 1])
    expected = 0.0
    for row, y in zip(s.double().tolist(), labels.tolist()):
        if y != -100:
            expected -= row[y] - math.log(sum(math.exp(x) for x in row))
    assert mlm_loss(s, labels).item() == pytest.approx(expected / 5, rel=1e-6)
    assert mlm_loss(s, labels, denominator=10).item() == pytest.approx(expected / 10, rel=1e-6)


def test_cosine_matches_closed_form():
    s, t = torch.randn(N, D), torch.randn(N, D)
    expected = 0.0
    for a, b in zip(s.double().tolist(), t.double().tolist()):
        dot = sum(x * y for x, y in zip(a, b))
        expected += 1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
    assert cosine_loss(s, t).item() == pytest.approx(expected / N, rel=1e-5)
    assert cosine_loss(s, 2.5 * s).item() == pytest.approx(0.0, abs=1e-6)


def test_mse_sums_over_vocabulary_and_averages_over_rows():
    s, t = torch.randn(N, V), torch.randn(N, V)
    expected = sum((a - b) ** 2 for ra, rb in zip(s.double().tolist(), t.double().tolist())
                   for a, b in zip(ra, rb)) / N
    assert mse_loss(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_leading_dimensions_are_positions():
    s, t = torch.randn(2, 3, V), torch.randn(2, 3, V)
    flat_s, flat_t = s.reshape(6, V), t.reshape(6, V)
    assert kd_loss(s, t, 2.0).item() == pytest.approx(kd_loss(flat_s, flat_t, 2.0).item(), rel=1e-6)
    assert mse_loss(s, t).item() == pytest.approx(mse_loss(flat_s, flat_t).item(), rel=1e-6)
    h_s, h_t = torch.randn(2, 3, D), torch.randn(2, 3, D)
    assert cosine_loss(h_s, h_t).item() == pytest.approx(
        cosine_loss(h_s.reshape(6, D), h_t.reshape(6, D)).item(), rel=1e-6)
    labels = torch.tensor([[1, -100, 2], [-100, 4, 0]])
    assert mlm_loss(s, labels).item() == pytest.approx(mlm_loss(flat_s, labels.reshape(6)).item(), rel=1e-6)


def test_gradients_flow_to_the_student_only():
    s = torch.randn(N, V, requires_grad=True)
    t = torch.randn(N, V, requires_grad=True)
    hs = torch.randn(N, D, requires_grad=True)
    ht = torch.randn(N, D, requires_grad=True)
    (kd_loss(s, t, 2.0) + mse_loss(s, t) + cosine_loss(hs, ht)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert hs.grad is not None and hs.grad.abs().sum() > 0
    assert t.grad is None and ht.grad is None


def test_kd_gradient_is_T_times_probability_difference():
    # d/ds [T^2 KL(p_t || p_s)] = T (p_s - p_t): the closed form the docstring's "why T^2" relies on
    s = torch.randn(N, V, requires_grad=True)
    t = torch.randn(N, V)
    T = 2.0
    kd_loss(s, t, T, denominator=1.0).backward()
    expected = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1))
    torch.testing.assert_close(s.grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_the_float32_result(dtype):
    s, t = torch.randn(N, V).to(dtype), torch.randn(N, V).to(dtype)
    hs, ht = torch.randn(N, D).to(dtype), torch.randn(N, D).to(dtype)
    labels = torch.randint(0, V, (N,))
    pairs = [
        (kd_loss(s, t, 2.0), kd_loss(s.float(), t.float(), 2.0)),
        (mlm_loss(s, labels), mlm_loss(s.float(), labels)),
        (cosine_loss(hs, ht), cosine_loss(hs.float(), ht.float())),
        (mse_loss(s, t), mse_loss(s.float(), t.float())),
    ]
    for half, full in pairs:
        assert half.dtype == torch.float32
        assert half.item() == pytest.approx(full.item(), rel=1e-6, abs=1e-7)


def test_unselected_padding_rows_change_nothing():
    # A batch with padding: the caller selects the real rows; whatever sits in padding is ignored.
    s, t = torch.randn(2, 4, V), torch.randn(2, 4, V)
    keep = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    s2, t2 = s.clone(), t.clone()
    s2[~keep], t2[~keep] = 1e4, -1e4  # garbage in the padded positions
    assert kd_loss(s[keep], t[keep], 2.0).item() == kd_loss(s2[keep], t2[keep], 2.0).item()
    assert mse_loss(s[keep], t[keep]).item() == mse_loss(s2[keep], t2[keep]).item()
    labels = torch.randint(0, V, (2, 4))
    assert mlm_loss(s[keep], labels[keep]).item() == mlm_loss(s2[keep], labels[keep]).item()


def test_denominator_makes_micro_batches_sum_to_the_big_batch():
    # Two micro-batches with different numbers of labelled rows: dividing each by the total count
    # gives exactly the big-batch mean (dividing each by its own count would not).
    s = torch.randn(10, V)
    labels = torch.tensor([1, -100, 2, -100, -100, 3, 4, 5, 6, -100])
    big = mlm_loss(s, labels)
    n_total = (labels != -100).sum()
    parts = mlm_loss(s[:4], labels[:4], n_total) + mlm_loss(s[4:], labels[4:], n_total)
    assert parts.item() == pytest.approx(big.item(), rel=1e-6)
    naive = (mlm_loss(s[:4], labels[:4]) + mlm_loss(s[4:], labels[4:])) / 2
    assert naive.item() != pytest.approx(big.item(), rel=1e-3)
    t = torch.randn(10, V)
    assert (kd_loss(s[:3], t[:3], 2.0, 10) + kd_loss(s[3:], t[3:], 2.0, 10)).item() == pytest.approx(
        kd_loss(s, t, 2.0).item(), rel=1e-6)


def test_kd_blocks_of_rows_match_the_unchunked_formula():
    # A vocabulary large enough that the rows are processed in several blocks (8 rows each here).
    import torch.nn.functional as F
    s = torch.randn(21, 30000, requires_grad=True)
    t = torch.randn(21, 30000)
    T = 2.0
    reference = T * T * F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                                 reduction="sum") / 21
    reference.backward()
    expected_grad = s.grad.clone()
    s.grad = None
    loss = kd_loss(s, t, T)
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(s.grad, expected_grad, rtol=1e-4, atol=1e-9)


def test_kd_gradient_keeps_the_logits_dtype():
    # Under autocast the logits are bf16 and so is the gradient the head's backward consumes.
    s_half = torch.randn(N, V).to(torch.bfloat16).requires_grad_()
    t_half = torch.randn(N, V).to(torch.bfloat16)
    kd_loss(s_half, t_half, 2.0).backward()
    s_full = s_half.detach().float().requires_grad_()
    kd_loss(s_full, t_half.float(), 2.0).backward()
    assert s_half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s_half.grad.float(), s_full.grad, rtol=1e-2, atol=1e-4)


# ---- intermediate-layer losses ----

from losses import attention_kl_loss, attention_mse_loss, hidden_mse_loss, relation_loss  # noqa: E402


def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def _kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def test_hidden_mse_is_the_mean_over_elements():
    s, t = torch.randn(N, D), torch.randn(N, D)
    expected = sum((a - b) ** 2 for ra, rb in zip(s.tolist(), t.tolist()) for a, b in zip(ra, rb)) / (N * D)
    assert hidden_mse_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert hidden_mse_loss(s, t, denominator=2 * N).item() == pytest.approx(expected / 2, rel=1e-5)


def test_attention_kl_matches_closed_form_and_ignores_masked_keys():
    heads, keys = 3, 6
    s, t = torch.randn(N, heads, keys), torch.randn(N, heads, keys)
    key_mask = torch.ones(N, heads, keys)
    key_mask[:, :, 4:] = 0  # the last two keys are padding: the model adds the dtype's minimum there
    s_masked = s + (1 - key_mask) * torch.finfo(torch.float32).min
    t_masked = t + (1 - key_mask) * torch.finfo(torch.float32).min
    expected = 0.0
    for i in range(N):
        for h in range(heads):
            expected += _kl(_softmax(t[i, h, :4].tolist()), _softmax(s[i, h, :4].tolist()))
    value = attention_kl_loss(s_masked, t_masked)
    assert value.item() == pytest.approx(expected / (N * heads), rel=1e-5)
    s_req = s_masked.clone().requires_grad_()
    attention_kl_loss(s_req, t_masked).backward()
    assert torch.isfinite(s_req.grad).all() and (s_req.grad[:, :, 4:] == 0).all()


def test_attention_mse_averages_over_real_keys():
    heads, keys = 2, 5
    s, t = torch.randn(N, heads, keys), torch.randn(N, heads, keys)
    key_mask = torch.ones(N, heads, keys)
    key_mask[3:, :, 3:] = 0
    expected = 0.0
    for i in range(N):
        for h in range(heads):
            real = [k for k in range(keys) if key_mask[i, h, k] > 0]
            expected += sum((s[i, h, k] - t[i, h, k]).item() ** 2 for k in real) / len(real)
    assert attention_mse_loss(s, t, key_mask).item() == pytest.approx(expected / (N * heads), rel=1e-5)
    garbage = s.clone()
    garbage[key_mask == 0] = 1e6  # whatever sits at padded keys is ignored
    assert attention_mse_loss(garbage, t, key_mask).item() == pytest.approx(expected / (N * heads), rel=1e-5)
    assert attention_mse_loss(s, t).item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-5)


def test_relation_loss_matches_closed_form_across_widths():
    # teacher width 8, student width 4 (another hidden size), 2 relation heads, one padded position
    length, n_heads = 5, 2
    s, t = torch.randn(1, length, 4), torch.randn(1, length, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0]])

    def relations(x, i, r):  # softmax over real keys of x_r[i] . x_r[j] / sqrt(d_r)
        d = x.shape[-1] // n_heads
        xr = x[0, :, r * d:(r + 1) * d]
        return _softmax([(xr[i] @ xr[j]).item() / math.sqrt(d) for j in range(4)])

    expected = sum(_kl(relations(t, i, r), relations(s, i, r)) for i in range(4) for r in range(n_heads))
    assert relation_loss(s, t, mask, n_heads).item() == pytest.approx(expected / (4 * n_heads), rel=1e-5)
    padded = s.clone()
    padded[0, 4] = 100.0  # the padded position changes nothing
    assert relation_loss(padded, t, mask, n_heads).item() == pytest.approx(expected / (4 * n_heads), rel=1e-5)
    assert relation_loss(t, t, mask, n_heads).item() == pytest.approx(0.0, abs=1e-6)


def test_embedding_loss_matches_closed_form():
    from losses import embedding_loss  # (imported here: the file's import line belongs to the other losses)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    mse = sum(((s[i] - t[i]) ** 2).mean().item() for i in range(5)) / 5
    assert embedding_loss(s, t).item() == pytest.approx(mse, rel=1e-5)
    assert embedding_loss(s, t).item() == pytest.approx(torch.nn.MSELoss()(s, t).item(), rel=1e-5)  # sentence-transformers' MSELoss
    cos = sum(1 - (s[i] @ t[i]).item() / (s[i].norm() * t[i].norm()).item() for i in range(5)) / 5
    assert embedding_loss(s, t, kind="cos").item() == pytest.approx(cos, rel=1e-5)
    # a global denominator: the sum over rows divided by it; unit vectors: mse = 2/D * cos
    assert embedding_loss(s, t, denominator=10).item() == pytest.approx(mse / 2, rel=1e-5)
    u, v = torch.nn.functional.normalize(s, dim=-1), torch.nn.functional.normalize(t, dim=-1)
    assert embedding_loss(u, v).item() == pytest.approx(2 / 7 * embedding_loss(u, v, kind="cos").item(), rel=1e-5)
    assert embedding_loss(s[:0], t[:0]).item() == 0.0  # no rows: 0, not NaN
