"""FGDLoss against a plain, loop-based re-implementation of the reference algorithm (yzd-v/FGD FeatureLoss)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detkd.losses.fgd import FGDLoss, fgd_masks, pad_boxes

IMG = (320, 320)  # network input (H, W); levels 40 / 20 / 10 are strides 8 / 16 / 32


# ----------------------------------------------------------------------------------------------------
# Independent reference: the published algorithm, written step by step with per-image / per-box loops.
# ----------------------------------------------------------------------------------------------------
def loop_masks(boxes_list, img_shapes, h, w, dtype):
    """Per-image, per-box masks with the reference's floor/ceil rule and inclusive slicing."""
    n = len(boxes_list)
    fg = torch.zeros(n, h, w, dtype=dtype)
    bg = torch.ones(n, h, w, dtype=dtype)
    for i in range(n):
        img_h, img_w = img_shapes[i]
        for j in range(boxes_list[i].shape[0]):
            x1, y1, x2, y2 = boxes_list[i][j]
            c0 = int(torch.floor(x1 / img_w * w))
            c1 = int(torch.ceil(x2 / img_w * w))
            r0 = int(torch.floor(y1 / img_h * h))
            r1 = int(torch.ceil(y2 / img_h * h))
            area = torch.tensor(1.0, dtype=dtype) / (r1 + 1 - r0) / (c1 + 1 - c0)
            region = fg[i, r0 : r1 + 1, c0 : c1 + 1]
            fg[i, r0 : r1 + 1, c0 : c1 + 1] = torch.maximum(region, area)
        bg[i] = torch.where(fg[i] > 0, 0.0, 1.0)
        total = bg[i].sum()
        if total > 0:
            bg[i] = bg[i] / total
    return fg, bg


class LoopFGD(nn.Module):
    """Reference FeatureLoss, re-written: separate fg / bg passes on sqrt-weighted features, GcBlock."""

    def __init__(self, cs, ct, temp, alpha, beta, gamma, lam):
        super().__init__()
        self.temp, self.alpha, self.beta, self.gamma, self.lam = temp, alpha, beta, gamma, lam
        self.align = nn.Conv2d(cs, ct, 1) if cs != ct else None
        self.conv_mask_s = nn.Conv2d(ct, 1, 1)
        self.conv_mask_t = nn.Conv2d(ct, 1, 1)

        def block():
            return nn.Sequential(
                nn.Conv2d(ct, ct // 2, 1), nn.LayerNorm([ct // 2, 1, 1]), nn.ReLU(), nn.Conv2d(ct // 2, ct, 1)
            )

        self.channel_add_conv_s = block()
        self.channel_add_conv_t = block()

    def attention(self, x):
        n, c, h, w = x.shape
        v = x.abs()
        sp = v.mean(dim=1).reshape(n, -1)
        s_att = (h * w * F.softmax(sp / self.temp, dim=1)).reshape(n, h, w)
        ch = v.mean(dim=(2, 3))
        c_att = c * F.softmax(ch / self.temp, dim=1)
        return s_att, c_att

    def gc_out(self, x, conv_mask, add):
        n, c, h, w = x.shape
        logits = conv_mask(x).reshape(n, 1, h * w)
        p = F.softmax(logits, dim=2).unsqueeze(-1)  # (N, 1, HW, 1)
        context = torch.matmul(x.reshape(n, c, h * w).unsqueeze(1), p).reshape(n, c, 1, 1)
        return x + add(context)

    def forward(self, s, t, boxes_list, img_shapes):
        if self.align is not None:
            s = self.align(s)
        n, c, h, w = s.shape
        s_att_t, c_att_t = self.attention(t)
        s_att_s, c_att_s = self.attention(s)
        fg_mask, bg_mask = loop_masks(boxes_list, img_shapes, h, w, s.dtype)

        wt = torch.sqrt(s_att_t)[:, None] * torch.sqrt(c_att_t)[:, :, None, None]
        fs, ft = s * wt, t * wt
        fg = F.mse_loss(fs * fg_mask[:, None].sqrt(), ft * fg_mask[:, None].sqrt(), reduction="sum") / n
        bg = F.mse_loss(fs * bg_mask[:, None].sqrt(), ft * bg_mask[:, None].sqrt(), reduction="sum") / n
        mask = (c_att_s - c_att_t).abs().sum() / n + (s_att_s - s_att_t).abs().sum() / n
        out_s = self.gc_out(s, self.conv_mask_s, self.channel_add_conv_s)
        out_t = self.gc_out(t, self.conv_mask_t, self.channel_add_conv_t)
        rela = F.mse_loss(out_s, out_t, reduction="sum") / n
        loss = self.alpha * fg + self.beta * bg + self.gamma * mask + self.lam * rela
        return loss, {"fg": fg, "bg": bg, "mask": mask, "rela": rela}


# ----------------------------------------------------------------------------------------------------
def make_boxes(n_img, seed, with_empty=True):
    """Pixel boxes: random, overlapping, border-touching, tiny (< 1 cell at stride 32), grid-aligned."""
    g = torch.Generator().manual_seed(seed)
    h_img, w_img = IMG
    out = []
    for i in range(n_img):
        if with_empty and i == 1:
            out.append(torch.zeros(0, 4))
            continue
        k = 3 + i
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w_img * 0.7, h_img * 0.7])
        wh = 4 + torch.rand(k, 2, generator=g) * torch.tensor([w_img * 0.5, h_img * 0.5])
        rnd = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w_img, h_img]) * 1.0)], 1)
        special = torch.tensor(
            [
                [0.0, 0.0, 100.0, 60.0],  # touches top-left border
                [40.0, 30.0, 140.0, 90.0],  # overlaps the previous one
                [250.5, 200.0, 320.0, 320.0],  # touches bottom-right border
                [101.3, 77.9, 104.1, 80.2],  # tiny: smaller than one cell at every level
                [16.0, 32.0, 48.0, 64.0],  # grid-aligned: floor == ceil on the edges
                [0.0, 0.0, 320.0, 320.0] if i == 2 else [60.0, 60.0, 61.0, 61.0],  # whole image / tiny
            ]
        )
        out.append(torch.cat([rnd, special]).float())
    return out


def clip(boxes, img_hw):
    """Clip xyxy boxes to an (H, W) image, as a data pipeline does."""
    h, w = img_hw
    return torch.stack(
        [boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], 1
    )


def build_pair(cs, ct, seed, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    mod = FGDLoss(cs, ct, **kw).to(dtype)
    # Randomise every parameter (the reference init zeros the last context conv, which would hide
    # the relation term's dependence on conv_mask_* and the first conv).
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    defaults = dict(temp=0.5, alpha_fgd=0.001, beta_fgd=0.0005, gamma_fgd=0.001, lambda_fgd=0.000005)
    defaults.update(kw)
    ref = LoopFGD(
        cs, ct, defaults["temp"], defaults["alpha_fgd"], defaults["beta_fgd"], defaults["gamma_fgd"],
        defaults["lambda_fgd"],
    ).to(dtype)
    ref.load_state_dict(mod.state_dict())
    return mod, ref


def rel_close(a, b, tol=1e-5, floor=1e-30, what=""):
    """max |a - b| <= tol * max(max |b|, floor)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    scale = b.abs().max().clamp(min=floor)
    assert (a - b).abs().max() <= tol * scale, f"{what}: max diff {(a - b).abs().max():.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize(
    "n,cs,ct,hw,seed,kw",
    [
        (2, 16, 16, 40, 0, {}),
        (3, 24, 32, 20, 1, {"temp": 0.8, "alpha_fgd": 0.0016, "beta_fgd": 0.0008, "gamma_fgd": 0.0008, "lambda_fgd": 8e-6}),
        (4, 64, 48, 10, 2, {}),
        (3, 32, 32, 20, 3, {"alpha_fgd": 1.0, "beta_fgd": 1.0, "gamma_fgd": 1.0, "lambda_fgd": 1.0}),
    ],
)
def test_matches_loop_reference_values_and_grads(n, cs, ct, hw, seed, kw):
    mod, ref = build_pair(cs, ct, seed, **kw)
    torch.manual_seed(100 + seed)
    s = torch.randn(n, cs, hw, hw, dtype=torch.float64) * 2
    t = torch.randn(n, ct, hw, hw, dtype=torch.float64) * 2 + 0.3
    boxes = make_boxes(n, seed)

    s1 = s.clone().requires_grad_(True)
    loss, parts = mod(s1, t, boxes, IMG, return_parts=True)
    loss.backward()
    s2 = s.clone().requires_grad_(True)
    ref_loss, ref_parts = ref(s2, t, boxes, [IMG] * n)
    ref_loss.backward()

    rel_close(loss, ref_loss)
    for k in ("fg", "bg", "mask", "rela"):
        rel_close(parts[k], ref_parts[k])
        assert parts[k] > 0
    rel_close(s1.grad, s2.grad)
    ref_params = dict(ref.named_parameters())
    # conv_mask_*.bias has an analytically zero gradient (softmax is shift-invariant): compare it
    # against the scale of all parameter gradients instead of its own rounding noise.
    grad_scale = max(p.grad.abs().max().item() for p in ref.parameters())
    for name, p in mod.named_parameters():
        assert p.grad is not None, name
        assert ref_params[name].grad is not None, name
        rel_close(p.grad, ref_params[name].grad, floor=1e-6 * grad_scale, what=name)
    assert mod.last_parts.keys() == parts.keys()


def test_padded_input_and_per_image_shapes_match_list_input():
    n = 3
    mod, ref = build_pair(16, 16, 5)
    s = torch.randn(n, 16, 20, 20, dtype=torch.float64)
    t = torch.randn(n, 16, 20, 20, dtype=torch.float64)
    boxes = make_boxes(n, 5)
    padded, valid = pad_boxes(boxes)
    assert padded.shape == (n, max(len(b) for b in boxes), 4) and valid.sum() == sum(len(b) for b in boxes)
    a = mod(s, t, boxes, IMG)
    b = mod(s, t, padded, IMG, gt_valid=valid)
    assert torch.equal(a, b)
    # Per-image input shapes (mmdet's img_metas[i]['img_shape']): smaller images than the padded batch.
    shapes = [(320, 320), (300, 256), (288, 310)]
    boxes = [clip(b, hw) for b, hw in zip(boxes, shapes)]
    padded, valid = pad_boxes(boxes)
    c = mod(s, t, padded, torch.tensor(shapes), gt_valid=valid)
    rel_close(c, ref(s, t, boxes, shapes)[0])
    assert not torch.allclose(c, a)


def test_batch_without_any_box():
    n = 2
    mod, ref = build_pair(16, 16, 6)
    s = torch.randn(n, 16, 10, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(n, 16, 10, 10, dtype=torch.float64)
    boxes = [torch.zeros(0, 4), torch.zeros(0, 4)]
    padded, valid = pad_boxes(boxes)
    assert padded.shape == (2, 0, 4) and valid.shape == (2, 0)
    loss, parts = mod(s, t, padded, IMG, gt_valid=valid, return_parts=True)
    ref_loss, ref_parts = ref(s, t, boxes, [IMG] * n)
    assert parts["fg"] == 0
    rel_close(loss, ref_loss)
    rel_close(parts["bg"], ref_parts["bg"])
    fg, bg = fgd_masks(padded, valid, IMG, (10, 10))
    assert torch.all(fg == 0) and torch.allclose(bg, torch.full_like(bg, 1 / 100))


@pytest.mark.parametrize("hw", [40, 20, 10, 13])
def test_mask_builder_equals_loop_version_exactly(hw):
    n = 4
    boxes = make_boxes(n, 11 + hw)
    padded, valid = pad_boxes(boxes)
    fg, bg = fgd_masks(padded, valid, IMG, (hw, hw))
    lfg, lbg = loop_masks(boxes, [IMG] * n, hw, hw, torch.float32)
    assert torch.equal(fg, lfg)
    assert torch.equal(bg, lbg)
    # non-square maps and per-image shapes
    shapes = [(320, 320), (320, 200), (240, 320), (320, 320)]
    boxes = [clip(b, hw) for b, hw in zip(boxes, shapes)]
    padded, valid = pad_boxes(boxes)
    fg, bg = fgd_masks(padded, valid, torch.tensor(shapes), (hw, hw + 7))
    lfg, lbg = loop_masks(boxes, shapes, hw, hw + 7, torch.float32)
    assert torch.equal(fg, lfg) and torch.equal(bg, lbg)
    # specific values: a box that covers the whole image covers every cell, area counts the extra row/col
    whole = torch.tensor([[[0.0, 0.0, 320.0, 320.0]]])
    fg, bg = fgd_masks(whole, None, IMG, (hw, hw))
    assert torch.allclose(fg, torch.full_like(fg, 1.0 / (hw + 1) ** 2)) and torch.all(bg == 0)


def test_max_overlap_rule_on_a_hand_case():
    # 8x8 map of a 64x64 image: big box cells 0..4 x 0..4 (area 1/25), small box cells 2..3 x 2..3 (1/4).
    boxes = torch.tensor([[[0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 24.0, 24.0], [0, 0, 0, 0]]])
    valid = torch.tensor([[True, True, False]])
    fg, bg = fgd_masks(boxes, valid, (64, 64), (8, 8))
    expect = torch.zeros(8, 8)
    expect[0:5, 0:5] = 1 / 25
    expect[2:4, 2:4] = 1 / 4
    assert torch.allclose(fg[0], expect)
    assert torch.allclose(bg[0], (expect == 0).float() / (64 - 25))


def test_teacher_gets_no_gradient_and_student_does():
    mod, _ = build_pair(16, 32, 7, dtype=torch.float32)
    s = torch.randn(2, 16, 10, 10, requires_grad=True)
    t = torch.randn(2, 32, 10, 10, requires_grad=True)
    mod(s, t, make_boxes(2, 7), IMG).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_pad_boxes_edge_cases():
    b, v = pad_boxes([torch.zeros(0, 4), torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]), torch.zeros(0)])
    assert b.shape == (3, 2, 4)
    assert v.tolist() == [[False, False], [True, True], [False, False]]
    assert torch.equal(b[1], torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]])) and torch.all(b[0] == 0)
    b, v = pad_boxes([])
    assert b.shape == (0, 0, 4) and v.shape == (0, 0)


def test_reference_initialisation():
    torch.manual_seed(0)
    mod = FGDLoss(128, 256)
    for blk in (mod.channel_add_conv_s, mod.channel_add_conv_t):
        assert torch.all(blk[-1].weight == 0) and torch.all(blk[-1].bias == 0)
    for conv in (mod.conv_mask_s, mod.conv_mask_t):
        assert torch.all(conv.bias == 0)
        # kaiming normal, fan_in = 256, relu gain: std = sqrt(2 / 256)
        assert abs(conv.weight.std().item() / math.sqrt(2 / 256) - 1) < 0.25
    assert isinstance(mod.align, nn.Conv2d) and mod.align.weight.shape == (256, 128, 1, 1)
    assert FGDLoss(64, 64).align is None
    assert (mod.temp, mod.alpha_fgd, mod.beta_fgd, mod.gamma_fgd, mod.lambda_fgd) == (0.5, 1e-3, 5e-4, 1e-3, 5e-6)


def test_half_precision_input_computed_in_float32():
    mod, _ = build_pair(16, 16, 8, dtype=torch.float32)
    s = torch.randn(2, 16, 10, 10)
    t = torch.randn(2, 16, 10, 10)
    boxes = make_boxes(2, 8)
    out = mod(s.bfloat16(), t.bfloat16(), boxes, IMG)
    assert out.dtype == torch.float32
    assert torch.allclose(out, mod(s.bfloat16().float(), t.bfloat16().float(), boxes, IMG), rtol=1e-5)


def test_two_forwards_then_one_backward_and_nothing_kept_between_calls():
    """Calls share no state: results do not depend on call order, and no tensor is kept in the module."""
    n = 2
    mod, ref = build_pair(16, 16, 9)
    torch.manual_seed(9)
    s_a, s_b = (torch.randn(n, 16, 20, 20, dtype=torch.float64, requires_grad=True) for _ in range(2))
    t_a, t_b = torch.randn(n, 16, 20, 20, dtype=torch.float64), torch.randn(n, 16, 20, 20, dtype=torch.float64)
    boxes = make_boxes(n, 9, with_empty=False)
    (mod(s_a, t_a, boxes, IMG) + 3 * mod(s_b, t_b, boxes, IMG)).backward()
    r_a, r_b = (x.detach().clone().requires_grad_(True) for x in (s_a, s_b))
    (ref(r_a, t_a, boxes, [IMG] * n)[0] + 3 * ref(r_b, t_b, boxes, [IMG] * n)[0]).backward()
    rel_close(s_a.grad, r_a.grad, what="first call")
    rel_close(s_b.grad, r_b.grad, what="second call")
    kept = [k for k, v in vars(mod).items() if torch.is_tensor(v)]
    assert kept == [] and list(mod.buffers()) == []
    assert all(not v.requires_grad for v in mod.last_parts.values())


def test_blocks_and_worker_threads_give_the_same_numbers(monkeypatch):
    """One image per block, two single-threaded workers == the whole batch in one block on one thread."""
    import detkd.losses.fgd as fgd_module

    n = 5
    mod, ref = build_pair(24, 32, 12)
    torch.manual_seed(12)
    s = torch.randn(n, 24, 20, 20, dtype=torch.float64) * 2
    t = torch.randn(n, 32, 20, 20, dtype=torch.float64)
    boxes = make_boxes(n, 12)
    threads = torch.get_num_threads()

    def run():
        for p in mod.parameters():
            p.grad = None
        x = s.clone().requires_grad_(True)
        loss = mod(x, t, boxes, IMG)
        assert torch.get_num_threads() == threads_now  # restored after the forward
        loss.backward()
        assert torch.get_num_threads() == threads_now  # and after the backward
        return [loss.detach(), x.grad] + [p.grad.clone() for p in mod.parameters()]

    try:
        monkeypatch.setattr(fgd_module, "_BLOCK_BYTES", 1 << 40)
        threads_now = 1
        torch.set_num_threads(1)
        whole = run()
        monkeypatch.setattr(fgd_module, "_BLOCK_BYTES", 1)
        threads_now = 2
        torch.set_num_threads(2)
        blocked = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(blocked, whole):
        rel_close(a, b, tol=1e-10, floor=1e-12)
    x = s.clone().requires_grad_(True)
    ref_loss = ref(x, t, boxes, [IMG] * n)[0]
    ref_loss.backward()
    rel_close(whole[0], ref_loss)
    rel_close(whole[1], x.grad)


def test_mask_builder_many_boxes_in_several_bit_groups():
    """More than 62 boxes per image (several int64 bit sets) still give the exact loop masks."""
    g = torch.Generator().manual_seed(21)
    boxes = []
    for k in (130, 63, 0, 1):
        xy = torch.rand(k, 2, generator=g) * 300
        wh = 1 + torch.rand(k, 2, generator=g) * 120
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=320)], 1))
    padded, valid = pad_boxes(boxes)
    for hw in (40, 13):
        fg, bg = fgd_masks(padded, valid, IMG, (hw, hw + 3))
        lfg, lbg = loop_masks(boxes, [IMG] * len(boxes), hw, hw + 3, torch.float32)
        assert torch.equal(fg, lfg) and torch.equal(bg, lbg)


def test_retain_graph_backward_twice_and_inference_mode():
    mod, _ = build_pair(16, 16, 13)
    s = torch.randn(2, 16, 10, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 16, 10, 10, dtype=torch.float64)
    boxes = make_boxes(2, 13)
    loss = mod(s, t, boxes, IMG)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    rel_close(s.grad, 2 * first, tol=1e-12)
    with torch.inference_mode():
        again = mod(s.detach(), t, boxes, IMG)
    rel_close(again, loss.detach(), tol=1e-12)


def test_no_grad_call_and_weighted_sum_of_parts():
    mod, _ = build_pair(16, 16, 10)
    s = torch.randn(2, 16, 10, 10, dtype=torch.float64)
    t = torch.randn(2, 16, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        loss, parts = mod(s, t, make_boxes(2, 10), IMG, return_parts=True)
    expect = (
        mod.alpha_fgd * parts["fg"] + mod.beta_fgd * parts["bg"] + mod.gamma_fgd * parts["mask"]
        + mod.lambda_fgd * parts["rela"]
    )
    rel_close(loss, expect, tol=1e-12)
