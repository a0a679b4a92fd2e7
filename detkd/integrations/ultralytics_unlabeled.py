"""Soft-label distillation on unlabeled frames inside Ultralytics' trainer (``distill.unlabeled``).

``distill.unlabeled: {source: PATH, ratio: R}`` (see :class:`detkd.config.UnlabeledConfig`) makes every training
batch a mix of labeled frames and unlabeled frames, a share ``R`` of them unlabeled. The pieces, used by
:class:`~detkd.integrations.ultralytics.DistillTrainer` and
:class:`~detkd.integrations.ultralytics.KDDetectionModel`:

* :class:`MixedDataset`: Ultralytics' ``YOLODataset`` over the labeled train images followed by the unlabeled
  images (indices ``n_labeled ..``). Unlabeled images get empty labels whatever lies next to them (a ``labels/``
  folder beside the source is ignored), and images that are already labeled train images are left out. Every
  sample carries ``unlabeled`` (bool), collated into ``batch['unlabeled']`` (a bool tensor).
* **Mix augmentations stay within a pool**: Mosaic, MixUp, CutMix and CopyPaste (mixup mode) combine an image
  with others that they fetch through ``dataset.get_image_and_label``; :class:`MixedDataset` swaps each such
  extra image for one of the same pool (labeled or unlabeled) as the sample's own image, preferring one in
  Ultralytics' mosaic buffer. A labeled sample is therefore built from labeled images only (its labels are
  complete: no unlabeled tile whose objects would be false negatives for the detection loss) and an unlabeled
  sample from unlabeled images only, and the labeled share of a batch stays exactly what the sampler chose.
* :class:`MixedSampler`: the order of indices. An epoch is one pass over a random permutation of the labeled
  images; each batch of ``B`` gets ``round(B * R)`` unlabeled images on average (error diffusion over batches, so
  ``B = 8, R = 0.3`` gives 2, 3, 2, 3, 2, ... ; never all ``B`` when ``B >= 2``), drawn from random
  permutations of the unlabeled pool (cycled when it is smaller than an epoch needs). An epoch therefore has
  about ``1 / (1 - R)`` times as many steps as without unlabeled frames. Under DDP each rank takes a disjoint
  share of both pools, with the same number of batches.
* :func:`labeled_loss`: Ultralytics' own detection criterion on the labeled frames only: the predictions and the
  batch are indexed by the labeled mask, so the value (and its loss items) is exactly what the criterion gives
  for a batch of those frames alone (Ultralytics multiplies by that batch size: each labeled frame weighs what
  it weighs in a fully labeled batch). The distillation terms are computed on all frames.
* :func:`pseudo_boxes`: features whose loss needs boxes (``fgd``'s foreground mask; ``needs_gt`` in
  :mod:`detkd.losses.registry`) get, on unlabeled frames, the teacher's confident boxes: anchors whose confidence
  (``DenseOutputs.anchor_confidence``: the max class sigmoid) is ``>= pseudo_conf``, class-agnostic NMS at IoU 0.6, at most 100 per frame. Labeled frames keep their
  ground truth. Logit and box distillation need no ground truth: ``sigmoid_kd`` / ``kd`` use every anchor, and
  ``ld`` / ``l1_giou`` weight each anchor by the teacher's confidence (``bounded``, which needs ground-truth
  regression targets, is refused with ``unlabeled``). ``fitnet``, ``cwd``, ``pkd``, ``at``, ``mgd`` use no boxes.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ultralytics.data.build import InfiniteDataLoader, seed_worker
from ultralytics.data.dataset import YOLODataset
from ultralytics.utils import LOGGER, NUM_THREADS

from detkd.config import UnlabeledConfig
from detkd.errors import ConfigError

__all__ = ["MixedDataset", "MixedSampler", "batch_plan", "build_mixed_loader", "labeled_loss", "labeled_subset",
           "pad_boxes", "pseudo_boxes", "PSEUDO_IOU", "PSEUDO_MAX_DET"]

PSEUDO_IOU = 0.6
PSEUDO_MAX_DET = 100


# ----------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------
def _check_image(f: str) -> tuple[str, tuple[int, int] | None, str]:
    """``(file, (h, w) or None, problem)``; reads the header only and never rewrites the file (Ultralytics'
    ``check_image`` restores corrupt JPEGs in place, which an unlabeled source should not suffer)."""
    from PIL import Image
    from ultralytics.data.utils import IMG_FORMATS, exif_size

    try:
        with Image.open(f) as im:
            im.verify()
            w, h = exif_size(im)
            fmt = (im.format or "").lower()
        if fmt not in IMG_FORMATS | {"jpeg2000"}:
            return f, None, f"unsupported image format {fmt or '?'}"
        if h < 10 or w < 10:
            return f, None, f"image size {(h, w)} < 10 pixels"
        return f, (h, w), ""
    except Exception as e:  # unreadable, truncated header, not an image
        return f, None, f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"


class MixedDataset(YOLODataset):
    """``YOLODataset`` of the labeled train images (indices ``0 .. n_labeled-1``) then the unlabeled images.

    ``unlabeled_files``: image paths (see :func:`detkd.config.unlabeled_images`). Other arguments are
    ``YOLODataset``'s. ``rect`` is not supported (the sampler, not the image shapes, orders the batches).
    """

    def __init__(self, *args: Any, unlabeled_files: list, **kwargs: Any):
        self._unlabeled_src = [str(Path(f).resolve()) for f in unlabeled_files]
        self.n_labeled = 0
        self._pool: bool | None = None
        self._first = False
        if kwargs.get("rect"):
            raise ConfigError("distill.unlabeled does not work with rect=True (rectangular batches are ordered by "
                              "image shape; mixed batches are ordered by the sampler): drop rect")
        super().__init__(*args, **kwargs)

    @property
    def n_unlabeled(self) -> int:
        return len(self.labels) - self.n_labeled

    def get_labels(self) -> list[dict]:
        labels = super().get_labels()  # the labeled train images, as Ultralytics reads them
        known = {str(Path(f).resolve()) for f in self.im_files}
        todo = [f for f in self._unlabeled_src if f not in known]
        self.unlabeled_already_labeled = len(self._unlabeled_src) - len(todo)
        from multiprocessing.pool import ThreadPool

        with ThreadPool(max(1, min(NUM_THREADS, 8))) as pool:
            checked = pool.map(_check_image, todo)
        unl, bad = [], []
        for f, shape, problem in checked:
            if shape is None:
                bad.append(f"{f}: {problem}")
                continue
            unl.append({"im_file": f, "shape": shape, "cls": np.zeros((0, 1), np.float32),
                        "bboxes": np.zeros((0, 4), np.float32), "segments": [], "keypoints": None,
                        "normalized": True, "bbox_format": "xywh"})
        self.unlabeled_unreadable = bad
        if bad:
            LOGGER.warning(f"detkd: distill.unlabeled: {len(bad)} of {len(todo)} images skipped (unreadable): "
                           + "; ".join(bad[:3]) + (" ..." if len(bad) > 3 else ""))
        if not unl:
            why = (f"all {len(todo)} could not be read" if todo else
                   f"all {self.unlabeled_already_labeled} are labeled train images already" if self._unlabeled_src
                   else "it holds no images")
            raise ConfigError(f"distill.unlabeled.source: no usable unlabeled image ({why})")
        self.n_labeled = len(labels)
        self.im_files = list(self.im_files) + [lb["im_file"] for lb in unl]
        return labels + unl

    # --- pools: the sample's own image decides; mix augmentations take extra images from the same pool ---------
    def is_unlabeled(self, index: int) -> bool:
        return index >= self.n_labeled

    def __getitem__(self, index: int) -> dict:
        self._pool, self._first = self.is_unlabeled(index), True
        try:
            label = self.transforms(self.get_image_and_label(index))
        finally:
            pool, self._pool = self._pool, None
        label["unlabeled"] = pool
        return label

    def get_image_and_label(self, index: int) -> dict:
        if self._pool is not None:
            if self._first:  # the sample's own image
                self._first = False
            elif self.is_unlabeled(index) != self._pool:  # an extra image of a mosaic / mixup / cutmix / copy-paste
                index = self._same_pool()
        return super().get_image_and_label(index)

    def _same_pool(self) -> int:
        lo, hi = (self.n_labeled, len(self.labels)) if self._pool else (0, self.n_labeled)
        buf = [i for i in self.buffer if lo <= i < hi]  # recently loaded (Ultralytics' mosaic buffer)
        return random.choice(buf) if buf else random.randrange(lo, hi)

    @staticmethod
    def collate_fn(batch: list[dict]) -> dict:
        out = YOLODataset.collate_fn(batch)
        if "unlabeled" in out:
            out["unlabeled"] = torch.tensor([bool(x) for x in out["unlabeled"]], dtype=torch.bool)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Sampler and loader
# ----------------------------------------------------------------------------------------------------------------
def batch_plan(n_labeled: int, batch: int, ratio: float) -> list[tuple[int, int]]:
    """``(labeled, unlabeled)`` counts of each batch of an epoch over ``n_labeled`` labeled images.

    Full batches hold ``batch`` images, ``round``-ed error diffusion of ``batch * ratio`` of them unlabeled (the
    long-run share is ``ratio``; at most ``batch - 1`` when ``batch >= 2``, so every batch has a labeled frame);
    the last batch holds the remaining labeled images and their share of unlabeled ones.
    """
    if n_labeled < 1 or batch < 1 or not 0.0 < ratio < 1.0:
        raise ValueError(f"batch_plan: need n_labeled >= 1, batch >= 1, 0 < ratio < 1; got {n_labeled}, {batch}, "
                         f"{ratio}")
    plan, left, i, target = [], n_labeled, 0, batch * ratio
    while left > 0:
        u = math.floor((i + 1) * target + 0.5) - math.floor(i * target + 0.5)
        if batch >= 2:
            u = min(u, batch - 1)
        lab = batch - u
        if lab > left:  # the last, partial batch
            lab = left
            u = min(batch - lab, math.floor(lab * ratio / (1.0 - ratio) + 0.5))
        plan.append((lab, u))
        left -= lab
        i += 1
    return plan


class MixedSampler(torch.utils.data.Sampler):
    """Indices of a :class:`MixedDataset`, batch by batch as :func:`batch_plan` says (labeled then unlabeled
    within a batch); consecutive groups of ``batch`` are the batches (the DataLoader's batch size must be
    ``batch``). Each ``iter()`` is a new epoch with fresh permutations (seeded by ``seed`` and the epoch count).
    ``rank`` / ``world``: DDP share (disjoint parts of both pools, the same number of batches on every rank)."""

    def __init__(self, n_labeled: int, n_unlabeled: int, batch: int, ratio: float, seed: int = 0, rank: int = 0,
                 world: int = 1):
        if n_unlabeled < 1:
            raise ValueError("MixedSampler: no unlabeled images")
        self.n_labeled, self.n_unlabeled, self.batch, self.ratio = n_labeled, n_unlabeled, batch, ratio
        self.seed, self.rank, self.world = int(seed), int(rank), max(int(world), 1)
        self.per_rank = math.ceil(n_labeled / self.world)
        self.plan = batch_plan(self.per_rank, batch, ratio)
        self.n_unlabeled_per_epoch = sum(u for _, u in self.plan)
        self.epoch = 0

    def __len__(self) -> int:
        return sum(lab + u for lab, u in self.plan)

    @property
    def num_batches(self) -> int:
        return len(self.plan)

    def set_epoch(self, epoch: int) -> None:
        """Kept for Ultralytics' DDP loop; the order follows this sampler's own epoch count (a DataLoader with
        workers starts the next epoch's indices before the trainer announces it)."""

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        lab = torch.randperm(self.n_labeled, generator=g)
        lab = lab.repeat(math.ceil(self.per_rank * self.world / self.n_labeled))[: self.per_rank * self.world]
        lab = lab[self.rank:: self.world].tolist()
        need = self.n_unlabeled_per_epoch * self.world
        unl = torch.cat([torch.randperm(self.n_unlabeled, generator=g)
                         for _ in range(max(1, math.ceil(need / self.n_unlabeled)))])[:need]
        unl = (unl[self.rank:: self.world] + self.n_labeled).tolist()
        i = j = 0
        for n_lab, n_unl in self.plan:
            yield from lab[i: i + n_lab]
            yield from unl[j: j + n_unl]
            i, j = i + n_lab, j + n_unl


def build_mixed_loader(dataset: MixedDataset, batch: int, workers: int, ratio: float, *, seed: int = 0,
                       rank: int = -1, device: Any = "cpu") -> InfiniteDataLoader:
    """Ultralytics' ``InfiniteDataLoader`` (as ``build_dataloader`` makes it) over ``dataset`` in
    :class:`MixedSampler` order."""
    world, r = 1, 0
    if rank != -1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        world, r = torch.distributed.get_world_size(), torch.distributed.get_rank()
    sampler = MixedSampler(dataset.n_labeled, dataset.n_unlabeled, batch, ratio, seed=seed, rank=r, world=world)
    dev = str(getattr(device, "type", device)).split(":")[0]
    nd = torch.cuda.device_count() if dev == "cuda" else 0
    nw = min((os.cpu_count() or 1) // max(nd, 1), workers, 0 if sampler.num_batches <= 1 else sampler.num_batches)
    generator = torch.Generator()
    generator.manual_seed((6148914691236517205 + r + int(seed)) % (1 << 64))
    return InfiniteDataLoader(
        dataset=dataset, batch_size=batch, shuffle=False, num_workers=nw, sampler=sampler,
        prefetch_factor=4 if nw > 0 else None, pin_memory=nd > 0, collate_fn=dataset.collate_fn,
        worker_init_fn=seed_worker, generator=generator, drop_last=False,
    )


def describe(dataset: MixedDataset, sampler: MixedSampler, cfg: UnlabeledConfig) -> str:
    """The one log line that says what the mixed batches hold."""
    src = cfg.source if isinstance(cfg.source, str) else ", ".join(cfg.source)
    w = max(sampler.world, 1)
    per = sorted({u for lab, u in sampler.plan if lab + u == sampler.batch} or {sampler.plan[0][1]})
    per_s = f"{per[0]}" if len(per) == 1 else f"{per[0]}-{per[-1]}"
    n_unl, n_all = sampler.n_unlabeled_per_epoch * w, len(sampler) * w
    notes = []
    if dataset.unlabeled_already_labeled:
        notes.append(f"{dataset.unlabeled_already_labeled} already labeled train images left out")
    if dataset.unlabeled_unreadable:
        notes.append(f"{len(dataset.unlabeled_unreadable)} unreadable skipped")
    if n_unl > dataset.n_unlabeled:
        notes.append("each unlabeled image is used more than once per epoch")
    return (f"detkd: unlabeled: {dataset.n_unlabeled} images from {src}; ratio {cfg.ratio:g}: {per_s} unlabeled "
            f"frames per batch of {sampler.batch}, {n_unl} of the {n_all} frames of an epoch ({sampler.num_batches} "
            f"batches, every labeled frame once); unlabeled frames get the distillation terms only"
            + (f" ({'; '.join(notes)})" if notes else ""))


# ----------------------------------------------------------------------------------------------------------------
# Loss helpers
# ----------------------------------------------------------------------------------------------------------------
def _take(x: Any, idx: torch.Tensor, n: int) -> Any:
    """``x`` with every batch-first tensor (first dim ``n``) indexed by ``idx``; dicts, lists and tuples walked."""
    if isinstance(x, torch.Tensor):
        return x[idx.to(x.device)] if x.dim() and x.shape[0] == n else x
    if isinstance(x, dict):
        return {k: _take(v, idx, n) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_take(v, idx, n) for v in x)
    return x


def labeled_subset(preds: Any, batch: dict, labeled: torch.Tensor) -> tuple[Any, dict]:
    """The predictions and the batch of the ``labeled`` (bool ``(N,)``) frames only, as Ultralytics' criterion
    reads them (``batch_idx`` renumbered; ``img``, ``cls``, ``bboxes`` and per-image entries selected)."""
    n = labeled.numel()
    keep = labeled.nonzero().view(-1)
    sub_preds = _take(preds, keep, n)
    bidx = batch["batch_idx"].view(-1).long()
    lab = labeled.to(bidx.device)
    rows = lab[bidx]
    new_index = torch.full((n,), -1, dtype=torch.long, device=bidx.device)
    new_index[keep.to(bidx.device)] = torch.arange(keep.numel(), device=bidx.device)
    sub = {}
    for k, v in batch.items():
        if k in ("batch_idx", "cls", "bboxes"):
            continue
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n:
            sub[k] = v[keep.to(v.device)]
        elif isinstance(v, (list, tuple)) and len(v) == n:
            sub[k] = type(v)(v[i] for i in keep.tolist())
        else:
            sub[k] = v
    sub["batch_idx"] = new_index[bidx[rows]].to(batch["batch_idx"].dtype)
    sub["cls"] = batch["cls"][rows.to(batch["cls"].device)]
    sub["bboxes"] = batch["bboxes"][rows.to(batch["bboxes"].device)]
    return sub_preds, sub


def labeled_loss(student: Any, batch: dict, preds: Any, labeled: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Ultralytics' detection loss (``student.loss``) of the ``labeled`` frames alone: the value and loss items a
    batch of just those frames gives. A batch without labeled frames gives zeros (same keys, still in the graph)."""
    n, k = labeled.numel(), int(labeled.sum())
    if k == n:
        return student.loss(batch, preds)
    if k == 0:
        regular, items = student.loss(batch, preds)  # no targets at all; only for the keys and the graph
        return regular * 0.0, {name: torch.zeros_like(v) for name, v in items.items()}
    sub_preds, sub_batch = labeled_subset(preds, batch, labeled)
    return student.loss(sub_batch, sub_preds)


def pad_boxes(bidx: torch.Tensor, xyxy: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``(K, 4)`` of images ``bidx (K,)`` -> padded ``(n, M, 4)`` and validity ``(n, M)``, input order kept."""
    device = xyxy.device
    if bidx.numel() == 0:
        return torch.zeros(n, 0, 4, device=device), torch.zeros(n, 0, dtype=torch.bool, device=device)
    bidx = bidx.to(device).long()
    counts = torch.bincount(bidx, minlength=n)
    order = torch.argsort(bidx, stable=True)
    bidx, xyxy = bidx[order], xyxy[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(bidx.numel(), device=device) - starts[bidx]
    boxes = torch.zeros(n, int(counts.max()), 4, device=device)
    valid = torch.zeros(n, int(counts.max()), dtype=torch.bool, device=device)
    boxes[bidx, slot] = xyxy.float()
    valid[bidx, slot] = True
    return boxes, valid


@torch.no_grad()
def pseudo_boxes(score: torch.Tensor, boxes: torch.Tensor, frames: torch.Tensor, conf: float,
                 img_shape: tuple[int, int], iou: float = PSEUDO_IOU,
                 max_det: int = PSEUDO_MAX_DET) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's confident boxes on the ``frames`` (bool ``(N,)``), padded ``(N, M, 4)`` xyxy pixels and
    ``(N, M)`` validity (other frames: none).

    ``score (N, A)`` is the teacher's confidence per anchor (``DenseOutputs.anchor_confidence()``: YOLO's max class
    sigmoid) and ``boxes (N, A, 4)`` its decoded xyxy boxes; an anchor is a candidate when ``score >= conf``;
    candidates are clipped to the image, boxes under 1 px dropped, then class-agnostic NMS per frame at ``iou``
    keeps at most ``max_det`` per frame, best first.
    """
    from torchvision.ops import batched_nms

    n = score.shape[0]
    score = score.float()
    sel = (score >= conf) & frames.to(score.device).view(-1, 1).bool()
    b, a = sel.nonzero(as_tuple=True)
    bx, sc = boxes.float()[b, a], score[b, a]
    h, w = img_shape
    bx = torch.stack((bx[:, 0].clamp(0, w), bx[:, 1].clamp(0, h), bx[:, 2].clamp(0, w), bx[:, 3].clamp(0, h)), 1)
    ok = ((bx[:, 2] - bx[:, 0]) >= 1) & ((bx[:, 3] - bx[:, 1]) >= 1)
    b, bx, sc = b[ok], bx[ok], sc[ok]
    keep = batched_nms(bx, sc, b, iou)  # by score, descending
    b, bx = b[keep], bx[keep]
    order = torch.argsort(b, stable=True)  # per frame, still best first
    b, bx = b[order], bx[order]
    if b.numel():
        counts = torch.bincount(b, minlength=n)
        slot = torch.arange(b.numel(), device=b.device) - (torch.cumsum(counts, 0) - counts)[b]
        b, bx = b[slot < max_det], bx[slot < max_det]
    return pad_boxes(b, bx, n)
