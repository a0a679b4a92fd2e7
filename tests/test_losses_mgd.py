"""Tests for detkd.losses.mgd.MGDLoss against an independent computation with the module's weights."""

from __future__ import annotations

import pytest
import torch

from detkd.losses.mgd import MGDLoss

RTOL = 1e-5


def _close(a, b, rtol=RTOL, atol=0.0):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _feats(n, cs, ct, h, w, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, cs, h, w, generator=g, dtype=dtype).requires_grad_(True)
    t = (torch.randn(n, ct, h, w, generator=g, dtype=dtype) * 2).requires_grad_(True)
    return s, t


def _spatial_mask(n, h, w, seed, ratio=0.65):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, h, w, generator=g) > ratio).to(torch.float64)


# ---------------------------------------------------------------- independent reference
def ref_conv1x1(x, weight, bias):
    # weight (Co, Ci, 1, 1): out[n, o] = sum_i weight[o, i] * x[n, i] + bias[o]
    co = weight.shape[0]
    outs = [(weight[o, :, 0, 0].view(1, -1, 1, 1) * x).sum(1) + bias[o] for o in range(co)]
    return torch.stack(outs, dim=1)


def ref_conv3x3(x, weight, bias):
    # zero padding 1, stride 1; explicit sum over the 9 kernel offsets
    n, ci, h, w = x.shape
    xp = x.new_zeros(n, ci, h + 2, w + 2)
    xp[:, :, 1:-1, 1:-1] = x
    out = bias.view(1, -1, 1, 1).expand(n, -1, h, w)
    for dy in range(3):
        for dx in range(3):
            patch = xp[:, :, dy : dy + h, dx : dx + w]
            out = out + torch.einsum("oi,nihw->nohw", weight[:, :, dy, dx], patch)
    return out


def ref_mgd(s, t, keep_mask, align_w, align_b, w1, b1, w2, b2, alpha):
    t = t.detach()
    f = s if align_w is None else ref_conv1x1(s, align_w, align_b)
    g = ref_conv3x3(torch.clamp(ref_conv3x3(f * keep_mask, w1, b1), min=0), w2, b2)
    n = s.shape[0]
    total = s.new_zeros(())
    for i in range(n):
        for c in range(t.shape[1]):
            total = total + ((g[i, c] - t[i, c]) ** 2).sum()
    return alpha * total / n


def _params(m: MGDLoss):
    aw = ab = None
    if m.align is not None:
        aw, ab = m.align.weight, m.align.bias
    conv1, conv2 = m.generation[0], m.generation[2]
    return aw, ab, conv1.weight, conv1.bias, conv2.weight, conv2.bias


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "n,cs,ct,size",
    [(2, 16, 16, 40), (3, 16, 32, 20), (2, 64, 32, 10)],
)
def test_mgd_matches_reference_values_and_grads(n, cs, ct, size):
    torch.manual_seed(0)
    m = MGDLoss(cs, ct, alpha_mgd=2e-5, lambda_mgd=0.65).double()
    assert (m.align is None) == (cs == ct)
    s, t = _feats(n, cs, ct, size, size, seed=1)
    mask = _spatial_mask(n, size, size, seed=2)
    got = m(s, t, mask=mask)
    want = ref_mgd(s, t, mask, *_params(m), alpha=2e-5)
    _close(got, want)

    leaves = [s] + [p for p in _params(m) if p is not None]
    got_grads = torch.autograd.grad(m(s, t, mask=mask), leaves)
    want_grads = torch.autograd.grad(ref_mgd(s, t, mask, *_params(m), alpha=2e-5), leaves)
    for g, wg in zip(got_grads, want_grads):
        assert g.abs().sum() > 0
        _close(g, wg)


def test_mgd_generator_reproduces_reference_mask_convention():
    # reference: u = rand(N, 1, H, W); mask = where(u > 1 - lambda, 0, 1)
    lam, seed = 0.65, 123
    m = MGDLoss(16, 32, lambda_mgd=lam).double()
    s, t = _feats(2, 16, 32, 20, 20, seed=3)
    u = torch.rand(2, 1, 20, 20, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    keep = torch.where(u > 1 - lam, 0.0, 1.0).to(torch.float64)
    got = m(s, t, generator=torch.Generator().manual_seed(seed))
    _close(got, ref_mgd(s, t, keep, *_params(m), alpha=m.alpha_mgd))
    # same seed -> same loss; a different seed -> a different mask
    _close(m(s, t, generator=torch.Generator().manual_seed(seed)), got)
    assert not torch.allclose(m(s, t, generator=torch.Generator().manual_seed(seed + 1)), got)


def test_random_mask_ratio_and_shape():
    m = MGDLoss(8, 8, lambda_mgd=0.65)
    mask = m.random_mask(4, 100, 100, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (4, 1, 100, 100)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    masked = 1.0 - mask.mean().item()
    assert abs(masked - 0.65) < 0.01
    mc = MGDLoss(8, 24, lambda_mgd=0.5, mask_on_channel=True)
    assert mc.random_mask(3, 10, 10).shape == (3, 24, 1, 1)
    assert MGDLoss(8, 8, lambda_mgd=0.0).random_mask(2, 5, 5).min().item() == 1.0
    assert MGDLoss(8, 8, lambda_mgd=1.0).random_mask(2, 5, 5).max().item() == 0.0


def test_mgd_channel_mask_matches_reference():
    m = MGDLoss(16, 16, mask_on_channel=True).double()
    s, t = _feats(2, 16, 16, 10, 10, seed=4)
    keep = (torch.rand(2, 16, 1, 1, generator=torch.Generator().manual_seed(5)) > 0.65).double()
    _close(m(s, t, mask=keep), ref_mgd(s, t, keep, *_params(m), alpha=m.alpha_mgd))


def test_mgd_defaults_and_state_dict_names():
    m = MGDLoss(128, 256)
    assert m.alpha_mgd == 2e-5 and m.lambda_mgd == 0.65 and not m.mask_on_channel
    assert set(m.state_dict()) == {
        "align.weight", "align.bias",
        "generation.0.weight", "generation.0.bias",
        "generation.2.weight", "generation.2.bias",
    }
    assert m.align.kernel_size == (1, 1)
    assert m.generation[0].kernel_size == (3, 3) and m.generation[2].padding == (1, 1)
    assert set(MGDLoss(64, 64).state_dict()) == {
        "generation.0.weight", "generation.0.bias", "generation.2.weight", "generation.2.bias"
    }


def test_mgd_gradients_reach_student_and_module_only():
    m = MGDLoss(16, 32).double()
    s, t = _feats(2, 16, 32, 20, 20, seed=6)
    loss = m(s, t, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mgd_loss_scale_sum_over_chw_mean_over_batch():
    # a generator that outputs exactly zero -> loss = alpha * ||T||^2 / N
    m = MGDLoss(8, 8, alpha_mgd=0.5).double()
    for p in m.generation[2].parameters():
        torch.nn.init.zeros_(p)
    s, t = _feats(3, 8, 8, 10, 10, seed=7)
    _close(m(s, t), 0.5 * (t.detach() ** 2).sum() / 3)


def test_mgd_rejects_bad_shapes():
    m = MGDLoss(16, 32)
    with pytest.raises(ValueError):
        m(torch.randn(2, 32, 10, 10), torch.randn(2, 32, 10, 10))
    with pytest.raises(ValueError):
        m(torch.randn(2, 16, 10, 10), torch.randn(2, 32, 20, 20))
    with pytest.raises(ValueError):
        m(torch.randn(2, 16, 10, 10), torch.randn(2, 32, 10, 10), mask=torch.ones(2, 1, 20, 20))
    with pytest.raises(ValueError):
        MGDLoss(8, 8, lambda_mgd=1.5)


def test_mgd_autocast_reduces_in_float32():
    m = MGDLoss(16, 32)
    s, t = _feats(2, 16, 32, 10, 10, seed=8, dtype=torch.float32)
    mask = _spatial_mask(2, 10, 10, seed=9).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(s, t.to(torch.bfloat16), mask=mask)
    assert got.dtype == torch.float32
    want = m(s, t, mask=mask)
    _close(got, want, rtol=5e-2, atol=0.0)


# ---------------------------------------------------------------- sparse generator convolution
class _Spy:
    """Counts calls of ``_MaskedConv3x3.apply`` (the kept-positions-only convolution)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def apply(self, *args):
        self.calls += 1
        return self.fn.apply(*args)


def _sparse_dense(m, s, t, mask):
    out = []
    for sparse in (True, False):
        m.sparse_conv = sparse
        for p in [s, *m.parameters()]:
            p.grad = None
        loss = m(s, t, mask=mask)
        loss.backward()
        out.append([loss.detach()] + [p.grad.clone() for p in [s, *m.parameters()]])
    return out


@pytest.mark.parametrize("n,cs,ct,h,w", [(2, 16, 16, 12, 9), (3, 8, 12, 5, 7), (2, 4, 4, 1, 1), (1, 6, 6, 2, 3)])
def test_sparse_generator_conv_equals_dense(monkeypatch, n, cs, ct, h, w):
    """Kept positions only (borders, non-square maps, 1x1 maps, align conv): same loss and gradients."""
    import detkd.losses.mgd as mgd_module

    spy = _Spy(mgd_module._MaskedConv3x3)
    monkeypatch.setattr(mgd_module, "_MaskedConv3x3", spy)
    monkeypatch.setattr(mgd_module, "_SPARSE_MIN_POSITIONS", 0)
    torch.manual_seed(3)
    m = MGDLoss(cs, ct).double()
    s, t = _feats(n, cs, ct, h, w, seed=4)
    mask = _spatial_mask(n, h, w, seed=5)
    sparse, dense = _sparse_dense(m, s, t, mask)
    assert spy.calls == 1
    for a, b in zip(sparse, dense):
        _close(a, b, rtol=1e-10, atol=1e-14)
    _close(sparse[0], ref_mgd(s, t, mask, *_params(m), alpha=m.alpha_mgd))


def test_sparse_generator_conv_all_masked_and_random_masks(monkeypatch):
    import detkd.losses.mgd as mgd_module

    spy = _Spy(mgd_module._MaskedConv3x3)
    monkeypatch.setattr(mgd_module, "_MaskedConv3x3", spy)
    monkeypatch.setattr(mgd_module, "_SPARSE_MIN_POSITIONS", 0)
    m = MGDLoss(8, 8).double()
    s, t = _feats(2, 8, 8, 6, 6, seed=6)
    sparse, dense = _sparse_dense(m, s, t, torch.zeros(2, 1, 6, 6, dtype=torch.float64))
    for a, b in zip(sparse, dense):
        _close(a, b, rtol=1e-10, atol=1e-14)
    m.sparse_conv = True
    g1 = m(s, t, generator=torch.Generator().manual_seed(9))
    m.sparse_conv = False
    g2 = m(s, t, generator=torch.Generator().manual_seed(9))
    _close(g1, g2, rtol=1e-10)
    assert spy.calls == 2


@pytest.mark.parametrize("kind", ["soft", "channel", "mostly_kept", "float16", "disabled", "small_map"])
def test_dense_generator_conv_where_the_sparse_one_does_not_apply(monkeypatch, kind):
    import detkd.losses.mgd as mgd_module

    spy = _Spy(mgd_module._MaskedConv3x3)
    monkeypatch.setattr(mgd_module, "_MaskedConv3x3", spy)
    m = MGDLoss(8, 8).double()
    s, t = _feats(2, 8, 8, 6, 6, seed=7)
    mask = _spatial_mask(2, 6, 6, seed=8)
    if kind == "soft":
        mask = mask * 0.5
    elif kind == "channel":
        mask = (torch.rand(2, 8, 1, 1, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    elif kind == "mostly_kept":
        mask = torch.ones(2, 1, 6, 6, dtype=torch.float64)
        mask[0, 0, 0, 0] = 0
    elif kind == "disabled":
        m.sparse_conv = False
    if kind != "small_map":
        monkeypatch.setattr(mgd_module, "_SPARSE_MIN_POSITIONS", 0)
    if kind == "float16":
        m = m.half()
        m(s.detach().half(), t.detach().half(), mask=mask.half())
    else:
        _close(m(s, t, mask=mask), ref_mgd(s, t, mask, *_params(m), alpha=m.alpha_mgd))
    assert spy.calls == 0


def test_sparse_generator_conv_with_worker_threads_equals_dense(monkeypatch):
    """With two torch threads the images go to two single-threaded workers: same numbers."""
    import detkd.losses.mgd as mgd_module

    monkeypatch.setattr(mgd_module, "_SPARSE_MIN_POSITIONS", 0)
    threads = torch.get_num_threads()
    torch.manual_seed(11)
    m = MGDLoss(8, 12).double()
    s, t = _feats(5, 8, 12, 7, 6, seed=12)
    mask = _spatial_mask(5, 7, 6, seed=13)
    try:
        torch.set_num_threads(2)
        sparse, dense = _sparse_dense(m, s, t, mask)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(sparse, dense):
        _close(a, b, rtol=1e-10, atol=1e-14)
