"""Tests for detkd.losses.boxes against plain, loop-based implementations of the published formulas."""

from __future__ import annotations

import math

import pytest
import torch

from detkd.losses.boxes import bounded_regression_loss, box_kd_loss, giou, ld_loss

RTOL = 1e-5
REG_MAX = 16
A_FULL = 40 * 40 + 20 * 20 + 10 * 10  # 2100 anchors: a 320 px input at strides 8/16/32
MMDET_EPS = torch.finfo(torch.float32).eps


def _randn(shape, seed, scale=3.0, shift=0.0, dtype=torch.float64, grad=True):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype) * scale + shift).requires_grad_(grad)


def _rand(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=dtype)


def _boxes(shape, seed, jitter_of=None, dtype=torch.float64):
    """Random valid xyxy boxes in a 320 px image; with ``jitter_of``, a perturbed copy of those boxes."""
    g = torch.Generator().manual_seed(seed)
    if jitter_of is None:
        xy = torch.rand(shape[:-1] + (2,), generator=g, dtype=dtype) * 280
        wh = torch.rand(shape[:-1] + (2,), generator=g, dtype=dtype) * 120 + 2
        b = torch.cat([xy, xy + wh], -1)
    else:
        base = jitter_of.detach()
        wh = base[..., 2:] - base[..., :2]
        noise = torch.randn(shape, generator=g, dtype=dtype) * torch.cat([wh, wh], -1) * 0.3
        b = base + noise
        b = torch.cat([torch.minimum(b[..., :2], b[..., 2:] - 1), b[..., 2:]], -1)
    return b.requires_grad_(True)


def _close(a, b, rtol=RTOL, atol=0.0):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# ---------------------------------------------------------------- independent references
def ref_giou_one(a, b, eps=1e-10):
    """GIoU of two single boxes from scalar coordinates (Rezatofighi et al.; eps as in PaddleDetection)."""
    ax1, ay1, ax2, ay2 = a.unbind(0)
    bx1, by1, bx2, by2 = b.unbind(0)
    iw = torch.clamp(torch.min(ax2, bx2) - torch.max(ax1, bx1), min=0)
    ih = torch.clamp(torch.min(ay2, by2) - torch.max(ay1, by1), min=0)
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter + eps
    hull = (torch.max(ax2, bx2) - torch.min(ax1, bx1)) * (torch.max(ay2, by2) - torch.min(ay1, by1)) + eps
    return inter / union - (hull - union) / hull


def ref_ld(s, t, T, weight=None, avg_factor=None, reduction="mean", bins="mean"):
    """mmdet KnowledgeDistillationKLDivLoss + weighted_loss, written as a loop over rows."""
    b = s.shape[-1]
    s2, t2 = s.reshape(-1, b).unbind(0), t.detach().reshape(-1, b).unbind(0)  # unbind: cheap autograd
    w = None if weight is None else weight.reshape(-1).unbind(0)
    rows = []
    for r in range(len(s2)):
        es = torch.exp(s2[r] / T - (s2[r] / T).max())
        et = torch.exp(t2[r] / T - (t2[r] / T).max())
        ps, pt = es / es.sum(), et / et.sum()
        kl = pt * (torch.log(pt) - torch.log(ps))
        v = (kl.sum() / b if bins == "mean" else kl.sum()) * T * T
        if w is not None:
            v = v * w[r]
        rows.append(v)
    rows = torch.stack(rows)
    if reduction == "none":
        return rows.reshape(s.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    if avg_factor is not None:
        return rows.sum() / (avg_factor + MMDET_EPS)
    return rows.sum() / rows.numel()


def ref_box_kd(sb, tb, scores, giou_w=2.5, l1_w=0.0, thr=None, soft=True, weight=None, reduction="mean"):
    """Weighted GIoU/L1 box distillation, loop over anchors; weights from the teacher's max class score."""
    n, a = sb.shape[:2]
    s_rows = sb.reshape(-1, 4).unbind(0)  # unbind: cheap autograd
    t_rows = tb.detach().reshape(-1, 4).unbind(0)
    num = sb.new_zeros(())
    den = sb.new_zeros(())
    per = []
    for i in range(n):
        for j in range(a):
            if scores is None:
                w = sb.new_ones(())
            else:
                sc = scores[i, j].max() if scores.dim() == 3 else scores[i, j]
                w = sc if soft else sb.new_ones(())
                if thr is not None and not sc >= thr:
                    w = sb.new_zeros(())
            if weight is not None:
                w = w * weight[i, j]
            s_box, t_box = s_rows[i * a + j], t_rows[i * a + j]
            loss = giou_w * (1 - ref_giou_one(s_box, t_box))
            if l1_w:
                sc_, tc_ = s_box.unbind(0), t_box.unbind(0)
                loss = loss + l1_w * sum(torch.abs(sc_[c] - tc_[c]) for c in range(4))
            per.append(w * loss)
            num = num + w * loss
            den = den + w
    if reduction == "none":
        return torch.stack(per).reshape(n, a)
    if reduction == "sum":
        return num
    return num / den


def ref_bounded(s, t, y, m=0.0, weight=None, avg_factor=None, reduction="mean"):
    """Chen et al. 2017 eq. (4), loop over rows."""
    d = s.shape[-1]
    s2 = [row.unbind(0) for row in s.reshape(-1, d).unbind(0)]  # unbind: cheap autograd
    t2 = t.detach().reshape(-1, d).tolist()
    y2 = y.detach().reshape(-1, d).tolist()
    w = None if weight is None else weight.reshape(-1).unbind(0)
    rows = []
    for r in range(len(s2)):
        es = sum((s2[r][c] - y2[r][c]) ** 2 for c in range(d))
        et = sum((t2[r][c] - y2[r][c]) ** 2 for c in range(d))
        v = es if es.item() + m > et else es * 0.0
        if w is not None:
            v = v * w[r]
        rows.append(v)
    rows = torch.stack(rows)
    if reduction == "none":
        return rows.reshape(s.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (avg_factor if avg_factor is not None else rows.numel())


# ---------------------------------------------------------------- giou
def test_giou_hand_computed_values():
    b1 = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1], [5, 5, 9, 8], [0, 0, 4, 4]], dtype=torch.float64)
    b2 = torch.tensor([[1.0, 1, 3, 3], [2, 2, 3, 3], [5, 5, 9, 8], [1, 1, 3, 3]], dtype=torch.float64)
    # overlap 1, union 7, hull 9 | disjoint: union 2, hull 9 | identical | nested: 4/16
    expected = torch.tensor([1 / 7 - 2 / 9, 0 - 7 / 9, 1.0, 4 / 16], dtype=torch.float64)
    _close(giou(b1, b2), expected, rtol=1e-8)
    _close(giou(b2, b1), expected, rtol=1e-8)
    # identical zero-area boxes: eps in union and hull (PaddleDetection) keep it finite: 0 - 0 = 0
    pt = torch.tensor([[3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    assert giou(pt, pt).item() == 0.0


def test_giou_matches_reference_values_and_gradients():
    a = _boxes((2, 300, 4), 0)
    b = _boxes((2, 300, 4), 1, jitter_of=a)
    out = giou(a, b)
    pairs = zip(a.reshape(-1, 4).unbind(0), b.reshape(-1, 4).unbind(0))
    ref = torch.stack([ref_giou_one(ai, bi) for ai, bi in pairs]).reshape(2, 300)
    _close(out, ref)
    go = _rand((2, 300), 2)
    _close(torch.autograd.grad(out, (a, b), go), torch.autograd.grad(ref, (a, b), go))
    assert (out <= 1).all() and (out >= -1).all()


# ---------------------------------------------------------------- ld_loss
@pytest.mark.parametrize("bins", [REG_MAX + 1, REG_MAX])  # GFL/mmdet (reg_max + 1) and Ultralytics (reg_max)
def test_ld_matches_reference_ldhead_style_call(bins):
    # LDHead: positives x 4 sides rows, weight = score expanded over the sides, avg_factor = 4.0
    pos = 150
    s = _randn((pos * 4, bins), 10)
    t = _randn((pos * 4, bins), 11)
    score = _rand((pos,), 12)
    w4 = score[:, None].expand(-1, 4).reshape(-1)
    out = ld_loss(s, t, 10.0, weight=w4, avg_factor=4.0)
    ref = ref_ld(s, t, 10.0, weight=w4, avg_factor=4.0)
    _close(out, ref)
    _close(_grad(out, s), _grad(ref, s))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bin_reduction", ["mean", "sum"])
def test_ld_matches_reference_reductions(reduction, bin_reduction):
    # dense layout (N, A, 4, reg_max) with bins last
    s = _randn((2, 100, 4, REG_MAX), 13)
    t = _randn((2, 100, 4, REG_MAX), 14)
    w = _rand((2, 100, 4), 15)
    out = ld_loss(s, t, 4.0, weight=w, reduction=reduction, bin_reduction=bin_reduction)
    ref = ref_ld(s, t, 4.0, weight=w, reduction=reduction, bins=bin_reduction)
    _close(out, ref)
    go = torch.ones_like(out) if reduction == "none" else None
    _close(torch.autograd.grad(out, s, go)[0], torch.autograd.grad(ref, s, go)[0])


@pytest.mark.parametrize("reduction,avg_factor", [("mean", None), ("sum", None), ("mean", 3.0)])
@pytest.mark.parametrize("bin_reduction", ["mean", "sum"])
def test_ld_unweighted_matches_reference(reduction, avg_factor, bin_reduction):
    # without weights ld_loss takes a one-node path (the mmdet-style call LD benchmarks use)
    s = _randn((2, 50, 4, REG_MAX + 1), 23)
    t = _randn((2, 50, 4, REG_MAX + 1), 24)
    out = ld_loss(s, t, 10.0, reduction=reduction, avg_factor=avg_factor, bin_reduction=bin_reduction)
    ref = ref_ld(s, t, 10.0, reduction=reduction, avg_factor=avg_factor, bins=bin_reduction)
    _close(out, ref)
    _close(_grad(out, s), _grad(ref, s))


def test_ld_properties():
    s = _randn((64, REG_MAX + 1), 16)
    t = _randn((64, REG_MAX + 1), 17)
    # zero at the teacher
    _close(ld_loss(s, s.detach().clone()), s.new_zeros(()), atol=1e-12)
    # sum over bins is B times the (mmdet) mean over bins
    _close(ld_loss(s, t, bin_reduction="sum"), (REG_MAX + 1) * ld_loss(s, t))
    # T^2 scaling: gradient of the summed loss is T * (p_s - p_t) / B with bin mean
    T = 10.0
    loss = ld_loss(s, t, T, reduction="sum")
    loss.backward()
    p_s = torch.softmax(s.detach() / T, -1)
    p_t = torch.softmax(t.detach() / T, -1)
    _close(s.grad, T * (p_s - p_t) / (REG_MAX + 1))
    assert t.grad is None


def test_ld_half_upcast_and_errors():
    s = _randn((32, 17), 18, grad=False)
    t = _randn((32, 17), 19, grad=False)
    out = ld_loss(s.half(), t.half())
    assert out.dtype == torch.float32
    _close(out.double(), ld_loss(s.half().double(), t.half().double()))
    # mmdet adds float32 eps to avg_factor: all-zero weights with avg_factor 0 give 0, not NaN,
    # and a tiny avg_factor is visibly shifted by it
    _close(ld_loss(s, t, weight=torch.zeros(32, dtype=torch.float64), avg_factor=0.0), s.new_zeros(()))
    _close(ld_loss(s, t, avg_factor=1e-7), ld_loss(s, t, reduction="sum") / (1e-7 + MMDET_EPS))
    with pytest.raises(ValueError):
        ld_loss(s, t, reduction="sum", avg_factor=4.0)
    with pytest.raises(ValueError):
        ld_loss(s, t[:, :16])
    with pytest.raises(ValueError):
        ld_loss(s, t, weight=torch.ones(31))


# ---------------------------------------------------------------- box_kd_loss
@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # PP-YOLOE giou weight 2.5, soft teacher-score weights, weighted mean
        {"l1_weight": 0.05, "score_threshold": 0.3},
        {"score_threshold": 0.5, "soft_weights": False, "giou_weight": 1.0, "l1_weight": 1.0},
    ],
)
def test_box_kd_matches_reference(kwargs):
    n, a, k = 2, 300, 20
    sb = _boxes((n, a, 4), 20)
    tb = _boxes((n, a, 4), 21, jitter_of=sb)
    scores = _rand((n, a, k), 22) ** 20  # spread the max score so thresholds 0.3 / 0.5 cut ~30% / 50%
    out = box_kd_loss(sb, tb, scores, **kwargs)
    ref = ref_box_kd(
        sb, tb, scores,
        giou_w=kwargs.get("giou_weight", 2.5), l1_w=kwargs.get("l1_weight", 0.0),
        thr=kwargs.get("score_threshold"), soft=kwargs.get("soft_weights", True),
    )
    _close(out, ref)
    _close(_grad(out, sb), _grad(ref, sb))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_box_kd_per_anchor_scores_extra_weight_and_reductions(reduction):
    n, a = 3, 120
    sb = _boxes((n, a, 4), 23)
    tb = _boxes((n, a, 4), 24, jitter_of=sb)
    scores = _rand((n, a), 25)
    mask = (_rand((n, a), 26) > 0.5).double()
    out = box_kd_loss(sb, tb, scores, l1_weight=0.1, weight=mask, reduction=reduction)
    ref = ref_box_kd(sb, tb, scores, l1_w=0.1, weight=mask, reduction=reduction)
    _close(out, ref)
    go = torch.ones_like(out) if reduction == "none" else None
    _close(torch.autograd.grad(out, sb, go)[0], torch.autograd.grad(ref, sb, go)[0])


def test_box_kd_ppyoloe_style_call_and_full_anchor_set():
    # PP-YOLOE: no teacher scores, weight = assigned-score sum at positives, divided by its sum
    n, a = 2, A_FULL
    sb = _boxes((n, a, 4), 27)
    tb = _boxes((n, a, 4), 28, jitter_of=sb)
    pos = _rand((n, a), 29) > 0.9
    bbox_weight = _rand((n, a), 30) * pos
    out = box_kd_loss(sb, tb, None, weight=bbox_weight)
    g = giou(sb[pos], tb[pos].detach())
    manual = (2.5 * (1 - g) * bbox_weight[pos]).sum() / bbox_weight[pos].sum()
    _close(out, manual)
    _close(_grad(out, sb), _grad(manual, sb))


def test_box_kd_properties():
    n, a, k = 2, 50, 5
    sb = _boxes((n, a, 4), 31)
    tb = _boxes((n, a, 4), 32, jitter_of=sb)
    scores = _rand((n, a, k), 33)
    # zero when the boxes match (also with L1)
    _close(box_kd_loss(sb, sb.detach().clone(), scores, l1_weight=1.0), sb.new_zeros(()), atol=1e-9)
    # weighted mean: invariant to scaling all teacher scores
    _close(box_kd_loss(sb, tb, scores * 0.25), box_kd_loss(sb, tb, scores))
    # a threshold above every score gives 0 (not NaN) and a zero, finite gradient
    zero = box_kd_loss(sb, tb, scores, score_threshold=2.0)
    assert zero.item() == 0.0
    g = _grad(zero, sb)
    assert torch.isfinite(g).all() and g.abs().sum() == 0
    # threshold is inclusive: an anchor whose score equals it is kept
    s_eq = torch.zeros(n, a, dtype=torch.float64)
    s_eq[0, 3] = 0.4
    _close(box_kd_loss(sb, tb, s_eq, score_threshold=0.4, reduction="sum"),
           0.4 * 2.5 * (1 - giou(sb[0, 3], tb[0, 3])))
    # explicit avg_factor
    _close(box_kd_loss(sb, tb, scores, avg_factor=7.0), box_kd_loss(sb, tb, scores, reduction="sum") / 7.0)
    # only the student gets gradients
    scores.requires_grad_(True)
    box_kd_loss(sb, tb, scores).backward()
    assert sb.grad is not None and sb.grad.abs().sum() > 0
    assert tb.grad is None and scores.grad is None


def test_box_kd_half_upcast_and_errors():
    sb = _boxes((2, 30, 4), 34).detach()
    tb = _boxes((2, 30, 4), 35, jitter_of=sb).detach()
    sc = _rand((2, 30, 3), 36)
    out = box_kd_loss(sb.half(), tb.half(), sc.half())
    assert out.dtype == torch.float32
    _close(out.double(), box_kd_loss(sb.half().double(), tb.half().double(), sc.half().double()))
    with pytest.raises(ValueError):
        box_kd_loss(sb, tb[:, :29], sc)
    with pytest.raises(ValueError):
        box_kd_loss(sb, tb, sc[:, :29])
    with pytest.raises(ValueError):
        box_kd_loss(sb, tb, sc, reduction="sum", avg_factor=1.0)


# ---------------------------------------------------------------- bounded_regression_loss
@pytest.mark.parametrize("margin", [0.0, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bounded_matches_reference(margin, reduction):
    n, r = 4, 128  # e.g. 4 images x 128 sampled proposals, 4 deltas each
    y = _randn((n, r, 4), 40, scale=1.0, grad=False)
    s = (y + _randn((n, r, 4), 41, scale=0.5, grad=False)).requires_grad_(True)
    t = (y + _randn((n, r, 4), 42, scale=0.5, grad=False)).requires_grad_(True)
    fg = (_rand((n, r), 43) > 0.6).double()
    af = 100.0 if reduction == "mean" else None
    out = bounded_regression_loss(s, t, y, margin=margin, weight=fg, avg_factor=af, reduction=reduction)
    ref = ref_bounded(s, t, y, m=margin, weight=fg, avg_factor=af, reduction=reduction)
    _close(out, ref)
    go = torch.ones_like(out) if reduction == "none" else None
    _close(torch.autograd.grad(out, s, go)[0], torch.autograd.grad(ref, s, go)[0])


def test_bounded_properties():
    y = _randn((200, 4), 44, scale=1.0, grad=False)
    t = (y + _randn((200, 4), 45, scale=0.3, grad=False)).requires_grad_(True)
    # a student closer to the target than the teacher gets no loss and no gradient
    s_good = (y + (t.detach() - y) * 0.5).requires_grad_(True)
    loss = bounded_regression_loss(s_good, t, y)
    loss.backward()
    assert loss.item() == 0.0 and s_good.grad.abs().sum() == 0
    # ... unless the margin exceeds the gap: then it is the plain L2 error, averaged over rows
    gap = ((t.detach() - y) ** 2).sum(-1) - ((s_good.detach() - y) ** 2).sum(-1)
    big = float(gap.max()) + 1.0
    s2 = s_good.detach().clone().requires_grad_(True)
    l2 = bounded_regression_loss(s2, t, y, margin=big)
    _close(l2, ((s2.detach() - y) ** 2).sum() / 200)
    _close(_grad(l2, s2), 2 * (s2.detach() - y) / 200)
    # a worse student: plain L2 error everywhere; teacher and target get no gradients
    y_req = y.clone().requires_grad_(True)
    s_bad = (y + (t.detach() - y) * 2.0).requires_grad_(True)
    out = bounded_regression_loss(s_bad, t, y_req, reduction="sum")
    _close(out, ((s_bad.detach() - y) ** 2).sum())
    out.backward()
    assert t.grad is None and y_req.grad is None
    with pytest.raises(ValueError):
        bounded_regression_loss(s_bad, t, y[:, :3])
    assert math.isfinite(bounded_regression_loss(s_bad.half(), t.half(), y.half()).item())


def test_ld_bins_along_another_dim_match_bins_last():
    # Ultralytics' raw (N, 4, R, A) layout with the bins along dim 2 (what ld_term passes) equals the bins-last rows
    s = _randn((2, 4, REG_MAX, 30), 16)
    t = _randn((2, 4, REG_MAX, 30), 17)
    w = _rand((2, 4, 30), 18)
    last = (s.permute(0, 1, 3, 2), t.permute(0, 1, 3, 2))  # (N, 4, A, R)
    for kw, ref_kw in (({}, {}), ({"avg_factor": 3.0}, {"avg_factor": 3.0}),
                       ({"reduction": "sum", "bin_reduction": "sum"}, {"reduction": "sum", "bins": "sum"})):
        out = ld_loss(s, t, 10.0, weight=w, dim=2, **kw)
        ref = ref_ld(*last, 10.0, weight=w, **ref_kw)
        _close(out, ref)
        _close(_grad(out, s), _grad(ref, s))
    none = ld_loss(s, t, 10.0, weight=w, dim=2, reduction="none")
    assert none.shape == (2, 4, 30)
    _close(none, ref_ld(*last, 10.0, weight=w, reduction="none"))
    with pytest.raises(ValueError, match=r"weight must have shape \(2, 4, 30\)"):
        ld_loss(s, t, weight=torch.ones(2, 4, REG_MAX), dim=2)
