"""Tests for detkd.losses.features against plain, loop-based implementations of the published formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from detkd.losses.features import at_loss, cwd_loss, fitnet_loss, pkd_loss

RTOL = 1e-5
# (N, C, H, W) for FPN-like levels
LEVELS = [(2, 16, 40, 40), (3, 64, 20, 20), (4, 256, 10, 10)]


def _pair(shape, seed, t_channels=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    s = (torch.randn(shape, generator=g, dtype=dtype) * 1.5 + 0.3).requires_grad_(True)
    t = (torch.randn((n, t_channels or c, h, w), generator=g, dtype=dtype) * 2.0 - 0.5).requires_grad_(True)
    return s, t


def _close(a, b, rtol=RTOL, atol=0.0):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def _assert_teacher_gets_no_grad(fn, s, t):
    loss = fn(s, t)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


# ---------------------------------------------------------------- independent references
def ref_fitnet(s, t, reduction="mean", normalize=False):
    n = s.shape[0]
    total = s.new_zeros(())
    count = 0
    for i in range(n):
        si, ti = s[i], t[i].detach()
        if normalize:
            si = si / torch.sqrt((si * si).sum())
            ti = ti / torch.sqrt((ti * ti).sum())
        for c in range(s.shape[1]):
            d = si[c] - ti[c]
            total = total + (d * d).sum()
            count += d.numel()
    if reduction == "mean":
        return total / count
    if reduction == "batchmean":
        return total / n
    return total


def ref_cwd(s, t, tau):
    n, c = s.shape[:2]
    t = t.detach()
    total = s.new_zeros(())
    for i in range(n):
        for k in range(c):
            xs = s[i, k].reshape(-1) / tau
            xt = t[i, k].reshape(-1) / tau
            # softmax / log-softmax written out with the max shift
            ms, mt = xs.max().detach(), xt.max()
            log_zs = ms + torch.log(torch.exp(xs - ms).sum())
            log_zt = mt + torch.log(torch.exp(xt - mt).sum())
            log_ps, log_pt = xs - log_zs, xt - log_zt
            pt = torch.exp(log_pt)
            total = total + (pt * (log_pt - log_ps)).sum()
    return total * tau * tau / (n * c)


def ref_pkd_level(s, t):
    n, c, h, w = s.shape
    t = t.detach()
    m = n * h * w
    total = s.new_zeros(())
    for k in range(c):
        zs_zt = []
        for x in (s[:, k].reshape(-1), t[:, k].reshape(-1)):
            mean = x.sum() / m
            std = torch.sqrt(((x - mean) ** 2).sum() / (m - 1))
            zs_zt.append((x - mean) / (std + 1e-6))
        total = total + ((zs_zt[0] - zs_zt[1]) ** 2).sum()
    return total / (n * c * h * w) / 2


def ref_attention(x):
    n, c = x.shape[:2]
    maps = []
    for i in range(n):
        q = sum(x[i, k] ** 2 for k in range(c)) / c
        q = q.reshape(-1)
        maps.append(q / torch.sqrt((q * q).sum()))
    return torch.stack(maps)


def ref_at(s, t):
    d = ref_attention(s) - ref_attention(t.detach())
    return (d * d).sum() / d.numel()


# ---------------------------------------------------------------- FitNets
@pytest.mark.parametrize("shape", LEVELS)
@pytest.mark.parametrize(
    "reduction,normalize", [("mean", False), ("sum", False), ("batchmean", False), ("batchmean", True)]
)
def test_fitnet_matches_reference(shape, reduction, normalize):
    s, t = _pair(shape, seed=1)
    got = fitnet_loss(s, t, reduction=reduction, normalize=normalize)
    want = ref_fitnet(s, t, reduction, normalize)
    _close(got, want)
    _close(_grad(got, s), _grad(ref_fitnet(s, t, reduction, normalize), s))


def test_fitnet_default_is_elementwise_mean():
    s, t = _pair((2, 16, 10, 10), seed=2)
    _close(fitnet_loss(s, t), ((s - t) ** 2).sum() / s.numel())
    assert fitnet_loss(s, t, reduction="none").shape == s.shape


def test_fitnet_zero_and_teacher_no_grad():
    s, t = _pair((2, 16, 20, 20), seed=3)
    assert fitnet_loss(s, s.detach().clone()).item() == 0.0
    assert fitnet_loss(s, s.detach() * 3.0, reduction="batchmean", normalize=True).abs().item() < 1e-12
    _assert_teacher_gets_no_grad(fitnet_loss, s, t)


def test_fitnet_rejects_bad_input():
    s, t = _pair((2, 16, 10, 10), seed=4, t_channels=32)
    with pytest.raises(ValueError):
        fitnet_loss(s, t)
    with pytest.raises(ValueError):
        fitnet_loss(s, s, reduction="avg")


# ---------------------------------------------------------------- CWD
@pytest.mark.parametrize("shape", LEVELS[:2] + [(2, 128, 10, 10)])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_reference(shape, tau):
    s, t = _pair(shape, seed=5)
    got = cwd_loss(s, t, tau=tau)
    _close(got, ref_cwd(s, t, tau))
    _close(_grad(got, s), _grad(ref_cwd(s, t, tau), s))


def test_cwd_default_tau_and_scale():
    s, t = _pair((2, 16, 10, 10), seed=6)
    _close(cwd_loss(s, t), ref_cwd(s, t, 1.0))
    # tau^2 scaling: equal logits/tau give loss scaled by tau^2
    _close(cwd_loss(s * 2, t * 2, tau=2.0), 4.0 * cwd_loss(s, t, tau=1.0))


def test_cwd_zero_and_teacher_no_grad():
    s, t = _pair((2, 32, 20, 20), seed=7)
    assert cwd_loss(s, s.detach().clone(), tau=2.0).abs().item() < 1e-12
    # spatially constant offsets per channel do not change the softmax
    assert cwd_loss(s, s.detach() + torch.randn(2, 32, 1, 1, dtype=s.dtype)).abs().item() < 1e-12
    _assert_teacher_gets_no_grad(cwd_loss, s, t)


def test_cwd_rejects_shape_mismatch():
    s, t = _pair((2, 16, 10, 10), seed=8, t_channels=32)
    with pytest.raises(ValueError):
        cwd_loss(s, t)


# ---------------------------------------------------------------- PKD
def _fpn(seed, channels=32, sizes=(40, 20, 10), n=2):
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    s = [(torch.randn(n, channels, h, h, **kw) + 1).requires_grad_(True) for h in sizes]
    t = [(torch.randn(n, channels, h, h, **kw) * 3).requires_grad_(True) for h in sizes]
    return s, t


@pytest.mark.parametrize("shape", LEVELS)
def test_pkd_single_level_matches_reference(shape):
    s, t = _pair(shape, seed=9)
    got = pkd_loss(s, t)
    _close(got, ref_pkd_level(s, t))
    _close(_grad(got, s), _grad(ref_pkd_level(s, t), s))


def test_pkd_levels_are_summed_list_and_tuple():
    s, t = _fpn(10)
    got = pkd_loss(s, t)
    want = sum(ref_pkd_level(a, b) for a, b in zip(s, t))
    _close(got, want)
    _close(pkd_loss(tuple(s), tuple(t)), want)
    grads = torch.autograd.grad(got, s)
    want_grads = torch.autograd.grad(sum(ref_pkd_level(a, b) for a, b in zip(s, t)), s)
    for g, wg in zip(grads, want_grads):
        _close(g, wg)


def test_pkd_equals_one_minus_pearson():
    # loss = (M - 1) / M * mean_c (1 - r_c), r_c the Pearson correlation of channel c over N*H*W
    s, t = _pair((2, 16, 20, 20), seed=11)
    s = s.detach()
    t = t.detach() + 0.5 * s  # make correlations non-trivial
    n, c, h, w = s.shape
    m = n * h * w
    r = torch.stack(
        [torch.corrcoef(torch.stack([s[:, k].reshape(-1), t[:, k].reshape(-1)]))[0, 1] for k in range(c)]
    )
    _close(pkd_loss(s, t), (m - 1) / m * (1 - r).mean(), rtol=1e-4)


def test_pkd_resizes_student_or_teacher():
    s, t = _fpn(12, sizes=(20, 10))
    t_big = [x.detach().repeat_interleave(2, -1).repeat_interleave(2, -2).requires_grad_(True) for x in t]
    got = pkd_loss(s, t_big)  # student 20x20 vs teacher 40x40 -> student upsampled
    want = sum(
        ref_pkd_level(F.interpolate(a, size=b.shape[-2:], mode="bilinear", align_corners=False), b)
        for a, b in zip(s, t_big)
    )
    _close(got, want)
    got_t = pkd_loss(s, t_big, resize_stu=False)  # teacher downsampled to 20x20
    want_t = sum(
        ref_pkd_level(a, F.interpolate(b.detach(), size=a.shape[-2:], mode="bilinear", align_corners=False))
        for a, b in zip(s, t_big)
    )
    _close(got_t, want_t)
    assert not torch.allclose(got, got_t)
    got_t.backward()
    assert all(x.grad is None for x in t_big)


def test_pkd_zero_and_teacher_no_grad():
    s, t = _fpn(13)
    assert pkd_loss(s, [x.detach().clone() for x in s]).abs().item() < 1e-12
    # invariant to per-channel affine maps with positive scale
    scaled = [x.detach() * 5.0 + 2.0 for x in s]
    assert pkd_loss(s, scaled).abs().item() < 1e-9
    loss = pkd_loss(s, t)
    loss.backward()
    assert all(x.grad is not None for x in s)
    assert all(x.grad is None for x in t)


def test_pkd_rejects_bad_input():
    s, t = _fpn(14)
    with pytest.raises(ValueError):
        pkd_loss(s, t[:2])
    with pytest.raises(ValueError):
        pkd_loss(s[0], t)
    with pytest.raises(ValueError):
        pkd_loss(s[0], t[0][:, :16])


# ---------------------------------------------------------------- AT
@pytest.mark.parametrize("shape,t_channels", [(LEVELS[0], 32), (LEVELS[1], 64), (LEVELS[2], 128)])
def test_at_matches_reference(shape, t_channels):
    s, t = _pair(shape, seed=15, t_channels=t_channels)
    got = at_loss(s, t)
    _close(got, ref_at(s, t))
    _close(_grad(got, s), _grad(ref_at(s, t), s))


def test_at_zero_and_teacher_no_grad():
    s, t = _pair((2, 16, 20, 20), seed=16, t_channels=64)
    assert at_loss(s, s.detach().clone()).abs().item() < 1e-12
    # attention maps are scale-free and channel-count-free
    assert at_loss(s, 3.0 * s.detach().repeat(1, 2, 1, 1)).abs().item() < 1e-12
    _assert_teacher_gets_no_grad(at_loss, s, t)


def test_at_rejects_spatial_mismatch():
    s, _ = _pair((2, 16, 20, 20), seed=17)
    with pytest.raises(ValueError):
        at_loss(s, torch.randn(2, 16, 10, 10, dtype=s.dtype))


# ---------------------------------------------------------------- half precision
@pytest.mark.parametrize(
    "fn",
    [
        lambda s, t: fitnet_loss(s, t),
        lambda s, t: cwd_loss(s, t, tau=2.0),
        lambda s, t: pkd_loss(s, t),
        lambda s, t: at_loss(s, t),
    ],
    ids=["fitnet", "cwd", "pkd", "at"],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_reduce_in_float32(fn, dtype):
    s32, t32 = _pair((2, 16, 20, 20), seed=18, dtype=torch.float32)
    s_half = s32.detach().to(dtype).requires_grad_(True)
    t_half = t32.detach().to(dtype)
    got = fn(s_half, t_half)
    assert got.dtype == torch.float32
    want = fn(s_half.detach().float(), t_half.float())  # same rounded inputs, float32 math
    _close(got, want, rtol=1e-5, atol=1e-7)
    got.backward()
    assert s_half.grad is not None and s_half.grad.dtype == dtype
    assert math.isfinite(got.item())


# ---------------------------------------------------------------- blocks, layouts, memory-lean nodes
def test_pkd_and_at_blocks_and_channels_last_inputs(monkeypatch):
    """One image per block (the CPU blocking) and channels-last inputs give the reference numbers."""
    import detkd.losses.features as features

    monkeypatch.setattr(features, "_BLOCK_BYTES", 1)
    s, t = _pair((3, 8, 5, 7), seed=19)
    for fn, ref in ((pkd_loss, ref_pkd_level), (at_loss, ref_at)):
        for layout in (torch.contiguous_format, torch.channels_last):
            x = s.detach().contiguous(memory_format=layout).requires_grad_(True)
            got = fn(x, t.contiguous(memory_format=layout))
            _close(got, ref(s, t))
            _close(_grad(got, x), _grad(ref(s, t), s))


def test_cwd_and_pkd_backward_twice_with_retain_graph():
    s, t = _pair((2, 8, 6, 6), seed=20)
    for fn in (lambda a, b: cwd_loss(a, b, tau=4.0), pkd_loss, at_loss):
        loss = fn(s, t)
        (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
        (g2,) = torch.autograd.grad(loss, s)
        _close(g1, g2, rtol=0.0, atol=0.0)
