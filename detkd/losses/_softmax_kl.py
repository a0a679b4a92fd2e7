"""Shared kernel of the softmax-KL losses (Hinton KD, CWD, LD): the summed KL and its gradient, one node.

Private helper; the public functions are :func:`detkd.losses.logits.kd_loss`,
:func:`detkd.losses.features.cwd_loss` and :func:`detkd.losses.boxes.ld_loss`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["softmax_kl_sum"]


class _SoftmaxKLSum(torch.autograd.Function):
    """``sum p_t * (log p_t - log p_s)`` with ``p_x = softmax(x / tau, dim)``; gradient to ``s`` only.

    Forward: ``log p_t``, ``p_t = exp(log p_t)``, ``log p_s``, then ``log p_t - log p_s`` in place and its
    ``p_t``-weighted sum: four full-size temporaries at most, none kept but ``p_t``. Backward:
    ``grad_s = g / tau * (softmax(s / tau) - p_t)``, recomputing ``softmax(s / tau)`` from ``s`` (an input,
    kept alive by the caller anyway) into the one new tensor, so that only ``p_t`` is saved (autograd on
    the plain expression saves three full-size tensors). Optional per-row weights ``w`` are folded into the saved
    ``p_t`` (``grad_s = g / tau * (w * softmax(s / tau) - w * p_t)``). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, tau: float, dim: int, w: Tensor | None = None) -> Tensor:
        scaled = torch.div(t, tau) if tau != 1.0 else t
        log_p_t = torch.log_softmax(scaled, dim)
        p_t = torch.exp(log_p_t)
        if w is not None:  # per-row weights: fold them into p_t (the sum and the gradient are linear in them)
            w = w.unsqueeze(dim)
            p_t.mul_(w)
        if tau != 1.0:
            scaled = torch.div(s, tau, out=scaled)  # reuse the buffer
        else:
            scaled = s
        log_p_t.sub_(torch.log_softmax(scaled, dim))  # log p_t - log p_s
        del scaled
        total = log_p_t.mul_(p_t).sum()
        ctx.save_for_backward(s, p_t, w)
        ctx.tau, ctx.dim = tau, dim
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        s, p_t, w = ctx.saved_tensors  # p_t already times w
        tau = ctx.tau
        grad = torch.softmax(torch.div(s, tau) if tau != 1.0 else s, ctx.dim)
        if w is not None:
            grad.mul_(w)
        grad.sub_(p_t).mul_(g / tau)
        return grad, None, None, None, None


def softmax_kl_sum(s: Tensor, t: Tensor, tau: float, dim: int, weight: Tensor | None = None) -> Tensor:
    """``sum over all elements of p_t * (log p_t - log p_s)``, ``p_x = softmax(x / tau, dim)``.

    ``s`` and ``t`` have the same shape and a floating dtype (the caller upcasts); ``t`` gets no gradient.
    Returns a 0-dim tensor. Equal to ``F.kl_div(log p_s, log p_t, log_target=True, reduction="sum")``.
    ``weight``: optional per-row weights of ``s``'s shape without ``dim`` (no gradient): each row's KL times it.
    """
    w = None if weight is None else weight.detach().to(s.dtype)
    return _SoftmaxKLSum.apply(s, t.detach(), float(tau), dim, w)
