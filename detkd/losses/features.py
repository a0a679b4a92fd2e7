"""Feature-map distillation losses: FitNets, channel-wise (CWD), Pearson (PKD) and attention transfer (AT).

All functions take student and teacher feature maps ``(N, C, H, W)`` (PKD also takes sequences of
levels) and return a scalar loss tensor. Conventions shared by every function here:

* The teacher input is detached inside the function: it never receives gradients.
* Half-precision inputs (float16 / bfloat16) are upcast to float32 before any arithmetic, so the
  reductions run in float32 and the returned loss is float32. float32 / float64 inputs keep their dtype.
* No loss weight is applied: multiply by the method's weight outside (the mmrazor detection configs use
  ``loss_weight=10`` for CWD and PKD on RetinaNet FPN levels, for example).

Numbers follow the mmrazor implementations (mmrazor 1.x, ``mmrazor/models/losses``), normalisation
included; where an option deviates from them the docstring says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.losses._softmax_kl import softmax_kl_sum

__all__ = ["fitnet_loss", "cwd_loss", "pkd_loss", "at_loss"]

_FITNET_REDUCTIONS = ("mean", "sum", "batchmean", "none")


def _upcast(x: Tensor) -> Tensor:
    """Return ``x`` as float32 if it is float16/bfloat16, otherwise unchanged."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _check_4d(name: str, s: Tensor, t: Tensor) -> None:
    if s.dim() != 4 or t.dim() != 4:
        raise ValueError(
            f"{name}: expected (N, C, H, W) feature maps, got student {tuple(s.shape)} "
            f"and teacher {tuple(t.shape)}"
        )


def fitnet_loss(s: Tensor, t: Tensor, reduction: str = "mean", normalize: bool = False) -> Tensor:
    """FitNets hint loss: squared error between (adapted) student and teacher features.

    Reference: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.

    The student feature must already be mapped to the teacher's shape (the "regressor" / adapter,
    e.g. a 1x1 conv, lives outside this function).

    Args:
        s: student feature ``(N, C, H, W)`` (any shape ``(N, ...)`` works), after the adapter.
        t: teacher feature, same shape as ``s``. Detached inside.
        reduction: how the squared errors ``d = (s - t)^2`` are reduced:
            ``"mean"`` (default) -> ``d.sum() / d.numel()``, i.e. ``F.mse_loss(s, t)``;
            ``"batchmean"`` -> ``d.sum() / N``; ``"sum"`` -> ``d.sum()``; ``"none"`` -> ``d``.
        normalize: if True, each sample's flattened feature is first divided by its L2 norm
            (``x / ||x||_2`` over ``C*H*W``; eps 1e-12 guards all-zero samples).

    Returns:
        Scalar loss (or ``d`` with ``reduction="none"``).

    Defaults: ``reduction="mean", normalize=False`` is the plain MSE hint used by most FitNets
    re-implementations (RepDistiller ``HintLoss``, torchdistill, mdistiller: ``MSELoss()``).
    mmrazor's FitNets config uses ``L2Loss()`` with its defaults (``normalize=True, mult=1,
    div_element=False``), which is ``fitnet_loss(s, t, reduction="batchmean", normalize=True)``:
    ``sum_n ||s_n/||s_n|| - t_n/||t_n|| ||^2 / N``. Its scale differs from the default by a large factor,
    so pick the form whose loss weight you copy (mmrazor's FitNets config uses ``loss_weight=10`` with
    ``L2Loss``).
    """
    if s.shape != t.shape:
        raise ValueError(
            f"fitnet_loss: student {tuple(s.shape)} and teacher {tuple(t.shape)} must have the same "
            "shape; adapt the student feature first (e.g. a 1x1 conv)"
        )
    if reduction not in _FITNET_REDUCTIONS:
        raise ValueError(f"fitnet_loss: reduction must be one of {_FITNET_REDUCTIONS}, got {reduction!r}")
    s = _upcast(s)
    t = _upcast(t.detach())
    if normalize:
        s = F.normalize(s.flatten(1), p=2.0, dim=1, eps=1e-12).view_as(s)
        t = F.normalize(t.flatten(1), p=2.0, dim=1, eps=1e-12).view_as(t)
    d = (s - t).pow(2)
    if reduction == "mean":
        return d.mean()
    if reduction == "sum":
        return d.sum()
    if reduction == "batchmean":
        return d.sum() / s.shape[0]
    return d


def cwd_loss(s: Tensor, t: Tensor, tau: float = 1.0) -> Tensor:
    """Channel-wise distillation: KL between per-channel spatial softmax distributions.

    Reference: Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021;
    numbers match mmrazor ``ChannelWiseDivergence`` (``mmrazor/models/losses/cwd.py``).

    Each channel map is turned into a distribution over the ``H*W`` positions:
    ``p^T_{n,c} = softmax(t_{n,c,:} / tau)``, ``p^S_{n,c} = softmax(s_{n,c,:} / tau)``, and

        loss = tau^2 / (N * C) * sum_{n,c} sum_{i in H*W} p^T_{n,c,i} * (log p^T_{n,c,i} - log p^S_{n,c,i})

    i.e. KL(p^T || p^S) summed over positions, averaged over the ``N*C`` channel maps, times ``tau^2``.

    Args:
        s: student feature ``(N, C, H, W)`` (adapted to the teacher's channels).
        t: teacher feature ``(N, C, H, W)``. Detached inside.
        tau: softmax temperature. Default 1.0 (mmrazor's detection configs use ``tau=1`` with
            ``loss_weight=10``; its segmentation configs use ``tau=1``/``4`` with ``loss_weight=3``).

    Returns:
        Scalar loss; zero when ``s == t``.

    Implementation: one autograd node (``detkd.losses._softmax_kl``) that keeps only ``p^T`` for the
    backward and recomputes ``p^S`` there; ``tau^2 / (N C)`` is applied to the summed KL.
    """
    _check_4d("cwd_loss", s, t)
    if s.shape != t.shape:
        raise ValueError(
            f"cwd_loss: student {tuple(s.shape)} and teacher {tuple(t.shape)} must have the same shape"
        )
    n, c = s.shape[:2]
    s = _upcast(s)
    t = _upcast(t.detach())
    dtype = torch.promote_types(s.dtype, t.dtype)
    # One autograd node that keeps only p^T (and s) for the backward; tau^2 / (N C) applied to the sum.
    kl = softmax_kl_sum(s.to(dtype).flatten(2), t.to(dtype).flatten(2), tau, dim=-1)
    return kl * (tau**2 / (n * c))


def _standardize_channels(x: Tensor) -> Tensor:
    """Standardise each channel over (N, H, W): ``(x - mean) / (std + 1e-6)``, unbiased std."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), correction=1, keepdim=True)
    return (x - mean) / (std + 1e-6)


_PKD_EPS = 1e-6
_BLOCK_BYTES = 8 << 20  # CPU: images per block in the PKD moments and the AT channel means


class _PKDLevel(torch.autograd.Function):
    """One level of :func:`pkd_loss` from per-channel moments; gradient to ``s`` only.

    With ``M = N*H*W`` values per channel, ``A_x = sum (x - mean_x)^2``, ``X = sum (s - mean_s)(t -
    mean_t)``, ``sd_x = sqrt(A_x / (M - 1))``, ``a = sd_s + eps``, ``b = sd_t + eps``::

        sum_m (z_s - z_t)^2 = A_s / a^2 + A_t / b^2 - 2 X / (a b)        (per channel)
        loss = sum_c (...) / (2 N C H W)

    The moments come from one sweep in blocks of images (centred values in two reused scratch tensors,
    two-pass, no full-size temporary); the backward is one per-channel affine map of ``s`` and ``t``::

        grad_s = g / (N C H W) * (alpha (s - mean_s) - beta (t - mean_t)),
        alpha = 1/a^2 - sd_s/a^3 + X / (a^2 b sd_s (M - 1)),   beta = 1 / (a b)

    (the exact derivative of the standardised MSE, unbiased std included). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor) -> Tensor:
        n, c = s.shape[:2]
        s3, t3 = s.reshape(n, c, -1), t.reshape(n, c, -1)
        m = n * s3.shape[2]
        mu_s, mu_t = s3.mean(dim=(0, 2)), t3.mean(dim=(0, 2))
        a_s, a_t, cross = s.new_zeros(c), s.new_zeros(c), s.new_zeros(c)
        per_image = max(s3[0].numel() * s3.element_size(), 1) if n else 1
        k = max(1, _BLOCK_BYTES // per_image) if s.device.type == "cpu" else max(n, 1)
        sc, tc = s3.new_empty((min(k, n), c, s3.shape[2])), t3.new_empty((min(k, n), c, s3.shape[2]))
        for i in range(0, n, k):  # blocks of images (cache blocking); every op is batched over a block
            b = min(n, i + k) - i
            scb = torch.sub(s3[i : i + k], mu_s[:, None], out=sc[:b])
            tcb = torch.sub(t3[i : i + k], mu_t[:, None], out=tc[:b])
            cross += (scb * tcb).sum(dim=(0, 2))
            a_s += scb.square_().sum(dim=(0, 2))
            a_t += tcb.square_().sum(dim=(0, 2))
        sd_s, sd_t = (a_s / (m - 1)).sqrt(), (a_t / (m - 1)).sqrt()
        a, b = sd_s + _PKD_EPS, sd_t + _PKD_EPS
        per_channel = a_s / (a * a) + a_t / (b * b) - 2 * cross / (a * b)
        ctx.save_for_backward(s, t, mu_s, mu_t, sd_s, a, b, cross)
        ctx.m = m
        return per_channel.sum() / (2 * s.numel())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        s, t, mu_s, mu_t, sd_s, a, b, cross = ctx.saved_tensors
        k = g / s.numel()
        alpha = (1 / (a * a) - sd_s / (a * a * a) + cross / (a * a * b * sd_s * (ctx.m - 1))) * k
        beta = k / (a * b)
        shape = (1, -1) + (1,) * (s.dim() - 2)
        grad = torch.sub(s, mu_s.view(shape)).mul_(alpha.view(shape))
        grad.addcmul_(t, beta.view(shape), value=-1.0).add_((beta * mu_t).view(shape))
        return grad, None


def pkd_loss(
    s: Tensor | Sequence[Tensor],
    t: Tensor | Sequence[Tensor],
    resize_stu: bool = True,
) -> Tensor:
    """Pearson-correlation KD: MSE between channel-standardised features, halved, summed over levels.

    Reference: Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson
    Correlation Coefficient", NeurIPS 2022; numbers match mmrazor ``PKDLoss``
    (``mmrazor/models/losses/pkd_loss.py``).

    For each level, every channel is standardised over the batch and spatial positions
    (``M = N*H*W`` values): ``z = (x - mean) / (std + 1e-6)`` with the unbiased std (divisor
    ``M - 1``), for student and teacher separately. Then

        loss_level = mean_{n,c,h,w} (z^S - z^T)^2 / 2,        loss = sum over levels

    which equals ``(M - 1) / M * mean_c (1 - r_c)`` up to the eps, ``r_c`` being the Pearson
    correlation between student and teacher channel ``c``.

    Args:
        s: student feature ``(N, C, H, W)``, or a list/tuple of such levels.
        t: teacher feature(s), same structure and channel counts as ``s``. Detached inside.
        resize_stu: when a level's spatial sizes differ, bilinearly resize (``align_corners=False``)
            the student to the teacher's size if True (default), else the teacher to the student's.

    Returns:
        Scalar loss (sum over levels); zero when ``s == t``.

    Implementation: per level, one autograd node computes the per-channel moments (means, centred sums
    of squares, cross sums: ``sum (z^S - z^T)^2 = A_s / a^2 + A_t / b^2 - 2 X / (a b)`` with ``a, b`` the
    std + eps) in one sweep without full-size temporaries; its backward is one per-channel affine map of
    ``s`` and ``t`` (``_PKDLevel``).

    Deviation: mmrazor only compares heights to decide whether to resize (and then asserts equal
    shapes); here any spatial mismatch triggers the resize. Where mmrazor runs, the numbers agree.
    mmrazor's ``zip`` silently drops extra levels; here differing level counts raise ``ValueError``.
    """
    if isinstance(s, Tensor) != isinstance(t, Tensor):
        raise ValueError("pkd_loss: pass either two tensors or two sequences of tensors")
    levels_s = (s,) if isinstance(s, Tensor) else tuple(s)
    levels_t = (t,) if isinstance(t, Tensor) else tuple(t)
    if len(levels_s) != len(levels_t) or not levels_s:
        raise ValueError(
            f"pkd_loss: got {len(levels_s)} student and {len(levels_t)} teacher levels; "
            "need the same non-zero number"
        )
    loss = None
    for level, (fs, ft) in enumerate(zip(levels_s, levels_t)):
        _check_4d("pkd_loss", fs, ft)
        if fs.shape[:2] != ft.shape[:2]:
            raise ValueError(
                f"pkd_loss: level {level}: student {tuple(fs.shape)} and teacher {tuple(ft.shape)} "
                "must share N and C"
            )
        fs = _upcast(fs)
        ft = _upcast(ft.detach())
        if fs.shape[-2:] != ft.shape[-2:]:
            if resize_stu:
                fs = F.interpolate(fs, size=ft.shape[-2:], mode="bilinear", align_corners=False)
            else:
                ft = F.interpolate(ft, size=fs.shape[-2:], mode="bilinear", align_corners=False)
        if fs.numel():
            dtype = torch.promote_types(fs.dtype, ft.dtype)
            term = _PKDLevel.apply(fs.to(dtype), ft.to(dtype))
        else:
            term = (_standardize_channels(fs) - _standardize_channels(ft)).pow(2).mean() / 2
        loss = term if loss is None else loss + term
    return loss


def _mean_sq_channels(x: Tensor) -> Tensor:
    """``x (N, C, HW)`` contiguous -> ``mean_c x^2`` ``(N, HW)``, without autograd.

    On CPU in blocks of whole images (about ``_BLOCK_BYTES``) through one reused scratch tensor, the sum
    over channels as a batched row-vector x matrix product: no full-size temporary.
    """
    n, c, hw = x.shape
    out = x.new_empty(n, 1, hw)
    per_image = max(c * hw * x.element_size(), 1)
    k = max(1, _BLOCK_BYTES // per_image) if x.device.type == "cpu" else max(n, 1)
    work = x.new_empty((min(k, n), c, hw)) if n else None
    for i in range(0, n, k):  # blocks of images (cache blocking); every op is batched over a block
        xb = x[i : i + k]
        wk = torch.mul(xb, xb, out=work[: xb.shape[0]])
        torch.bmm(x.new_full((1, 1, 1), 1.0 / c).expand(xb.shape[0], 1, c), wk, out=out[i : i + k])
    return out.reshape(n, hw)


class _MeanSqChannels(torch.autograd.Function):
    """``mean_c x^2`` of ``(N, C, HW)`` as one node: backward ``grad_x = x * (2 g / C)``, one new tensor
    (autograd on ``x.pow(2).mean(1)`` makes three)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return _mean_sq_channels(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        return torch.mul(x, (g * (2.0 / x.shape[1])).unsqueeze(1))


def _attention_map(x: Tensor) -> Tensor:
    """``(N, C, H, W) -> (N, H*W)``: channel-mean of ``x^2``, L2-normalised per sample."""
    n, c = x.shape[:2]
    if x.is_contiguous() and x.numel():
        q = _MeanSqChannels.apply(x.reshape(n, c, -1))
    else:
        q = x.pow(2).mean(dim=1).flatten(1)
    return F.normalize(q, p=2.0, dim=1, eps=1e-12)


def at_loss(s: Tensor, t: Tensor) -> Tensor:
    """Attention transfer on spatial attention maps.

    Reference: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017; numbers match
    mmrazor ``ATLoss`` (``mmrazor/models/losses/at_loss.py``) and the authors' ``at_loss`` per pair.

    ``a(x)_n = q_n / ||q_n||_2`` with ``q_n = mean_c x_{n,c,:,:}^2`` flattened to ``H*W`` (F.normalize,
    eps 1e-12), and

        loss = mean_{n, i in H*W} (a(s)_{n,i} - a(t)_{n,i})^2

    (the authors additionally scale by ``beta / 2`` with ``beta = 1e3``; mmrazor and this function leave
    that to the loss weight).

    Args:
        s: student feature ``(N, Cs, H, W)``.
        t: teacher feature ``(N, Ct, H, W)``; ``Ct`` may differ from ``Cs`` (attention maps have no
            channel axis), ``N, H, W`` must match: resize a feature outside if needed. Detached inside.

    Returns:
        Scalar loss; zero when the attention maps are equal (e.g. ``s == t``).
    """
    _check_4d("at_loss", s, t)
    if s.shape[0] != t.shape[0] or s.shape[-2:] != t.shape[-2:]:
        raise ValueError(
            f"at_loss: student {tuple(s.shape)} and teacher {tuple(t.shape)} must share N, H and W "
            "(channel counts may differ)"
        )
    a_s = _attention_map(_upcast(s))
    a_t = _attention_map(_upcast(t.detach()))
    return (a_s - a_t).pow(2).mean()
