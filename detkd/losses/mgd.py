"""Masked generative distillation (MGD) for one feature level.

Reference: Yang et al., "Masked Generative Distillation", ECCV 2022. Numbers match the authors' detection
code (github.com/yzd-v/MGD, ``det/mmdet/distillation/losses/mgd.py``, ``FeatureLoss``) and mmrazor's
``MGDConnector`` + ``MGDLoss`` (``mmrazor/models/architectures/connectors/mgd_connector.py``,
``mmrazor/models/losses/mgd_loss.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MGDLoss"]


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
        new_feat = self.generation(feat * mask)
        if new_feat.dtype in (torch.float16, torch.bfloat16):
            new_feat = new_feat.float()
        if target.dtype in (torch.float16, torch.bfloat16):
            target = target.float()
        return (new_feat - target).pow(2).sum() / n * self.alpha_mgd
