#!/usr/bin/env python
"""Time every detkd distillation loss at detector-training sizes (CPU by default).

Sizes: batch 16, a 640x640 input -> 8400 anchors (80/40/20 levels), 80 classes, C=256 FPN features,
30 ground-truth boxes per image. Each loss is timed forward (with autograd recording, as in training)
and forward+backward; median and p90 over ``--runs`` runs after ``--warmup`` runs are printed.
Feature losses are summed over the three levels (one module per level for MGD / FGD).

A plain per-image / per-box loop version of FGD (the reference algorithm, yzd-v/FGD ``FeatureLoss``:
separate foreground / background passes on sqrt-attention-weighted features) is included for
comparison; it exists only in this script. Losses whose module fails to import are reported as
'unavailable'.

    python tools/bench_losses.py --threads 2 --runs 20
    python tools/bench_losses.py --only FGDLoss,"FGD naive loop" --runs 5
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F


def _load(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as exc:  # noqa: BLE001 - any import problem means "unavailable"
        return exc


# ----------------------------------------------------------------------------------------------------
# Naive FGD: the reference algorithm, loop over images and boxes, full-size temporaries.
# ----------------------------------------------------------------------------------------------------
def naive_fgd(mod, preds_s, preds_t, boxes_list, img_hw):
    """Reference-style FGD on one level, using the parameters of a detkd ``FGDLoss`` ``mod``."""
    s = mod.align(preds_s) if mod.align is not None else preds_s
    t = preds_t.detach()
    n, c, h, w = s.shape

    def attention(x):
        v = x.abs()
        s_att = h * w * F.softmax((v.mean(dim=1, keepdim=True) / mod.temp).view(n, -1), dim=1)
        c_att = c * F.softmax(v.mean(dim=2).mean(dim=2) / mod.temp, dim=1)
        return s_att.view(n, h, w), c_att

    s_att_t, c_att_t = attention(t)
    s_att_s, c_att_s = attention(s)

    mask_fg = torch.zeros_like(s_att_t)
    mask_bg = torch.ones_like(s_att_t)
    img_h, img_w = img_hw
    for i in range(n):
        b = boxes_list[i]
        x1 = torch.floor(b[:, 0] / img_w * w).int()
        x2 = torch.ceil(b[:, 2] / img_w * w).int()
        y1 = torch.floor(b[:, 1] / img_h * h).int()
        y2 = torch.ceil(b[:, 3] / img_h * h).int()
        area = 1.0 / (y2 + 1 - y1) / (x2 + 1 - x1)
        for j in range(b.shape[0]):
            sl = (i, slice(int(y1[j]), int(y2[j]) + 1), slice(int(x1[j]), int(x2[j]) + 1))
            mask_fg[sl] = torch.maximum(mask_fg[sl], area[j])
        mask_bg[i] = torch.where(mask_fg[i] > 0, 0.0, 1.0)
        if mask_bg[i].sum():
            mask_bg[i] /= mask_bg[i].sum()

    st = torch.sqrt(s_att_t).unsqueeze(1)
    ct = torch.sqrt(c_att_t)[:, :, None, None]
    fea_t = t * st * ct
    fea_s = s * st * ct
    sfg, sbg = torch.sqrt(mask_fg).unsqueeze(1), torch.sqrt(mask_bg).unsqueeze(1)
    fg = F.mse_loss(fea_s * sfg, fea_t * sfg, reduction="sum") / n
    bg = F.mse_loss(fea_s * sbg, fea_t * sbg, reduction="sum") / n
    mask = (c_att_s - c_att_t).abs().sum() / n + (s_att_s - s_att_t).abs().sum() / n

    def gc(x, conv_mask, add):
        logits = F.softmax(conv_mask(x).view(n, 1, h * w), dim=2).unsqueeze(-1)
        context = torch.matmul(x.view(n, c, h * w).unsqueeze(1), logits).view(n, c, 1, 1)
        return x + add(context)

    rela = F.mse_loss(
        gc(s, mod.conv_mask_s, mod.channel_add_conv_s), gc(t, mod.conv_mask_t, mod.channel_add_conv_t),
        reduction="sum",
    ) / n
    return mod.alpha_fgd * fg + mod.beta_fgd * bg + mod.gamma_fgd * mask + mod.lambda_fgd * rela


# ----------------------------------------------------------------------------------------------------
def random_boxes(n_img, n_box, img, gen):
    """``n_img`` tensors of ``n_box`` xyxy pixel boxes inside an ``img x img`` image."""
    out = []
    for _ in range(n_img):
        xy = torch.rand(n_box, 2, generator=gen) * img * 0.8
        wh = 4 + torch.rand(n_box, 2, generator=gen) * img * 0.4
        out.append(torch.cat([xy, (xy + wh).clamp(max=img)], 1))
    return out


def stats(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def time_case(
    fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], runs: int, warmup: int, backward: bool
) -> tuple[float, float]:
    """Median and p90 seconds of ``fn()`` (and ``.backward()`` when ``backward``)."""
    times = []
    for i in range(warmup + runs):
        for p in leaves:
            p.grad = None
        t0 = time.perf_counter()
        loss = fn()
        if backward:
            loss.backward()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
        del loss
    for p in leaves:
        p.grad = None
    return stats(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per case (default 20)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--img", type=int, default=640, help="input size; levels are img/8, img/16, img/32")
    ap.add_argument("--boxes", type=int, default=30, help="gt boxes per image (FGD)")
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--only", default="", help="comma-separated case names to run (default all)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n, c, k, img = args.batch, args.channels, args.classes, args.img
    levels = [img // 8, img // 16, img // 32]
    a = sum(x * x for x in levels)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {n}, anchors {a}, classes {k}, "
        f"C {c}, levels {levels}, boxes/img {args.boxes}, runs {args.runs} (+{args.warmup} warmup)"
    )
    # CPU timings of large-tensor code depend on the allocator: with the default one every new
    # full-size tensor is page-faulted in; THP_MEM_ALLOC_ENABLE=1 (PyTorch) backs them with huge pages.
    print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '(unset)')}")

    cases: list[tuple[str, object, list[torch.Tensor]]] = []  # (name, fn or exception, grad leaves)

    kd_loss = _load("detkd.losses.logits", "kd_loss")
    sigmoid_kd_loss = _load("detkd.losses.logits", "sigmoid_kd_loss")
    ld_loss = _load("detkd.losses.boxes", "ld_loss")
    box_kd_loss = _load("detkd.losses.boxes", "box_kd_loss")
    fitnet_loss = _load("detkd.losses.features", "fitnet_loss")
    cwd_loss = _load("detkd.losses.features", "cwd_loss")
    pkd_loss = _load("detkd.losses.features", "pkd_loss")
    at_loss = _load("detkd.losses.features", "at_loss")
    MGDLoss = _load("detkd.losses.mgd", "MGDLoss")
    FGDLoss = _load("detkd.losses.fgd", "FGDLoss")

    def add(name: str, loss_fn, call: Callable[[], Callable[[], torch.Tensor]], leaves: list[torch.Tensor]):
        """Register a case; ``loss_fn`` is the imported object or the import error."""
        cases.append((name, loss_fn if isinstance(loss_fn, Exception) else call(), leaves))

    logit_s = torch.randn(n, a, k, requires_grad=True)
    logit_t = torch.randn(n, a, k)
    # kd_loss takes classes on dim 1: detkd's anchors-first (N, A, K) tensors are passed transposed.
    add("kd_loss", kd_loss, lambda: lambda: kd_loss(logit_s.mT, logit_t.mT), [logit_s])
    add("sigmoid_kd_loss", sigmoid_kd_loss, lambda: lambda: sigmoid_kd_loss(logit_s, logit_t), [logit_s])

    bins_s = torch.randn(n * a * 4, 16, requires_grad=True)
    bins_t = torch.randn(n * a * 4, 16)
    add("ld_loss", ld_loss, lambda: lambda: ld_loss(bins_s, bins_t), [bins_s])

    xy = torch.rand(n, a, 2, generator=gen) * img
    wh = 2 + torch.rand(n, a, 2, generator=gen) * img / 4
    box_t = torch.cat([xy, xy + wh], -1)
    box_s = (box_t + torch.randn(n, a, 4, generator=gen) * 3).requires_grad_(True)
    scores_t = torch.rand(n, a, k, generator=gen)  # (N, A, K) class probabilities
    add("box_kd_loss", box_kd_loss, lambda: lambda: box_kd_loss(box_s, box_t, scores_t), [box_s])

    feat_s = [torch.randn(n, c, h, h, requires_grad=True) for h in levels]
    feat_t = [torch.randn(n, c, h, h) for h in levels]

    def per_level(fn):
        return lambda: lambda: sum(fn(s, t) for s, t in zip(feat_s, feat_t))

    for name, fn in (("fitnet_loss", fitnet_loss), ("cwd_loss", cwd_loss), ("pkd_loss", pkd_loss)):
        add(name, fn, per_level(fn), list(feat_s))
    add("at_loss", at_loss, per_level(at_loss), list(feat_s))

    if isinstance(MGDLoss, Exception):
        add("MGDLoss", MGDLoss, lambda: None, [])
    else:
        mgd = torch.nn.ModuleList([MGDLoss(c, c) for _ in levels])
        add(
            "MGDLoss", MGDLoss, lambda: lambda: sum(m(s, t) for m, s, t in zip(mgd, feat_s, feat_t)),
            list(feat_s) + list(mgd.parameters()),
        )

    gt = random_boxes(n, args.boxes, img, gen)
    if isinstance(FGDLoss, Exception):
        cases.append(("FGDLoss", FGDLoss, []))
        cases.append(("FGD naive loop", FGDLoss, []))
    else:
        fgd = torch.nn.ModuleList([FGDLoss(c, c) for _ in levels])
        with torch.no_grad():  # non-trivial relation branch (the reference init zeros its last conv)
            for m in fgd:
                for blk in (m.channel_add_conv_s, m.channel_add_conv_t):
                    blk[-1].weight.normal_(0, 0.01)
        leaves = list(feat_s) + list(fgd.parameters())
        fused = lambda: sum(m(s, t, gt, (img, img)) for m, s, t in zip(fgd, feat_s, feat_t))  # noqa: E731
        naive = lambda: sum(  # noqa: E731
            naive_fgd(m, s, t, gt, (img, img)) for m, s, t in zip(fgd, feat_s, feat_t)
        )
        with torch.no_grad():
            v_fused, v_naive = fused().item(), naive().item()
        rel = abs(v_fused - v_naive) / abs(v_naive)
        print(f"FGD check: fused {v_fused:.6g}, naive {v_naive:.6g}, rel diff {rel:.2e}")
        cases.append(("FGDLoss", fused, leaves))
        cases.append(("FGD naive loop", naive, leaves))

    only = {x.strip() for x in args.only.split(",") if x.strip()}
    header = f"{'loss':<16} {'fwd med':>9} {'fwd p90':>9} {'f+b med':>9} {'f+b p90':>9}   (ms)"
    print(header)
    print("-" * len(header))
    results: dict[str, tuple[float, float]] = {}
    for name, fn, leaves in cases:
        if only and name not in only:
            continue
        if isinstance(fn, Exception) or fn is None:
            why = str(fn).splitlines()[0][:70] if str(fn) else ""
            print(f"{name:<16} unavailable ({type(fn).__name__}: {why})")
            continue
        try:
            f_med, f_p90 = time_case(fn, leaves, args.runs, args.warmup, backward=False)
            b_med, b_p90 = time_case(fn, leaves, args.runs, args.warmup, backward=True)
        except Exception as exc:  # noqa: BLE001
            print(f"{name:<16} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:70]})")
            continue
        results[name] = (f_med, b_med)
        ms = [x * 1e3 for x in (f_med, f_p90, b_med, b_p90)]
        print(f"{name:<16} {ms[0]:9.1f} {ms[1]:9.1f} {ms[2]:9.1f} {ms[3]:9.1f}", flush=True)

    if "FGDLoss" in results and "FGD naive loop" in results:
        (ff, fb), (nf, nb) = results["FGDLoss"], results["FGD naive loop"]
        print(f"FGD speed-up over the naive loop version: forward {nf / ff:.1f}x, "
              f"forward+backward {nb / fb:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
