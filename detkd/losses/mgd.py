"""Masked generative distillation (MGD) for one feature level.

Reference: Yang et al., "Masked Generative Distillation", ECCV 2022. Numbers match the authors' detection
code (github.com/yzd-v/MGD, ``det/mmdet/distillation/losses/mgd.py``, ``FeatureLoss``) and mmrazor's
``MGDConnector`` + ``MGDLoss`` (``mmrazor/models/architectures/connectors/mgd_connector.py``,
``mmrazor/models/losses/mgd_loss.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.losses._blocks import one_thread_per_op, run_blocks

__all__ = ["MGDLoss"]


_SPARSE_MAX_KEEP = 0.75  # above this kept fraction the dense convolution is used
_SPARSE_MIN_POSITIONS = 2048  # below this many positions (N*H*W) too: per-call overhead dominates


def _taps(idx: Tensor, h: int, w: int, spare: int):
    """For each tap ``(dy, dx)`` of a 3x3 kernel (padding 1): the output row (``n*H*W + i*W + j``) that
    each kept input row ``idx`` feeds, ``spare`` where it falls outside the map, and the inside mask."""
    i = torch.div(idx, w, rounding_mode="floor") % h
    j = idx % w
    for dy in range(3):
        for dx in range(3):
            oi, oj = i - (dy - 1), j - (dx - 1)
            inside = (oi >= 0) & (oi < h) & (oj >= 0) & (oj < w)
            target = idx - ((dy - 1) * w + (dx - 1))
            yield dy, dx, torch.where(inside, target, torch.full_like(target, spare)), inside


def _row_blocks(idx: Tensor, n: int, hw: int, workers: int) -> list[tuple[int, int, int]]:
    """``(block number, first row, end row)`` of the kept rows ``idx`` per block: the whole batch for one
    worker, one image per block for several."""
    if workers <= 1 or n <= 1:
        return [(0, 0, idx.numel())]
    bounds = torch.searchsorted(idx, torch.arange(n + 1, device=idx.device) * hw).tolist()
    return [(i, bounds[i], bounds[i + 1]) for i in range(n)]


class _MaskedConv3x3(torch.autograd.Function):
    """``conv2d(x * keep, weight, bias, padding=1)`` computed from the kept positions only.

    ``x (N, C, H, W)``, ``weight (O, C, 3, 3)``, ``bias (O,)`` or None, ``keep (N, H, W)`` bool (detached).
    With ``P`` kept positions (rows ``x_k (P, C)``, NHWC order), each of the nine kernel taps is one
    matmul ``x_k @ W[:, :, dy, dx]^T`` whose rows are added (``index_add_``) to the output rows they
    shift to; taps that fall outside the map go to a spare row. The backward gathers the output gradient
    rows the same way: ``grad x_k = sum_taps g_tap @ W_tap``, ``grad W_tap = g_tap^T @ x_k``, and the
    gradient of ``x`` is zero at masked positions. Same numbers as the dense convolution up to the order
    of the float additions, at ``P / (N H W)`` of its multiply-adds (0.35 at MGD's default ``lambda_mgd``)
    for the forward, the weight gradient and the input gradient. The output is channels-last.

    On CPU with several torch threads the images are shared among single-threaded workers
    (``detkd.losses._blocks``): their output rows are disjoint, each has its own spare row and its own
    weight-gradient accumulator.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, keep: Tensor) -> Tensor:
        n, c, h, w = x.shape
        o = weight.shape[0]
        rows = n * h * w
        with one_thread_per_op(x.device) as workers:
            idx = keep.reshape(-1).nonzero().squeeze(1)  # (P,) kept positions, n*H*W + i*W + j
            xk = x.permute(0, 2, 3, 1)[keep]  # (P, C)
            wt = weight.permute(2, 3, 1, 0).contiguous()  # (3, 3, C, O)
            blocks = _row_blocks(idx, n, h * w, workers)
            out = x.new_zeros(rows + len(blocks), o)  # NHWC rows + a spare row per block

            def block(blk, z):
                k, r0, r1 = blk
                xb, zb = xk[r0:r1], z[: r1 - r0]
                for dy, dx, target, _ in _taps(idx[r0:r1], h, w, rows + k):
                    torch.mm(xb, wt[dy, dx], out=zb)
                    out.index_add_(0, target, zb)

            run_blocks(blocks, block, (max(r1 - r0 for _, r0, r1 in blocks), o), x, workers)
            y = out[:rows]
            if bias is not None:
                y.add_(bias)
        ctx.save_for_backward(xk, wt, idx, keep)
        ctx.shape = (n, c, h, w, o)
        ctx.has_bias = bias is not None
        return y.view(n, h, w, o).permute(0, 3, 1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        xk, wt, idx, keep = ctx.saved_tensors
        n, c, h, w, o = ctx.shape
        rows = n * h * w
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        with one_thread_per_op(gy.device) as workers:
            grows = gy.permute(0, 2, 3, 1).reshape(rows, o)  # a view when gy is channels-last
            if need_b and ctx.has_bias:
                grad_b = grows.sum(dim=0)
            if need_x or need_w:
                gxk = gy.new_zeros(xk.shape) if need_x else None
                blocks = _row_blocks(idx, n, h * w, workers)
                rmax = max(r1 - r0 for _, r0, r1 in blocks)
                wsize = 9 * o * c if need_w else 0

                def block(blk, work):  # work: [g rows | weight-gradient accumulator (3, 3, O, C)]
                    _, r0, r1 = blk
                    g = work[: (r1 - r0) * o].view(r1 - r0, o)
                    gw = work[rmax * o : rmax * o + wsize].view(3, 3, o, c) if need_w else None
                    xb = xk[r0:r1]
                    for dy, dx, target, inside in _taps(idx[r0:r1], h, w, 0):
                        torch.index_select(grows, 0, target, out=g)
                        outside = (~inside).nonzero().squeeze(1)
                        if outside.numel():
                            g.index_fill_(0, outside, 0)
                        if need_x:
                            gxk[r0:r1].addmm_(g, wt[dy, dx].t())
                        if need_w:
                            gw[dy, dx].addmm_(g.t(), xb)

                works = run_blocks(blocks, block, (rmax * o + wsize,), gy, workers, zero_work=True)
                if need_w:
                    gw = works[0][rmax * o :]
                    for extra in works[1:]:
                        gw = gw + extra[rmax * o :]
                    grad_w = gw.view(3, 3, o, c).permute(2, 3, 0, 1).contiguous()
                if need_x:
                    grad_x = gy.new_zeros((n, c, h, w))
                    grad_x.permute(0, 2, 3, 1)[keep] = gxk
        return grad_x, grad_w, grad_b, None


class MGDLoss(nn.Module):
    """Masked generative distillation loss with its learnable align and generator blocks.

    The student feature is (optionally) aligned to the teacher's channels with a 1x1 conv, random
    spatial positions are zeroed, and a small generator must rebuild the full teacher feature from what
    is left::

        f   = align(S)                      # 1x1 conv Cs -> Ct (with bias), only when Cs != Ct
        M   = 1[u > 1 - lambda_mgd] ? 0 : 1, u ~ U[0, 1) of shape (N, 1, H, W)   # ~lambda_mgd masked
        G   = conv3x3(ReLU(conv3x3(f * M)))  # Ct -> Ct -> Ct, padding 1, with bias
        loss = alpha_mgd * sum_{n,c,h,w} (G - T)^2 / N

    (squared error summed over channels and positions, averaged over the batch only, as in the
    reference). A new mask is drawn on every call unless one is passed in.

    Args:
        student_channels: ``Cs``, channels of the student feature.
        teacher_channels: ``Ct``, channels of the teacher feature.
        alpha_mgd: loss weight. Default ``2e-5``, the authors' value for one-stage detectors
            (RetinaNet, RepPoints) and SOLO, also used by mmrazor's RetinaNet config. Their Faster/Mask
            R-CNN configs use ``alpha_mgd=5e-7, lambda_mgd=0.45``.
        lambda_mgd: fraction of positions masked (expected value). Default ``0.65``.
        mask_on_channel: if True, mask whole channels (mask shape ``(N, Ct, 1, 1)``) instead of
            positions, as mmrazor's ``MGDConnector(mask_on_channel=True)``. Default False.

    Parameter names (``align.*``, ``generation.0.*``, ``generation.2.*``) and default initialisation
    (PyTorch's ``nn.Conv2d`` default) are the reference's, so its state dicts load directly.

    Speed: the first generator convolution only sees the kept positions (``1 - lambda_mgd`` of them), so
    on CPU it is computed from those alone (:class:`_MaskedConv3x3`: forward, weight and input gradients
    at about 35% of the dense multiply-adds by default); same parameters, same output up to float
    rounding. It applies to 0/1 spatial masks keeping at most 75% of the positions (maps of at least
    2048 positions in all), in float32/float64 outside autocast; ``sparse_conv = False`` (attribute) always uses the dense ``self.generation``.

    Shapes:
        ``preds_S (N, Cs, H, W)``, ``preds_T (N, Ct, H, W)`` -> scalar. Half-precision activations are
        upcast to float32 for the squared-error reduction; the result is float32 (or float64 for
        float64 inputs). ``preds_T`` is detached inside.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        alpha_mgd: float = 2e-5,
        lambda_mgd: float = 0.65,
        mask_on_channel: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= lambda_mgd <= 1.0:
            raise ValueError(f"MGDLoss: lambda_mgd must be in [0, 1], got {lambda_mgd}")
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.alpha_mgd = alpha_mgd
        self.lambda_mgd = lambda_mgd
        self.mask_on_channel = mask_on_channel
        self.align: nn.Conv2d | None
        if student_channels != teacher_channels:
            self.align = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.align = None
        self.generation = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
        )
        self.sparse_conv = True

    def random_mask(
        self,
        n: int,
        h: int,
        w: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw a keep-mask: 1 keeps a position (or channel), 0 masks it; ``lambda_mgd`` masked on average.

        Shape ``(n, 1, h, w)``, or ``(n, Ct, 1, 1)`` with ``mask_on_channel``. With a ``generator``, the
        uniforms are drawn on the generator's device (so a CPU generator works for CUDA features) and
        moved to ``device``: the same seed gives the same mask everywhere.
        """
        shape = (n, self.teacher_channels, 1, 1) if self.mask_on_channel else (n, 1, h, w)
        if generator is not None:
            u = torch.rand(shape, generator=generator, device=generator.device).to(device)
        else:
            u = torch.rand(shape, device=device)
        return (u <= 1.0 - self.lambda_mgd).to(dtype)

    def _spatial_keep(self, mask: Tensor, feat: Tensor) -> Tensor | None:
        """``(N, H, W)`` bool keep-mask when :class:`_MaskedConv3x3` applies, else None (dense path).

        It applies on CPU, in float32 / float64 outside autocast, to a 0/1 mask over positions (not
        channels) keeping at most 75% of them on maps of at least 2048 positions (N*H*W), with the
        generator as built here (3x3 convs, padding 1).
        """
        if not self.sparse_conv or feat.device.type != "cpu" or feat.dtype not in (torch.float32, torch.float64):
            return None
        try:
            if torch.is_autocast_enabled("cpu"):
                return None
        except TypeError:  # pragma: no cover - older torch
            if torch.is_autocast_cpu_enabled():
                return None
        gen = self.generation
        if not (
            isinstance(gen, nn.Sequential) and len(gen) == 3 and isinstance(gen[0], nn.Conv2d)
            and isinstance(gen[2], nn.Conv2d) and isinstance(gen[1], nn.ReLU)
            and gen[0].kernel_size == (3, 3) and gen[0].padding == (1, 1) and gen[0].stride == (1, 1)
            and gen[0].dilation == (1, 1) and gen[0].groups == 1 and gen[0].padding_mode == "zeros"
        ):
            return None
        n, _, h, w = feat.shape
        if mask.dim() != 4 or mask.shape[1] != 1 or n * h * w < _SPARSE_MIN_POSITIONS:
            return None
        m = mask.reshape(mask.shape[0], h * w) if mask.shape[-2:] == (h, w) else None
        if m is None:
            return None
        keep = m.expand(n, h * w) != 0
        if not bool(((m == 0) | (m == 1)).all()) or keep.sum().item() > _SPARSE_MAX_KEEP * keep.numel():
            return None
        return keep.reshape(n, h, w)

    def forward(
        self,
        preds_S: Tensor,
        preds_T: Tensor,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Compute the MGD loss.

        Args:
            preds_S: student feature ``(N, Cs, H, W)``.
            preds_T: teacher feature ``(N, Ct, H, W)``. Detached inside.
            mask: optional keep-mask (1 keep, 0 mask) broadcastable to ``(N, Ct, H, W)``, e.g.
                ``(N, 1, H, W)``; when given, no random mask is drawn (for deterministic tests).
            generator: optional ``torch.Generator`` for the random mask (ignored if ``mask`` is given).

        Returns:
            Scalar loss ``alpha_mgd * ||G - T||^2 / N``.
        """
        if preds_S.dim() != 4 or preds_T.dim() != 4:
            raise ValueError(
                f"MGDLoss: expected (N, C, H, W) features, got student {tuple(preds_S.shape)} and "
                f"teacher {tuple(preds_T.shape)}"
            )
        n, cs, h, w = preds_S.shape
        if cs != self.student_channels or preds_T.shape[1] != self.teacher_channels:
            raise ValueError(
                f"MGDLoss: built for {self.student_channels} student / {self.teacher_channels} teacher "
                f"channels, got {cs} / {preds_T.shape[1]}"
            )
        if preds_T.shape[0] != n or preds_T.shape[-2:] != preds_S.shape[-2:]:
            raise ValueError(
                f"MGDLoss: student {tuple(preds_S.shape)} and teacher {tuple(preds_T.shape)} must share "
                "N, H and W"
            )
        target = preds_T.detach()
        feat = preds_S if self.align is None else self.align(preds_S)
        if mask is None:
            mask = self.random_mask(n, h, w, device=feat.device, dtype=feat.dtype, generator=generator)
        else:
            try:
                ok = torch.broadcast_shapes(mask.shape, feat.shape) == feat.shape
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(
                    f"MGDLoss: mask {tuple(mask.shape)} must broadcast to the aligned student feature "
                    f"{tuple(feat.shape)}"
                )
            mask = mask.detach().to(device=feat.device, dtype=feat.dtype)
        keep = self._spatial_keep(mask, feat)
        if keep is not None:
            conv1, _, conv2 = self.generation  # ReLU out of place: the Function's output is a view
            new_feat = conv2(F.relu(_MaskedConv3x3.apply(feat, conv1.weight, conv1.bias, keep)))
        else:
            new_feat = self.generation(feat * mask)
        if new_feat.dtype in (torch.float16, torch.bfloat16):
            new_feat = new_feat.float()
        if target.dtype in (torch.float16, torch.bfloat16):
            target = target.float()
        return (new_feat - target).pow(2).sum() / n * self.alpha_mgd
