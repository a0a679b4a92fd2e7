"""Focal and Global Distillation (FGD) for one feature level, with a vectorised box-mask builder.

Reference: Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022. Numbers match
the authors' code, github.com/yzd-v/FGD, ``mmdet/distillation/losses/fgd.py``, ``FeatureLoss``: same
formula, masks, normalisation, parameter names and initialisation. The computation is reorganised (not
changed) so that the foreground, background and relation terms share one squared-difference pass; see
:class:`FGDLoss`.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.losses._blocks import one_thread_per_op as _one_thread_per_op
from detkd.losses._blocks import run_blocks as _run_blocks

__all__ = ["FGDLoss", "fgd_masks", "pad_boxes"]

ImgShape = Union[Sequence[int], Tensor]
_BOX_BITS = 62  # boxes per int64 bit set in fgd_masks


def pad_boxes(boxes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Pad a per-image list of boxes into one tensor.

    Args:
        boxes: ``N`` tensors of shape ``(n_i, 4)`` (``xyxy`` pixels); ``n_i`` may be 0 (a ``(0,)`` tensor
            is accepted for an empty image).

    Returns:
        ``(boxes (N, M, 4), valid (N, M) bool)`` with ``M = max n_i`` (0 when no image has a box).
        Padded rows are zeros and ``valid`` is False there.
    """
    if len(boxes) == 0:
        return torch.zeros(0, 0, 4), torch.zeros(0, 0, dtype=torch.bool)
    rows = [b.reshape(-1, 4) for b in boxes]
    device = rows[0].device
    lengths = torch.tensor([r.shape[0] for r in rows], device=device)
    padded = nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (N, M, 4)
    valid = torch.arange(padded.shape[1], device=device)[None, :] < lengths[:, None]
    return padded, valid


def _img_hw(img_shape: ImgShape, n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(H_img, W_img)`` or an ``(N, 2)`` tensor -> two ``(N, 1)`` tensors."""
    shape = torch.as_tensor(img_shape, device=device).to(dtype)
    if shape.dim() == 1:
        shape = shape.expand(n, 2)
    return shape[:, 0:1], shape[:, 1:2]


def fgd_masks(
    gt_boxes: Tensor,
    gt_valid: Tensor | None,
    img_shape: ImgShape,
    feat_hw: tuple[int, int],
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """FGD's foreground (area-scaled) and background (normalised) masks, without Python loops.

    For each box, with ``(h, w) = feat_hw`` (FGD reference rule)::

        wmin = floor(x1 / W_img * w)   wmax = ceil(x2 / W_img * w)
        hmin = floor(y1 / H_img * h)   hmax = ceil(y2 / H_img * h)
        cells  rows hmin..hmax, cols wmin..wmax  (inclusive: the reference slices [min : max + 1])
        area = 1 / ((hmax + 1 - hmin) * (wmax + 1 - wmin))

    ``mask_fg[n, i, j]`` is the largest ``area`` among the boxes covering cell ``(i, j)`` (0 if none);
    ``mask_bg[n] = 1[mask_fg[n] == 0] / sum(1[mask_fg[n] == 0])`` (left all-zero when every cell is
    foreground). Note that ``area`` counts the extra row/column the inclusive rule adds even when it lies
    past the map border (``hmax == h``), exactly as the reference does.

    The scaled coordinates are computed in ``gt_boxes``' dtype (float32 at least) with the reference's
    operation order (divide, then multiply), so floor/ceil agree with it bit for bit. Boxes are first
    clamped to the image (``0 <= x <= W_img``, ``0 <= y <= H_img``); for boxes inside the image this
    changes nothing. (For boxes outside it, the reference's Python slicing with negative indices gives
    meaningless masks.) Memory: ``(N, M, h + w)`` booleans and a few ``(N, h, w)`` tensors, never an
    ``(N, M, h, w)`` one.

    Args:
        gt_boxes: ``(N, M, 4)`` ``xyxy`` boxes in input-image pixels.
        gt_valid: ``(N, M)`` bool, False for padding rows; None means all valid.
        img_shape: ``(H_img, W_img)`` of the network input, or an ``(N, 2)`` tensor of per-image shapes
            (what mmdet's ``img_metas[i]['img_shape'][:2]`` gives the reference).
        feat_hw: ``(h, w)`` of the feature map.
        dtype: dtype of the returned masks; default that of the coordinates (see above).

    Returns:
        ``mask_fg (N, h, w)``, ``mask_bg (N, h, w)``.
    """
    h, w = int(feat_hw[0]), int(feat_hw[1])
    n, m = gt_boxes.shape[0], gt_boxes.shape[1]
    device = gt_boxes.device
    box_dtype = torch.float32
    if gt_boxes.is_floating_point():
        box_dtype = torch.promote_types(gt_boxes.dtype, torch.float32)
    out_dtype = dtype if dtype is not None else box_dtype
    boxes = gt_boxes.to(box_dtype)
    img_h, img_w = _img_hw(img_shape, n, device, box_dtype)  # (N, 1) each

    x1 = torch.minimum(boxes[..., 0].clamp(min=0), img_w)
    y1 = torch.minimum(boxes[..., 1].clamp(min=0), img_h)
    x2 = torch.minimum(boxes[..., 2].clamp(min=0), img_w)
    y2 = torch.minimum(boxes[..., 3].clamp(min=0), img_h)
    wmin = torch.floor(x1 / img_w * w).long()  # (N, M)
    wmax = torch.ceil(x2 / img_w * w).long()
    hmin = torch.floor(y1 / img_h * h).long()
    hmax = torch.ceil(y2 / img_h * h).long()

    if gt_valid is None:
        valid = torch.ones(n, m, dtype=torch.bool, device=device)
    else:
        valid = gt_valid.to(device=device, dtype=torch.bool)
    n_rows, n_cols = hmax + 1 - hmin, wmax + 1 - wmin
    valid = valid & (n_rows > 0) & (n_cols > 0)
    # 1 / rows / cols, two divisions in out_dtype as the reference (bit-equal to it in float32)
    area = 1.0 / n_rows.clamp(min=1).to(out_dtype) / n_cols.clamp(min=1).to(out_dtype)
    area = torch.where(valid, area, torch.zeros((), dtype=out_dtype, device=device))

    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_rows = (rows >= hmin[..., None]) & (rows <= hmax[..., None]) & valid[..., None]  # (N, M, h)
    in_cols = (cols >= wmin[..., None]) & (cols <= wmax[..., None])  # (N, M, w)
    mask_fg = torch.zeros(n, h, w, dtype=out_dtype, device=device)
    if m > 0:
        # Largest covering area per cell without an (N, M, h, w) temporary: boxes sorted by area (largest
        # first) become bits of an integer; a cell's covering set is rowbits[i] & colbits[j] and its largest
        # covering box is the lowest set bit. 62 boxes per group (int64), groups in the same order.
        order = area.argsort(dim=1, descending=True, stable=True)
        area_sorted = area.gather(1, order)
        in_rows = in_rows.gather(1, order[..., None].expand(n, m, h))
        in_cols = in_cols.gather(1, order[..., None].expand(n, m, w))
        for g0 in range(0, m, _BOX_BITS):  # ceil(M / 62) groups, 1 for up to 62 boxes per image
            g1 = min(m, g0 + _BOX_BITS)
            bits = torch.ones((), dtype=torch.int64, device=device) << torch.arange(g1 - g0, device=device)
            row_bits = (in_rows[:, g0:g1].long() * bits[:, None]).sum(dim=1)  # (N, h); distinct powers: sum == or
            col_bits = (in_cols[:, g0:g1].long() * bits[:, None]).sum(dim=1)  # (N, w)
            cover = row_bits[:, :, None] & col_bits[:, None, :]  # (N, h, w)
            lowest = (cover & -cover).to(torch.float32)  # 2^k exactly (k <= 61), 0 where no box covers
            first = (torch.frexp(lowest).exponent - 1).clamp(min=0).long()
            val = area_sorted[:, g0:g1].gather(1, first.reshape(n, h * w)).reshape(n, h, w)
            val = torch.where(cover != 0, val, torch.zeros((), dtype=out_dtype, device=device))
            mask_fg = torch.maximum(mask_fg, val)

    mask_bg = (mask_fg <= 0).to(out_dtype)
    mask_bg = mask_bg / mask_bg.sum(dim=(1, 2), keepdim=True).clamp(min=1)
    return mask_fg, mask_bg


def _context_block(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels // 2, kernel_size=1),
        nn.LayerNorm([channels // 2, 1, 1]),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels // 2, channels, kernel_size=1),
    )


_BLOCK_BYTES = 8 << 20  # CPU: images per block so that a block of a feature is at most about this big


def _image_blocks(x: Tensor) -> list[slice]:
    """Slices of whole images tiling ``x (N, C, HW)``: as many as fit in ``_BLOCK_BYTES`` (at least one)
    on CPU, the whole batch elsewhere."""
    n = x.shape[0]
    per_image = x[0].numel() * x.element_size() if n else 0
    k = n if x.device.type != "cpu" or per_image == 0 else max(1, _BLOCK_BYTES // per_image)
    return [slice(i, min(n, i + k)) for i in range(0, n, max(k, 1))]


def _sq_diff(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``out = (a - b)^2`` (one pass where the out= form of mse_loss exists)."""
    try:
        return torch._C._nn.mse_loss(a, b, 0, out=out)  # reduction 0 = "none"
    except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - other torch builds
        torch.sub(a, b, out=out)
        return out.square_()


def _softmax_logits_grad(x: Tensor, p: Tensor, g_ctx: Tensor) -> Tensor:
    """Gradient w.r.t. the logits of ``sum_hw x * softmax(logits)``: ``x (B, C, HW)``, ``p (B, HW)``,
    ``g_ctx (B, C)`` -> ``(B, HW)``."""
    g_p = torch.bmm(g_ctx.unsqueeze(1), x).reshape(p.shape)
    return p * (g_p - (p * g_p).sum(dim=1, keepdim=True))


def _fgd_stats(s, t, fg, bg, wm_s, bm_s, wm_t, bm_t, temp, workers):
    """Every full-size computation of FGD's forward, student and teacher, in one sweep.

    ``s, t (N, C, HW)`` contiguous, ``fg, bg (N, HW)`` the box masks, ``wm_* (C,)`` and ``bm_* (1,)`` or
    None the ``conv_mask_s / conv_mask_t`` weights and biases. With ``A_s^X = HW softmax_hw(sum_c |X| / C
    / temp)`` (spatial attention), returns the small tensors the loss is made of::

        q[n, k, c]      = sum_hw (s - t)^2 * [A_s^T fg, A_s^T bg, 1][n, k, hw]     (N, 3, C)
        mask_sp         = sum_{n,hw} |A_s^S - A_s^T|                             ()
        ch_s, ch_t      = sum_hw |s|, sum_hw |t|                                 (N, C)
        ctx_s[n, 0 / 1] = [sum_hw s * p_s, sum_hw s],  p_s = softmax_hw(wm_s . s + bm_s)   (N, 2, C)
        ctx_t           = the same for t with wm_t, bm_t                         (N, 2, C)

    and what the backward needs (``weights (N, 3, HW)``, ``p_s, p_t (N, HW)``, ``p_att (N, HW)`` the
    student's spatial softmax, ``u = sgn(A_s^S - A_s^T)``).

    Everything is per image, so on CPU the batch is processed in blocks of whole images (about 8 MiB of
    a feature per block; :func:`_run_blocks`) with one block-sized scratch tensor per worker: each block
    of ``s`` and ``t`` is read from memory once and the dozen reductions over it (batched matmuls, the
    narrow operand first) reuse it from cache. No full-size temporary.
    """
    n, c, hw = s.shape
    new = s.new_empty
    sp_s, ch_s, sp_t, ch_t = new(n, 1, hw), new(n, 1, c), new(n, 1, hw), new(n, 1, c)
    weights, q = new(n, 3, hw), new(n, 3, c)
    p_s, p_t, ctx_s, ctx_t = new(n, hw), new(n, hw), new(n, 2, c), new(n, 2, c)
    one = s.new_ones(1, 1, 1)
    wm_s3, wm_t3 = wm_s.reshape(1, 1, c), wm_t.reshape(1, 1, c)

    def block(bi: slice, work: Tensor) -> None:
        sb, tb = s[bi], t[bi]
        b = sb.shape[0]
        wk = work[:b]
        ones_c, ones_hw = one.expand(b, 1, c), one.expand(b, 1, hw)
        w = weights[bi]
        w[:, 2] = 1
        # one tensor after the other, the reads of it back to back (what is left of it in cache)
        for x, sp, ch, wm, bm, p, cx in (
            (tb, sp_t, ch_t, wm_t3, bm_t, p_t, ctx_t), (sb, sp_s, ch_s, wm_s3, bm_s, p_s, ctx_s)
        ):
            logits = torch.bmm(wm.expand(b, 1, c), x).reshape(b, hw)
            if bm is not None:
                logits = logits + bm
            torch.softmax(logits, dim=1, out=p[bi])
            torch.bmm(torch.stack([p[bi], w[:, 2]], dim=1), x.transpose(1, 2), out=cx[bi])
            torch.abs(x, out=wk)
            torch.bmm(ones_c, wk, out=sp[bi])
            torch.bmm(ones_hw, wk.transpose(1, 2), out=ch[bi])
        a_s_t = hw * F.softmax(sp_t[bi, 0] / c / temp, dim=1)
        torch.mul(a_s_t, fg[bi], out=w[:, 0])
        torch.mul(a_s_t, bg[bi], out=w[:, 1])
        torch.bmm(w, _sq_diff(sb, tb, wk).transpose(1, 2), out=q[bi])

    if n:
        blocks = _image_blocks(s)
        _run_blocks(blocks, block, (blocks[0].stop - blocks[0].start, c, hw), s, workers)
    a_s_t = hw * F.softmax(sp_t.reshape(n, hw) / c / temp, dim=1)
    p_att = F.softmax(sp_s.reshape(n, hw) / c / temp, dim=1)
    diff = hw * p_att - a_s_t
    mask_sp = diff.abs().sum()
    u = torch.sgn(diff)  # d|x|/dx, 0 at 0 (as autograd)
    stats = (q, mask_sp, ch_s.reshape(n, c), ctx_s, ctx_t, ch_t.reshape(n, c))
    return stats, (weights, p_s, p_t, p_att, u)


def _fgd_grads(s, t, saved, wm_s, wm_t, has_bias, temp, needs, grads, workers):
    """Backward of :func:`_fgd_stats`: gradients w.r.t. ``s``, ``wm_s``, ``bm_s``, ``wm_t``, ``bm_t``.

    ``grads``: those of ``q, mask_sp, ch_s, ctx_s, ctx_t`` (None where unused); ``needs``: which of the
    five results are wanted. The gradient w.r.t. ``s``,

        2 (s - t) * (g_q^T @ W) + sgn(s) * (g_sp + g_ch) + g_ctx (x) p_s + g_sum (x) 1 + wm_s (x) g_logits

    (``g_sp``: through the spatial attention, ``g_logits``: through the context softmax), is built block
    by block in place in the one new full-size tensor, the gradient itself.
    """
    weights, p_s, p_t, p_att, u = saved
    n, c, hw = s.shape
    need_s, need_wm_s, need_bm_s, need_wm_t, need_bm_t = needs
    zeros = s.new_zeros
    g_q, g_mask_sp, g_ch, g_ctx_s, g_ctx_t = grads
    g_q = zeros(n, 3, c) if g_q is None else g_q
    g_mask_sp = zeros(()) if g_mask_sp is None else g_mask_sp
    g_ch = zeros(n, c) if g_ch is None else g_ch
    g_ctx_s = zeros(n, 2, c) if g_ctx_s is None else g_ctx_s
    g_ctx_t = zeros(n, 2, c) if g_ctx_t is None else g_ctx_t
    student_ctx = need_s or need_wm_s or need_bm_s
    teacher_ctx = need_wm_t or need_bm_t
    grad_s = grad_wm_s = grad_bm_s = grad_wm_t = grad_bm_t = None
    gl_s = s.new_empty(n, hw) if student_ctx else None
    gl_t = s.new_empty(n, hw) if teacher_ctx else None
    gw_s = s.new_empty(n, 1, c) if need_wm_s else None
    gw_t = s.new_empty(n, 1, c) if need_wm_t else None
    if need_s:
        grad_s = torch.empty_like(s)  # the one new full-size tensor
        g_q2 = (2 * g_q).transpose(1, 2)  # (N, C, 3)
        rank3_g = torch.stack([g_ctx_s[:, 0], g_ctx_s[:, 1], wm_s.expand(n, c)], dim=2)  # (N, C, 3)
        # d mask_sp / d (sum_c |s|): through |.| and the softmax
        g_sp = p_att * (u - (p_att * u).sum(dim=1, keepdim=True)) * (g_mask_sp * hw / (c * temp))
        g_sp3, g_ch3 = g_sp.unsqueeze(1), g_ch.unsqueeze(2)

    def block(bi: slice, work: Tensor) -> None:
        sb, tb = s[bi], t[bi]
        if student_ctx:
            gl_s[bi] = _softmax_logits_grad(sb, p_s[bi], g_ctx_s[bi, 0])
        if teacher_ctx:
            gl_t[bi] = _softmax_logits_grad(tb, p_t[bi], g_ctx_t[bi, 0])
        if need_wm_s:
            torch.bmm(gl_s[bi].unsqueeze(1), sb.transpose(1, 2), out=gw_s[bi])
        if need_wm_t:
            torch.bmm(gl_t[bi].unsqueeze(1), tb.transpose(1, 2), out=gw_t[bi])
        if need_s:
            gb, wk = grad_s[bi], work[: sb.shape[0]]
            torch.bmm(g_q2[bi], weights[bi], out=gb)
            torch.sub(sb, tb, out=wk)
            gb.mul_(wk)
            torch.sgn(sb, out=wk)
            gb.addcmul_(wk, g_sp3[bi])
            gb.addcmul_(wk, g_ch3[bi])
            rank3_w = torch.stack([p_s[bi], weights[bi, 2], gl_s[bi]], dim=1)  # (B, 3, HW)
            gb.baddbmm_(rank3_g[bi], rank3_w)

    if n and (student_ctx or teacher_ctx):
        blocks = _image_blocks(s)
        work_shape = (blocks[0].stop - blocks[0].start, c, hw) if need_s else (0,)
        _run_blocks(blocks, block, work_shape, s, workers)
    if need_wm_s:
        grad_wm_s = gw_s.sum(dim=(0, 1))
    if need_wm_t:
        grad_wm_t = gw_t.sum(dim=(0, 1))
    if has_bias[0] and need_bm_s:
        grad_bm_s = gl_s.sum().reshape(1)
    if has_bias[1] and need_bm_t:
        grad_bm_t = gl_t.sum().reshape(1)
    return grad_s, grad_wm_s, grad_bm_s, grad_wm_t, grad_bm_t


def _context_add(ctx: Tensor, w1, b1, ln_w, ln_b, ln_eps, w2, b2) -> Tensor:
    """A ``channel_add_conv`` block (1x1 conv, LayerNorm([C/2, 1, 1]), ReLU, 1x1 conv) applied to
    ``ctx (N, C)`` as linear maps: the same numbers as ``block(ctx[..., None, None])``."""
    y = F.linear(ctx, w1.flatten(1), b1)
    y = F.layer_norm(y, (y.shape[1],), None if ln_w is None else ln_w.flatten(),
                     None if ln_b is None else ln_b.flatten(), ln_eps)
    return F.linear(F.relu(y), w2.flatten(1), b2)


def _fgd_loss_from_stats(stats, hw, temp, weights, eps_s, eps_t, add_s, add_t):
    """FGD's loss and parts from :func:`_fgd_stats`' small tensors (autograd-friendly, all ``(N, C)``)."""
    q, mask_sp, ch_s, ctx_s, ctx_t, ch_t = stats
    n, c = ch_s.shape
    alpha, beta, gamma, lam = weights
    a_c_t = c * F.softmax(ch_t / hw / temp, dim=1)
    a_c_s = c * F.softmax(ch_s / hw / temp, dim=1)
    fg = (q[:, 0] * a_c_t).sum() / n
    bg = (q[:, 1] * a_c_t).sum() / n
    mask = (a_c_s - a_c_t).abs().sum() / n + mask_sp / n
    a_s = _context_add(ctx_s[:, 0], *add_s[:4], eps_s, *add_s[4:])
    a = a_s - _context_add(ctx_t[:, 0], *add_t[:4], eps_t, *add_t[4:])
    # sum_hw (D + a)^2 = sum_hw D^2 + 2 a sum_hw D + HW a^2, per (n, c), D = S - T
    rela = (q[:, 2] + 2 * a * (ctx_s[:, 1] - ctx_t[:, 1]) + hw * a * a).sum() / n
    loss = alpha * fg + beta * bg + gamma * mask + lam * rela
    return loss, (fg, bg, mask, rela)


class _FGDLossFn(torch.autograd.Function):
    """FGD for one level as one autograd node: :func:`_fgd_stats`, then the loss from its small tensors.

    The small part (attention softmaxes, context blocks, weighted sums; ``(N, C)`` tensors) is recorded by
    autograd inside the forward and differentiated inside the backward, so that the whole backward runs
    under :func:`_one_thread_per_op` too (with two threads on a busy machine, each of the few dozen tiny
    backward operations of that part was an OpenMP region costing ~7 ms). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, s, t, fg, bg, cfg, wm_s, bm_s, wm_t, bm_t, *add_params):
        temp, weights, eps_s, eps_t, workers, build_graph = cfg
        stats, saved = _fgd_stats(s, t, fg, bg, wm_s, bm_s, wm_t, bm_t, temp, workers)
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(build_graph) for x in stats[:5]]
            params = [None if p is None else p.detach().requires_grad_(build_graph) for p in add_params]
            loss, parts = _fgd_loss_from_stats(
                (*leaves, stats[5]), s.shape[2], temp, weights, eps_s, eps_t, params[:6], params[6:]
            )
        ctx.graph = (loss, leaves, params) if build_graph else None
        ctx.save_for_backward(s, t, wm_s, wm_t, *saved)
        ctx.cfg = (temp, (bm_s is not None, bm_t is not None))
        parts = tuple(x.detach() for x in parts)
        ctx.mark_non_differentiable(*parts)
        return (loss.detach(), *parts)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, *_g_parts):
        if ctx.graph is None:
            raise RuntimeError("FGDLoss: the forward ran without autograd, there is nothing to differentiate")
        s, t, wm_s, wm_t, *saved = ctx.saved_tensors
        temp, has_bias = ctx.cfg
        loss, leaves, params = ctx.graph
        need = ctx.needs_input_grad
        with _one_thread_per_op(s.device) as workers:
            wanted = [x for x in leaves] + [p for p in params if p is not None]
            got = torch.autograd.grad(loss, wanted, g_loss, retain_graph=True, allow_unused=True)
            g_stats, g_params = list(got[: len(leaves)]), iter(got[len(leaves):])
            param_grads = [None if p is None else next(g_params) for p in params]
            grads = _fgd_grads(s, t, saved, wm_s, wm_t, has_bias, temp,
                               (need[0], need[5], need[6], need[7], need[8]), g_stats, workers)
        grad_s, grad_wm_s, grad_bm_s, grad_wm_t, grad_bm_t = grads
        return (grad_s, None, None, None, None, grad_wm_s, grad_bm_s, grad_wm_t, grad_bm_t, *param_grads)


def _conv1x1(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """1x1 convolution as one batched matmul (same numbers as ``conv(x)``)."""
    n, c, h, w = x.shape
    out = torch.matmul(conv.weight.flatten(1), x.reshape(n, c, h * w))
    if conv.bias is not None:
        out = out + conv.bias[:, None]
    return out.reshape(n, -1, h, w)


class FGDLoss(nn.Module):
    """Focal and Global Distillation loss for one feature level, with its learnable parts.

    With ``S = align(preds_S)`` (1x1 conv ``Cs -> Ct`` with bias, only when ``Cs != Ct``) and
    ``T = preds_T.detach()``, both ``(N, C, H, W)``::

        A_s[n, h, w] = H*W * softmax_{hw}( mean_c |X| / temp )          (spatial attention)
        A_c[n, c]    = C   * softmax_c ( mean_{hw} |X| / temp )         (channel attention)
        fg   = sum_{n,c,h,w} (S - T)^2 * A_c^T[n,c] * A_s^T[n,h,w] * Mask_fg[n,h,w] / N
        bg   = same with Mask_bg
        mask = sum |A_c^S - A_c^T| / N + sum |A_s^S - A_s^T| / N
        ctx(X)  = sum_{hw} X[n, :, hw] * softmax_{hw}(conv_mask(X))[n, hw]            (N, C)
        rela = sum_{n,c,h,w} (S + add_s(ctx_s(S)) - T - add_t(ctx_t(T)))^2 / N
               with add = conv1x1(C -> C/2) -> LayerNorm([C/2, 1, 1]) -> ReLU -> conv1x1(C/2 -> C)
        loss = alpha_fgd * fg + beta_fgd * bg + gamma_fgd * mask + lambda_fgd * rela

    ``^T`` / ``^S``: attention of the teacher / student feature. Both fg and bg use the *teacher's*
    attention for both features, as the reference does. The masks are :func:`fgd_masks`. Gradients reach
    the student feature, ``align``, ``conv_mask_s``, ``channel_add_conv_s`` and, through the relation
    term, ``conv_mask_t`` and ``channel_add_conv_t`` (as in the reference); never the teacher feature.

    Implementation. The reference multiplies each feature by ``sqrt(A_c^T A_s^T Mask)`` and runs separate
    fg / bg / relation MSEs; here ``D = S - T`` is squared once and reduced against the rows
    ``[A_s^T Mask_fg, A_s^T Mask_bg, 1]`` with one batched matmul, and the relation term uses
    ``sum_hw (D + a)^2 = sum_hw D^2 + 2 a sum_hw D + HW a^2`` (``a = add_s - add_t`` is per channel).
    The whole level is one autograd node (:class:`_FGDLossFn`): the full-size work (:func:`_fgd_stats`:
    attention sums, that pass, both GcBlock contexts) runs image block by image block through a small
    scratch tensor, and its backward builds the student gradient in place in the one new full-size
    tensor. Nothing is kept in the module between calls (no workspace). On CPU with ``k > 1`` torch
    threads, the blocks go to ``k`` single-threaded workers instead of per-operation OpenMP regions, so
    a busy machine does not stall every operation (:func:`_one_thread_per_op`; the thread count is set to
    1 during the call and restored). Values equal the reference's to rounding (float64 tests: 1e-5
    relative, values and gradients). Not twice differentiable.

    Defaults are those of the reference ``FeatureLoss`` signature (``temp=0.5, alpha=1e-3,
    beta=5e-4, gamma=1e-3, lambda=5e-6``). The authors' configs differ from it:

    - RetinaNet, GFL, SOLO: ``temp=0.5, alpha=0.001, beta=0.0005, gamma=0.0005, lambda=0.000005``
    - Faster / Mask / Cascade R-CNN students: ``temp=0.5, alpha=0.00005, beta=0.000025,
      gamma=0.00005, lambda=0.0000005``
    - RepPoints: ``temp=0.5, alpha=0.0016, beta=0.0008, gamma=0.0008, lambda=0.000008``
    - FCOS: ``temp=0.8`` with the RepPoints weights.

    Parameter names (``align``, ``conv_mask_s/t``, ``channel_add_conv_s/t``) and initialisation (Kaiming
    normal, fan-in, for ``conv_mask_*``; zeros for the last conv of ``channel_add_conv_*``; PyTorch
    defaults elsewhere) are the reference's, so its state dicts load directly. One module per FPN level,
    as in the reference (its ``name`` argument is not needed here).

    Args:
        student_channels: ``Cs``; teacher_channels: ``Ct`` (a 1x1 ``align`` conv is added when they differ).
        temp: attention temperature. alpha_fgd, beta_fgd, gamma_fgd, lambda_fgd: weights of the fg, bg,
            attention-mask and relation terms.

    Shapes:
        ``preds_S (N, Cs, H, W)``, ``preds_T (N, Ct, H, W)``; ``gt_boxes`` a list of ``N`` ``(n_i, 4)``
        ``xyxy`` pixel tensors, or a padded ``(N, M, 4)`` tensor with ``gt_valid (N, M)`` bool;
        ``img_shape = (H_img, W_img)`` of the network input (or ``(N, 2)`` per image; mmdet gives the
        reference each image's unpadded ``img_shape`` while the features cover the padded batch, so pass
        per-image shapes to reproduce mmdet runs exactly). Returns a scalar;
        the detached parts (``fg, bg, mask, rela``, unweighted) are kept in ``self.last_parts`` and are
        also returned with ``return_parts=True``. Half-precision activations are computed in float32.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        temp: float = 0.5,
        alpha_fgd: float = 0.001,
        beta_fgd: float = 0.0005,
        gamma_fgd: float = 0.001,
        lambda_fgd: float = 0.000005,
    ) -> None:
        super().__init__()
        self.temp = temp
        self.alpha_fgd = alpha_fgd
        self.beta_fgd = beta_fgd
        self.gamma_fgd = gamma_fgd
        self.lambda_fgd = lambda_fgd
        self.align: nn.Module | None = None
        if student_channels != teacher_channels:
            self.align = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, stride=1, padding=0)
        self.conv_mask_s = nn.Conv2d(teacher_channels, 1, kernel_size=1)
        self.conv_mask_t = nn.Conv2d(teacher_channels, 1, kernel_size=1)
        self.channel_add_conv_s = _context_block(teacher_channels)
        self.channel_add_conv_t = _context_block(teacher_channels)
        self.last_parts: dict[str, Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference init: mmcv ``kaiming_init(mode='fan_in')`` and ``constant_init(last conv, 0)``."""
        for conv in (self.conv_mask_s, self.conv_mask_t):
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        for block in (self.channel_add_conv_s, self.channel_add_conv_t):
            nn.init.zeros_(block[-1].weight)
            nn.init.zeros_(block[-1].bias)

    def forward(
        self,
        preds_S: Tensor,
        preds_T: Tensor,
        gt_boxes: Tensor | Sequence[Tensor],
        img_shape: ImgShape,
        gt_valid: Tensor | None = None,
        return_parts: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Loss for one level; see the class docstring. ``return_parts=True`` also returns the parts."""
        if preds_S.dim() != 4 or preds_T.dim() != 4 or preds_S.shape[-2:] != preds_T.shape[-2:]:
            raise ValueError(
                f"FGDLoss: need (N, C, H, W) features with equal H, W; got {tuple(preds_S.shape)} and "
                f"{tuple(preds_T.shape)}"
            )
        if not torch.is_tensor(gt_boxes):
            gt_boxes, gt_valid = pad_boxes(gt_boxes)
        with torch.autocast(device_type=preds_S.device.type, enabled=False):
            with _one_thread_per_op(preds_S.device) as workers:
                return self._forward(preds_S, preds_T, gt_boxes, img_shape, gt_valid, return_parts, workers)

    def _forward(self, preds_S, preds_T, gt_boxes, img_shape, gt_valid, return_parts, workers=1):
        dtype = torch.promote_types(preds_S.dtype, torch.float32)
        s = preds_S.to(dtype)
        t = preds_T.detach().to(dtype)
        if self.align is not None:
            s = _conv1x1(self.align, s)
        n, c, h, w = s.shape
        if t.shape[:2] != (n, c):
            raise ValueError(f"FGDLoss: aligned student is {tuple(s.shape)}, teacher {tuple(t.shape)}")
        hw = h * w
        s = s.reshape(n, c, hw).contiguous()
        t = t.reshape(n, c, hw).contiguous()

        with torch.no_grad():
            mask_fg, mask_bg = fgd_masks(gt_boxes.to(s.device), gt_valid, img_shape, (h, w), dtype=dtype)

        def cast(p):
            return None if p is None else p.to(dtype)

        add_params = []
        for block in (self.channel_add_conv_s, self.channel_add_conv_t):
            conv1, norm, _, conv2 = block
            add_params += [cast(x) for x in (conv1.weight, conv1.bias, norm.weight, norm.bias)]
            add_params += [cast(conv2.weight), cast(conv2.bias)]
        cfg = (self.temp, (self.alpha_fgd, self.beta_fgd, self.gamma_fgd, self.lambda_fgd),
               self.channel_add_conv_s[1].eps, self.channel_add_conv_t[1].eps, workers,
               torch.is_grad_enabled() and not torch.is_inference_mode_enabled())
        loss, fg, bg, mask, rela = _FGDLossFn.apply(
            s, t, mask_fg.reshape(n, hw), mask_bg.reshape(n, hw), cfg,
            cast(self.conv_mask_s.weight.reshape(c)), cast(self.conv_mask_s.bias),
            cast(self.conv_mask_t.weight.reshape(c)), cast(self.conv_mask_t.bias), *add_params,
        )
        parts = {"fg": fg, "bg": bg, "mask": mask, "rela": rela}
        self.last_parts = parts
        return (loss, parts) if return_parts else loss
