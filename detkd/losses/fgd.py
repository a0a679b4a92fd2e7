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

__all__ = ["FGDLoss", "fgd_masks", "pad_boxes"]

ImgShape = Union[Sequence[int], Tensor]


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
    meaningless masks.) Memory: one ``(N, M, h, w)`` temporary in ``dtype``.

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
    in_rows = (rows >= hmin[..., None]) & (rows <= hmax[..., None])  # (N, M, h)
    in_cols = (cols >= wmin[..., None]) & (cols <= wmax[..., None])  # (N, M, w)
    row_val = in_rows.to(out_dtype) * area[..., None]  # (N, M, h)
    if m == 0:
        mask_fg = torch.zeros(n, h, w, dtype=out_dtype, device=device)
    else:
        mask_fg = (row_val[..., :, None] * in_cols[..., None, :].to(out_dtype)).amax(dim=1)  # (N, h, w)

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


def _abs_sums(x: Tensor, work: Tensor | None) -> tuple[Tensor, Tensor]:
    """``x (N, C, HW)`` -> ``sum_c |x| (N, HW)``, ``sum_hw |x| (N, C)``; ``|x|`` goes into ``work`` if given.

    Both sums are batched row-vector x matrix products, which on CPU read memory faster than ``sum``.
    (All batched matmuls here put the narrow ``(N, k, HW)`` operand first and the feature, or its
    transpose, second: the other orientations are 3-6x slower on CPU.)
    """
    n, c, hw = x.shape
    a = torch.abs(x, out=work) if work is not None else x.abs()
    sp = torch.bmm(a.new_ones(1, 1, c).expand(n, 1, c), a).reshape(n, hw)
    ch = torch.bmm(a.new_ones(1, 1, hw).expand(n, 1, hw), a.transpose(1, 2)).reshape(n, c)
    return sp, ch


def _context_and_sum(x: Tensor, wm: Tensor, bm: Tensor | None) -> tuple[Tensor, Tensor]:
    """GcBlock context and plain sum over positions, ``x (N, C, HW)`` -> ``(N, C)``, ``(N, C)``.

    ``context[n] = sum_hw x[n, :, hw] * softmax_hw(wm . x[n, :, hw] + bm)`` (``conv_mask`` as a dot
    product); both outputs come from one batched matmul. Autograd version, used for the teacher.
    """
    n, c, hw = x.shape
    logits = torch.bmm(wm.reshape(1, 1, c).expand(n, 1, c), x).reshape(n, hw)
    if bm is not None:
        logits = logits + bm
    p = F.softmax(logits, dim=1)
    out = torch.bmm(torch.stack([p, torch.ones_like(p)], dim=1), x.transpose(1, 2))  # (N, 2, C)
    return out[:, 0], out[:, 1]


class _StudentPass(torch.autograd.Function):
    """Every full-size reduction of the student feature in one autograd node.

    Inputs: ``s, t (N, C, HW)`` (``t`` gets no gradient), ``weights (N, K, HW)`` (no gradient),
    ``wm (C,)`` and ``bm (1,)`` or None: the student ``conv_mask`` weight and bias; ``work``: None or a
    scratch tensor shaped like ``s`` (overwritten). Outputs::

        q[n, k, c]    = sum_hw (s - t)^2 * weights[n, k, hw]                (N, K, C)
        abs_sp[n, hw] = sum_c |s|,   abs_ch[n, c] = sum_hw |s|              (N, HW), (N, C)
        ctx[n, c]     = sum_hw s * p[n, hw],  p = softmax_hw(wm . s + bm)   (N, C)
        sum_s[n, c]   = sum_hw s                                            (N, C)

    The gradient w.r.t. ``s`` is assembled in place in one new tensor::

        grad_s = 2 (s - t) * (g_q^T @ weights) + sgn(s) * (g_sp + g_ch)
                 + g_ctx (x) p + g_sum (x) 1 + wm (x) g_logits

    With a scratch tensor, forward+backward allocates one full-size tensor (the gradient); autograd on
    the plain expression allocates about a dozen, and on CPU a fresh full-size tensor costs several times
    the arithmetic done in it (page faults). Not twice differentiable.
    """

    @staticmethod
    def forward(
        ctx, s: Tensor, t: Tensor, weights: Tensor, wm: Tensor, bm: Tensor | None, work: Tensor | None
    ):
        n, c, hw = s.shape
        d2 = torch.sub(s, t, out=work) if work is not None else torch.sub(s, t)
        d2.square_()
        q = torch.bmm(weights, d2.transpose(1, 2))  # (N, K, C)
        del d2
        abs_sp, abs_ch = _abs_sums(s, work)
        logits = torch.bmm(wm.reshape(1, 1, c).expand(n, 1, c), s).reshape(n, hw)
        if bm is not None:
            logits = logits + bm
        p = F.softmax(logits, dim=1)
        out = torch.bmm(torch.stack([p, torch.ones_like(p)], dim=1), s.transpose(1, 2))  # (N, 2, C)
        ctx.save_for_backward(s, t, weights, wm, p)
        ctx.has_bias = bm is not None
        ctx.work = work
        return q, abs_sp, abs_ch, out[:, 0], out[:, 1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_q, g_sp, g_ch, g_ctx, g_sum):
        s, t, weights, wm, p = ctx.saved_tensors
        work = ctx.work
        n, c, hw = s.shape
        # context: d ctx / d p, then through the softmax to the conv_mask logits
        g_p = torch.bmm(g_ctx.unsqueeze(1), s).reshape(n, hw)
        g_logits = p * (g_p - (p * g_p).sum(dim=1, keepdim=True))
        grad_wm = grad_bm = grad_s = None
        if ctx.needs_input_grad[3]:
            grad_wm = torch.bmm(g_logits.unsqueeze(1), s.transpose(1, 2)).sum(dim=0).reshape(c)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bm = g_logits.sum().reshape(1)
        if ctx.needs_input_grad[0]:
            grad_s = torch.bmm(2 * g_q.transpose(1, 2), weights)  # the one new full-size tensor
            buf = torch.sub(s, t, out=work) if work is not None else torch.sub(s, t)
            grad_s.mul_(buf)
            torch.sgn(s, out=buf)
            grad_s.addcmul_(buf, g_sp.unsqueeze(1))
            grad_s.addcmul_(buf, g_ch.unsqueeze(2))
            del buf
            rank3_g = torch.stack([g_ctx, g_sum, wm.expand(n, c)], dim=2)  # (N, C, 3)
            rank3_w = torch.stack([p, torch.ones_like(p), g_logits], dim=1)  # (N, 3, HW)
            grad_s.baddbmm_(rank3_g, rank3_w)
        return grad_s, None, None, grad_wm, grad_bm, None


def _context_add(block: nn.Sequential, ctx: Tensor) -> Tensor:
    """``block`` (1x1 conv, LayerNorm([C/2, 1, 1]), ReLU, 1x1 conv) applied to ``ctx (N, C)`` as linear maps.

    Same numbers as ``block(ctx[..., None, None])``, without the convolution machinery for 1 x 1 maps.
    """
    conv1, norm, _, conv2 = block
    y = F.linear(ctx, conv1.weight.flatten(1), conv1.bias)
    y = F.layer_norm(y, (y.shape[1],), norm.weight.flatten(), norm.bias.flatten(), norm.eps)
    return F.linear(F.relu(y), conv2.weight.flatten(1), conv2.bias)


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
    The student's full-size work (that pass, its attention sums, its GcBlock context) is one autograd
    node whose backward builds the gradient in place in a single new tensor. On CPU a scratch tensor of
    the feature's size is kept in the module between calls (``cache_workspace``, default True; set it to
    False to free that memory), so a forward+backward allocates one full-size tensor instead of about a
    dozen. The module is therefore not safe to run concurrently from several threads. Values equal the
    reference's to rounding (float64 tests: 1e-5 relative, values and gradients). Not twice
    differentiable.

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
        self.cache_workspace = True
        self._work: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference init: mmcv ``kaiming_init(mode='fan_in')`` and ``constant_init(last conv, 0)``."""
        for conv in (self.conv_mask_s, self.conv_mask_t):
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        for block in (self.channel_add_conv_s, self.channel_add_conv_t):
            nn.init.zeros_(block[-1].weight)
            nn.init.zeros_(block[-1].bias)

    def __getstate__(self):  # copies and pickles (EMA, DDP, checkpoints) never carry the scratch tensor
        state = self.__dict__.copy()
        state["_work"] = None
        return state

    def _workspace(self, like: Tensor) -> Tensor | None:
        """Scratch tensor shaped like ``like``, kept between calls on CPU (None elsewhere)."""
        if not self.cache_workspace or like.device.type != "cpu":
            return None
        work = self._work
        if work is None or work.shape != like.shape or work.dtype != like.dtype:
            self._work = work = torch.empty_like(like, memory_format=torch.contiguous_format)
        return work

    def _attention_from_sums(self, abs_sp: Tensor, abs_ch: Tensor, c: int, hw: int) -> tuple[Tensor, Tensor]:
        """``sum_c |x| (N, HW)``, ``sum_hw |x| (N, C)`` -> spatial ``(N, HW)`` and channel ``(N, C)``."""
        a_s = hw * F.softmax(abs_sp / c / self.temp, dim=1)
        a_c = c * F.softmax(abs_ch / hw / self.temp, dim=1)
        return a_s, a_c

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
            return self._forward(preds_S, preds_T, gt_boxes, img_shape, gt_valid, return_parts)

    def _forward(self, preds_S, preds_T, gt_boxes, img_shape, gt_valid, return_parts):
        dtype = torch.promote_types(preds_S.dtype, torch.float32)
        s = preds_S.to(dtype)
        t = preds_T.detach().to(dtype)
        if self.align is not None:
            s = _conv1x1(self.align, s)
        n, c, h, w = s.shape
        if t.shape[:2] != (n, c):
            raise ValueError(f"FGDLoss: aligned student is {tuple(s.shape)}, teacher {tuple(t.shape)}")
        hw = h * w
        s = s.reshape(n, c, hw)
        t = t.reshape(n, c, hw)
        work = self._workspace(s)

        with torch.no_grad():
            a_s_t, a_c_t = self._attention_from_sums(*_abs_sums(t, work), c, hw)
            mask_fg, mask_bg = fgd_masks(gt_boxes.to(s.device), gt_valid, img_shape, (h, w), dtype=dtype)
            # Rows: foreground weight, background weight, ones (for the relation term).
            fg_w, bg_w = a_s_t * mask_fg.reshape(n, hw), a_s_t * mask_bg.reshape(n, hw)
            weights = torch.stack([fg_w, bg_w, torch.ones_like(a_s_t)], dim=1)  # (N, 3, HW)

        sq, abs_sp, abs_ch, ctx_s, sum_s = _StudentPass.apply(
            s, t, weights, self.conv_mask_s.weight.reshape(c), self.conv_mask_s.bias, work
        )
        a_s_s, a_c_s = self._attention_from_sums(abs_sp, abs_ch, c, hw)

        fg = (sq[:, 0] * a_c_t).sum() / n
        bg = (sq[:, 1] * a_c_t).sum() / n
        mask = (a_c_s - a_c_t).abs().sum() / n + (a_s_s - a_s_t).abs().sum() / n

        ctx_t, sum_t = _context_and_sum(t, self.conv_mask_t.weight.reshape(c), self.conv_mask_t.bias)
        a = _context_add(self.channel_add_conv_s, ctx_s) - _context_add(self.channel_add_conv_t, ctx_t)
        # sum_hw (D + a)^2 = sum_hw D^2 + 2 a sum_hw D + HW a^2, per (n, c)
        rela = (sq[:, 2] + 2 * a * (sum_s - sum_t) + hw * a * a).sum() / n

        loss = self.alpha_fgd * fg + self.beta_fgd * bg + self.gamma_fgd * mask + self.lambda_fgd * rela
        parts = {"fg": fg.detach(), "bg": bg.detach(), "mask": mask.detach(), "rela": rela.detach()}
        self.last_parts = parts
        return (loss, parts) if return_parts else loss
