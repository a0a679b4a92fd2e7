"""Tests for detkd.losses.logits against plain, loop-based implementations of the published formulas."""

from __future__ import annotations

import math

import pytest
import torch

from detkd.losses.logits import kd_loss, sigmoid_kd_loss

RTOL = 1e-5
A_FULL = 40 * 40 + 20 * 20 + 10 * 10  # 2100 anchors: a 320 px input at strides 8/16/32


def _randn(shape, seed, scale=3.0, shift=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype) * scale + shift).requires_grad_(True)


def _rand(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=dtype)


def _close(a, b, rtol=RTOL, atol=0.0):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# ---------------------------------------------------------------- independent references
def _log_softmax_row(z):
    """log softmax of a 1-D tensor, written out: z - max - log(sum(exp(z - max)))."""
    m = z.max()
    return z - m - torch.log(torch.exp(z - m).sum())


def ref_kd(s, t, T, reduction="batchmean", weight=None):
    """Hinton KD per the paper: T^2 * sum_k p_t (log p_t - log p_s), classes on dim 1, loop over rows."""
    n, k = s.shape[:2]
    s3 = s.reshape(n, k, -1)
    t3 = t.detach().reshape(n, k, -1)
    w2 = None if weight is None else weight.reshape(n, -1)
    # rows as (n, position) pairs; unbind (not indexing) keeps the autograd graph cheap
    s_rows = s3.permute(0, 2, 1).reshape(-1, k).unbind(0)
    t_rows = t3.permute(0, 2, 1).reshape(-1, k).unbind(0)
    w_rows = None if w2 is None else w2.reshape(-1).unbind(0)
    cols = []
    for r in range(len(s_rows)):
        log_ps = _log_softmax_row(s_rows[r] / T)
        log_pt = _log_softmax_row(t_rows[r] / T)
        elem = torch.exp(log_pt) * (log_pt - log_ps) * T * T
        if w_rows is not None:
            elem = elem * w_rows[r]
        cols.append(elem)
    elems = torch.stack(cols)  # (n * P, k)
    if reduction == "none":
        return elems.reshape(n, -1, k).permute(0, 2, 1).reshape(s.shape)
    total = elems.sum()
    if reduction == "batchmean":
        return total / n
    if reduction == "mean":
        return total / s.numel()
    return total


def ref_sigmoid_kd(s, t, T=1.0, beta=2.0, focal=True, weight=None, avg_factor=None, reduction="mean"):
    """PP-YOLOE distill QFL, probability form: BCE(p, q) * |p - q|^beta, sum over classes, loop over rows."""
    k = s.shape[-1]
    s2 = s.reshape(-1, k)
    t2 = t.detach().reshape(-1, k)
    w2 = None
    if weight is not None:
        w2 = weight.reshape(-1, k) if weight.shape == s.shape else weight.reshape(-1, 1).expand(-1, k)
    s_rows, t_rows = s2.unbind(0), t2.unbind(0)
    w_rows = None if w2 is None else w2.unbind(0)
    rows = []
    for r in range(len(s_rows)):
        p = 1.0 / (1.0 + torch.exp(-s_rows[r] / T))
        q = 1.0 / (1.0 + torch.exp(-t_rows[r] / T))
        bce = -(q * torch.log(p) + (1.0 - q) * torch.log(1.0 - p))
        if focal:
            bce = bce * torch.abs(p - q) ** beta
        if w_rows is not None:
            bce = bce * w_rows[r]
        rows.append(bce)
    elems = torch.stack(rows)
    if reduction == "none":
        return elems.reshape(s.shape)
    if reduction == "sum":
        return elems.sum()
    per_row = elems.sum(1)
    if avg_factor is not None:
        return per_row.sum() / avg_factor
    return per_row.mean()


# ---------------------------------------------------------------- kd_loss
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_matches_reference_2d(reduction, T):
    s = _randn((4, 80), 0)
    t = _randn((4, 80), 1, scale=4.0)
    out = kd_loss(s, t, temperature=T, reduction=reduction)
    ref = ref_kd(s, t, T, reduction)
    _close(out, ref)
    go = torch.ones_like(out) if reduction == "none" else None
    _close(torch.autograd.grad(out, s, go)[0], torch.autograd.grad(ref, s, go)[0])


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_kd_matches_reference_dense_with_weight(reduction):
    # (N, K, A): classes on dim 1, as mmrazor's KLDivergence expects
    n, k, a = 2, 20, 300
    s = _randn((n, k, a), 2)
    t = _randn((n, k, a), 3)
    w = _rand((n, a), 4)
    out = kd_loss(s, t, temperature=2.0, reduction=reduction, weight=w)
    ref = ref_kd(s, t, 2.0, reduction, weight=w)
    _close(out, ref)
    _close(_grad(out, s), _grad(ref, s))


def test_kd_full_anchor_set_anchors_first_layout():
    # detkd dense layout (N, A, K) is passed transposed; compare against a transposed reference
    n, a, k = 2, A_FULL, 3
    s = _randn((n, a, k), 5)
    t = _randn((n, a, k), 6)
    out = kd_loss(s.transpose(1, 2), t.transpose(1, 2), temperature=3.0)
    ref = ref_kd(s.transpose(1, 2), t.transpose(1, 2), 3.0)
    _close(out, ref)
    _close(_grad(out, s), _grad(ref, s))


def test_kd_zero_when_equal_and_shift_invariant():
    s = _randn((3, 10, 7), 7)
    _close(kd_loss(s, s.detach().clone(), temperature=2.0), s.new_zeros(()), atol=1e-12)
    # adding a per-position constant to all classes does not change the softmax
    shift = _randn((3, 1, 7), 8).detach()
    t = _randn((3, 10, 7), 9)
    _close(kd_loss(s + shift, t, 2.0), kd_loss(s, t, 2.0))
    assert kd_loss(s, t).item() > 0


def test_kd_gradient_formula_and_teacher_gets_no_grad():
    # d/ds [T^2 * sum KL] = T * (p_s - p_t); batchmean divides by N
    T, n = 3.0, 4
    s = _randn((n, 12), 10)
    t = _randn((n, 12), 11)
    loss = kd_loss(s, t, temperature=T)
    loss.backward()
    p_s = torch.exp(s.detach() / T) / torch.exp(s.detach() / T).sum(1, keepdim=True)
    p_t = torch.exp(t.detach() / T) / torch.exp(t.detach() / T).sum(1, keepdim=True)
    _close(s.grad, T * (p_s - p_t) / n)
    assert t.grad is None


def test_kd_high_temperature_limit_is_logit_matching():
    # Hinton sec. 2.1: T^2 KL -> 1/(2K) sum_k (d_k - mean d)^2, d = s - t, as T -> infinity
    s = _randn((2, 16), 12, scale=1.0)
    t = _randn((2, 16), 13, scale=1.0)
    d = (s - t).detach()
    d = d - d.mean(1, keepdim=True)
    limit = (d * d).sum() / (2 * 16) / 2  # batchmean over N = 2
    err = {T: abs(kd_loss(s, t, temperature=T).item() - limit.item()) for T in (10.0, 1e3, 1e4)}
    assert err[1e3] < 1e-3 * limit.item()
    # the gap closes like 1/T: it is real at T = 10 and shrinks ~10x per decade of T
    assert err[1e4] < err[1e3] / 5 < err[10.0] / 25


def test_kd_half_inputs_are_upcast():
    s = _randn((4, 80), 14).detach()
    t = _randn((4, 80), 15).detach()
    out = kd_loss(s.half(), t.half(), temperature=2.0)
    assert out.dtype == torch.float32
    _close(out.double(), kd_loss(s.half().double(), t.half().double(), temperature=2.0), rtol=1e-5)


def test_kd_rejects_bad_arguments():
    s = torch.zeros(2, 5)
    with pytest.raises(ValueError):
        kd_loss(s, torch.zeros(2, 6))
    with pytest.raises(ValueError):
        kd_loss(s, s, reduction="avg")
    with pytest.raises(ValueError):
        kd_loss(s, s, temperature=0.0)
    with pytest.raises(ValueError):
        kd_loss(s, s, weight=torch.ones(5))


# ---------------------------------------------------------------- sigmoid_kd_loss
@pytest.mark.parametrize("focal", [True, False])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_sigmoid_kd_matches_reference_mean(focal, T):
    n, a, k = 2, 700, 20
    s = _randn((n, a, k), 20)
    t = _randn((n, a, k), 21)
    out = sigmoid_kd_loss(s, t, temperature=T, quality_focal=focal)
    ref = ref_sigmoid_kd(s, t, T=T, focal=focal)
    _close(out, ref)
    _close(_grad(out, s), _grad(ref, s))


def test_sigmoid_kd_full_anchor_set_with_avg_factor():
    # PP-YOLOE normalisation: sum over classes and anchors / assigned-score sum (pos_num)
    n, a, k = 2, A_FULL, 3
    s = _randn((n, a, k), 22)
    t = _randn((n, a, k), 23)
    avg = torch.tensor(37.25, dtype=torch.float64)
    out = sigmoid_kd_loss(s, t, avg_factor=avg)
    ref = ref_sigmoid_kd(s, t, avg_factor=avg)
    _close(out, ref)
    _close(_grad(out, s), _grad(ref, s))


@pytest.mark.parametrize("per_anchor", [True, False])
def test_sigmoid_kd_weights_and_other_reductions(per_anchor):
    n, a, k = 3, 200, 80
    s = _randn((n, a, k), 24)
    t = _randn((n, a, k), 25)
    w = _rand((n, a) if per_anchor else (n, a, k), 26)
    for reduction in ("sum", "none"):
        out = sigmoid_kd_loss(s, t, weight=w, beta=1.0, reduction=reduction)
        ref = ref_sigmoid_kd(s, t, beta=1.0, weight=w, reduction=reduction)
        _close(out, ref)
        go = torch.ones_like(out) if reduction == "none" else None
        _close(torch.autograd.grad(out, s, go)[0], torch.autograd.grad(ref, s, go)[0])


def test_sigmoid_kd_mean_is_per_anchor_class_sum_averaged():
    s = _randn((2, 50, 8), 27)
    t = _randn((2, 50, 8), 28)
    total = sigmoid_kd_loss(s, t, reduction="sum")
    _close(sigmoid_kd_loss(s, t), total / 100)  # 100 anchors, not 800 elements


def test_sigmoid_kd_zero_at_teacher_and_bce_gradient_formula():
    s = _randn((2, 30, 5), 29)
    same = s.detach().clone()
    # focal form: exactly zero at s == t
    _close(sigmoid_kd_loss(s, same), s.new_zeros(()), atol=1e-15)
    # plain BCE: value is the teacher's entropy, gradient is zero
    plain = sigmoid_kd_loss(s, same, quality_focal=False, reduction="sum")
    q = torch.sigmoid(same)
    _close(plain, -(q * torch.log(q) + (1 - q) * torch.log(1 - q)).sum())
    _close(_grad(plain, s), torch.zeros_like(s), atol=1e-12)
    # gradient of summed plain BCE with temperature: (sigma(s/T) - sigma(t/T)) / T, no T^2 factor
    T = 3.0
    t = _randn((2, 30, 5), 30)
    g = _grad(sigmoid_kd_loss(s, t, temperature=T, quality_focal=False, reduction="sum"), s)
    _close(g, (torch.sigmoid(s.detach() / T) - torch.sigmoid(t.detach() / T)) / T)


def test_sigmoid_kd_teacher_gets_no_grad_and_half_upcast():
    s = _randn((2, 40, 6), 31)
    t = _randn((2, 40, 6), 32)
    sigmoid_kd_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    out = sigmoid_kd_loss(s.detach().half(), t.detach().half())
    assert out.dtype == torch.float32
    _close(out.double(), sigmoid_kd_loss(s.detach().half().double(), t.detach().half().double()))


def test_sigmoid_kd_rejects_bad_arguments():
    s = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError):
        sigmoid_kd_loss(s, torch.zeros(2, 4, 2))
    with pytest.raises(ValueError):
        sigmoid_kd_loss(s, s, reduction="sum", avg_factor=2.0)
    with pytest.raises(ValueError):
        sigmoid_kd_loss(s, s, weight=torch.ones(2, 3))
    with pytest.raises(ValueError):
        sigmoid_kd_loss(s, s, temperature=-1.0)
    assert math.isfinite(sigmoid_kd_loss(s, s).item())
