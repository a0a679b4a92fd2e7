"""`detkd train` for torchvision detectors (``framework: torchvision``): a plain PyTorch loop around the core.

Config (a YAML file, ``key=value`` overrides as for the Ultralytics path)::

    framework: torchvision
    teacher: {arch: retinanet_resnet50_fpn, checkpoint: teacher.pt}   # omit: train the student alone (a baseline)
    student: {arch: retinanet_resnet18_fpn}                           # optional checkpoint: (init), options: {...}
    data: data.yaml            # anything detkd train accepts (YOLO yaml, COCO folder / pair, VOC root)
    epochs: 10
    batch: 8                   # global batch (split over torchrun ranks)
    imgsz: 128                 # min_size = max_size of both models
    lr: 0.001                  # optimizer: adamw (default) | sgd; weight_decay, momentum, warmup_epochs, clip
    project: runs/torchvision
    name: kd
    distill: {...}             # the Distiller's schema; none: TORCHVISION_RECIPE (softmax heads: ..._SOFTMAX_RECIPE)

A run folder holds ``config.yaml`` (every setting), ``distill.yaml`` (the resolved block, taps named),
``results.csv`` (one row per epoch: each loss, each KD term, COCO mAP), ``val/detections.json`` + ``metrics.json``
(``detkd eval --detections`` scores the json), ``weights/last.pt`` (everything a resume needs, written atomically
every epoch; its ``settings`` and class ``names`` also let a YOLO student use the model as a cross-family teacher,
see ``cross_family.py``), ``weights/best.pt`` (the student's ``state_dict`` only) and ``weights/build_student.py`` (plain
torchvision code that builds the student and loads it). ``resume: true`` continues ``project/name`` from
``last.pt``, with the settings saved in it. Under ``torchrun --nproc_per_node N``: DDP student (SyncBatchNorm on
CUDA), a frozen teacher per rank, the distiller's adapter gradients averaged like the student's, logged losses
averaged over ranks; rank 0 evaluates and writes.
"""

from __future__ import annotations

import copy
import csv
import difflib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from detkd.errors import ConfigError, DataError
from detkd.integrations import torchvision as tvkd

KEYS = {"framework", "teacher", "student", "data", "distill", "epochs", "batch", "imgsz", "lr", "optimizer",
        "momentum", "weight_decay", "warmup_epochs", "clip", "project", "name", "exist_ok", "device", "workers",
        "seed", "threads", "resume", "val", "fliplr", "amp"}
DEFAULTS = {"epochs": 10, "batch": 8, "imgsz": 320, "lr": 0.001, "optimizer": "adamw", "momentum": 0.9,
            "weight_decay": 0.0001, "warmup_epochs": 1.0, "clip": 10.0, "project": "runs/torchvision", "name": "train",
            "exist_ok": False, "device": "auto", "workers": 0, "seed": 0, "threads": None, "resume": False,
            "val": True, "fliplr": 0.5, "amp": True}


def default_recipe(cfg: dict) -> dict:
    """The ``distill:`` block of a torchvision config without one (by the student's head: sigmoid or softmax)."""
    from detkd.integrations.recipes import TORCHVISION_RECIPE, TORCHVISION_SOFTMAX_RECIPE

    arch = (cfg.get("student") or {}).get("arch") if isinstance(cfg.get("student"), dict) else None
    soft = arch in tvkd.ARCHS and tvkd.arch_family(arch) in ("ssd", "rcnn")
    return copy.deepcopy(TORCHVISION_SOFTMAX_RECIPE if soft else TORCHVISION_RECIPE)


# -- settings -------------------------------------------------------------------------------------------------------
def _model_spec(v: Any, role: str, src: str, base: Path) -> dict | None:
    if v is None and role == "teacher":
        return None
    if not isinstance(v, dict) or "arch" not in v:
        raise ConfigError(f"{src}: {role}: expected {{arch: NAME{', checkpoint: FILE' if role == 'teacher' else ''}}} "
                          f"(arch one of {', '.join(tvkd.ARCHS)}), got {v!r}")
    bad = set(v) - {"arch", "checkpoint", "options"}
    if bad:
        raise ConfigError(f"{src}: {role}: unknown key(s) {sorted(bad)}; expected arch, checkpoint, options")
    tvkd.arch_family(v["arch"])  # a named error for an unknown arch
    spec = {"arch": v["arch"], "checkpoint": v.get("checkpoint"), "options": dict(v.get("options") or {})}
    ck = spec["checkpoint"]
    if ck:
        p = Path(ck) if Path(ck).is_absolute() or not (base / ck).exists() else base / ck
        if not p.is_file():
            raise ConfigError(f"{src}: {role}.checkpoint: file not found: {p}")
        spec["checkpoint"] = str(p.resolve())
    elif role == "teacher":
        raise ConfigError(f"{src}: teacher.checkpoint: a teacher needs its trained weights (a state_dict .pt, e.g. "
                          "weights/best.pt of a detkd train run of it)")
    return spec


def settings(cfg: dict) -> dict:
    """Check a torchvision train config (unknown keys named with the closest valid one); every default filled in."""
    src = cfg.get("_source", "config")
    for k in cfg:
        if not k.startswith("_") and k not in KEYS:
            close = difflib.get_close_matches(k, sorted(KEYS), n=1, cutoff=0.6)
            raise ConfigError(f"{src}: unknown key '{k}' for framework: torchvision"
                              + (f"; did you mean '{close[0]}'?" if close else ""))
    if not cfg.get("data"):
        raise ConfigError(f"{src}: missing key 'data'")
    base = Path(cfg["_source"]).resolve().parent if cfg.get("_source") else Path.cwd()
    s = {**DEFAULTS, **{k: v for k, v in cfg.items() if k in KEYS}}
    s["teacher"] = _model_spec(cfg.get("teacher"), "teacher", src, base)
    s["student"] = _model_spec(cfg.get("student"), "student", src, base)
    for k in ("epochs", "batch", "imgsz", "workers", "seed"):
        if not isinstance(s[k], int) or isinstance(s[k], bool) or s[k] < (0 if k in ("workers", "seed") else 1):
            raise ConfigError(f"{src}: {k}: expected a positive integer, got {s[k]!r}")
    for k in ("lr", "momentum", "weight_decay", "warmup_epochs", "clip", "fliplr"):
        try:
            s[k] = float(s[k])
        except (TypeError, ValueError):
            raise ConfigError(f"{src}: {k}: expected a number, got {s[k]!r}") from None
        if not math.isfinite(s[k]) or s[k] < 0:
            raise ConfigError(f"{src}: {k}: expected a finite number >= 0, got {s[k]!r}")
    if s["optimizer"] not in ("adamw", "sgd"):
        raise ConfigError(f"{src}: optimizer: adamw or sgd, got {s['optimizer']!r}")
    if s["teacher"] is not None and s.get("distill") not in (None, False):
        from detkd.config import DistillConfig

        s["distill"] = DistillConfig.from_dict(s["distill"], source=src).to_dict()  # checked now, not after an epoch
        if s["distill"]["teacher_runtime"]["cache"] not in (False, None, "false"):
            raise ConfigError(f"{src}: distill.teacher_runtime.cache is not supported with framework: torchvision "
                              "(its batches are flipped at random); drop it")
        if s["distill"].get("mode", "offline") != "offline":
            raise ConfigError(f"{src}: distill.mode: {s['distill']['mode']} is supported with Ultralytics models only; "
                              "framework: torchvision distils from a trained, frozen teacher (mode: offline)")
    else:
        s["distill"] = None
    return s


# -- data -----------------------------------------------------------------------------------------------------------
class Frames(torch.utils.data.Dataset):
    """One split as torchvision detection samples ``(image (3, H, W) float 0..1, {"boxes" xyxy px, "labels"}, id)``;
    labels are class + ``offset`` (1 for families with a background label); horizontal flips with p = ``fliplr``
    (``transforms.v2``, boxes moved with the image); crowd, out-of-range and sub-pixel boxes left out."""

    def __init__(self, records: list, nc: int, offset: int, fliplr: float = 0.0):
        self.records, self.nc, self.offset, self.fliplr = records, nc, offset, fliplr

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        import numpy as np
        from PIL import Image, ImageOps
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        r = self.records[i]
        with Image.open(r.file) as im:  # displayed orientation (EXIF applied), as the labels and detkd eval see it
            img = torch.from_numpy(np.array(ImageOps.exif_transpose(im).convert("RGB"))).permute(2, 0, 1)
        h, w = img.shape[-2:]
        boxes = torch.as_tensor(r.boxes, dtype=torch.float32).reshape(-1, 4).clone()
        labels = torch.as_tensor(r.classes, dtype=torch.int64).reshape(-1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep = ((boxes[:, 2:] - boxes[:, :2]) >= 1).all(1) & (labels >= 0) & (labels < self.nc)
        if r.iscrowd is not None:
            keep &= ~torch.as_tensor(r.iscrowd, dtype=torch.bool).reshape(-1)
        boxes, labels = boxes[keep], labels[keep] + self.offset
        if self.fliplr > 0:
            bb = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))
            img, bb = v2.RandomHorizontalFlip(self.fliplr)(tv_tensors.Image(img), bb)
            img, boxes = img.as_subclass(torch.Tensor), bb.as_subclass(torch.Tensor)
        return img.float().div_(255), {"boxes": boxes, "labels": labels}, int(r.id)


def collate(batch: list) -> tuple:
    return tuple(zip(*batch))


def read_splits(data: Any) -> tuple[Path, Any, Any]:
    """``(data yaml, train Dataset, val Dataset)`` of anything ``detkd train`` accepts."""
    from detkd.data.formats import read_yolo
    from detkd.data.resolve import as_ultralytics_data

    y = Path(as_ultralytics_data(data))
    train, val = read_yolo(y, "train"), read_yolo(y, "val")
    if not train.images:
        raise DataError(f"data: {y}: the train split has no images")
    return y, train, val


# -- models ----------------------------------------------------------------------------------------------------------
def load_state(model: nn.Module, path: str, role: str) -> None:
    """A state_dict ``.pt`` (or a detkd torchvision ``last.pt``: its ``model``), loaded weights-only and strictly."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:4]
        raise ConfigError(f"{role} checkpoint {path} does not fit the configured arch / number of classes: "
                          + " ".join(lines)[:400]) from None


def models(s: dict, nc: int) -> tuple[nn.Module, nn.Module | None]:
    st, te = s["student"], s["teacher"]
    student = tvkd.build(st["arch"], nc, s["imgsz"], **st["options"])
    if st["checkpoint"]:
        load_state(student, st["checkpoint"], "student")
    teacher = None
    if te is not None:
        teacher = tvkd.build(te["arch"], nc, s["imgsz"], **te["options"])
        load_state(teacher, te["checkpoint"], "teacher")
    return student, teacher


# -- distributed -----------------------------------------------------------------------------------------------------
def dist_setup(device: str) -> tuple[int, int, torch.device, bool]:
    """``(rank, world, device, joined)``: under torchrun (``WORLD_SIZE`` > 1) joins the process group (NCCL on CUDA,
    else gloo; ``joined``: by this call) and takes the local GPU."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or str(device).startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}" if cuda and world > 1 else ("cuda" if cuda else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    joined = world > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, dev, joined


def all_mean(values: dict[str, float], world: int) -> dict[str, float]:
    """Each value averaged over the ranks (the same on every rank)."""
    if world == 1 or not values:
        return values
    import torch.distributed as dist

    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, (t / world).tolist()))


def average_grads(module: nn.Module, world: int) -> None:
    """Average ``module``'s gradients over the ranks (the distiller's adapters: not inside the student's DDP)."""
    if world == 1:
        return
    import torch.distributed as dist

    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


# -- evaluation and files ---------------------------------------------------------------------------------------------
def evaluate(student: nn.Module, frames: Frames, data_yaml: Path, out: Path, batch: int, device: torch.device) -> dict:
    """COCO mAP of ``student`` on the val frames through ``detkd eval``'s code (``evaluate_detections``); writes
    ``out/detections.json`` (what ``detkd eval --detections`` scores) and ``out/metrics.json``."""
    from detkd.eval.coco import write_results_json
    from detkd.eval.run import evaluate_detections

    mode = student.training
    student.eval()
    dets: list[dict] = []
    try:
        for i in range(0, len(frames), batch):
            items = [frames[j] for j in range(i, min(i + batch, len(frames)))]
            dets += tvkd.predict_coco(student, [it[0].to(device) for it in items], [it[2] for it in items])
    finally:
        student.train(mode)
    out.mkdir(parents=True, exist_ok=True)
    path = write_results_json(dets, out / "detections.json")
    m = evaluate_detections(path, data_yaml, split="val", out_dir=out, voc=False)
    return {"metrics/mAP50-95": m["AP"], "metrics/mAP50": m["AP50"], "metrics/mAP75": m["AP75"]}


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a kill never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f))
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row) if new else header, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def keep_rows(path: Path, last_epoch: int) -> None:
    """Drop results.csv rows after ``last_epoch`` (written before a kill, after the last checkpoint)."""
    if path.is_file():
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        keep = rows[:1] + [r for r in rows[1:] if r and int(float(r[0])) <= last_epoch]
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(keep)


def run_dir(s: dict, rank: int, world: int) -> Path:
    """``project/name``; a new run that would reuse an existing folder gets ``name2``, ``name3``, ... (rank 0
    decides)."""
    base = Path(s["project"]) / s["name"]
    run = base
    if not s["resume"] and not s["exist_ok"]:
        i = 2
        while run.exists():
            run, i = base.with_name(f"{base.name}{i}"), i + 1
    if world > 1:
        import torch.distributed as dist

        box = [str(run)]
        dist.broadcast_object_list(box, src=0)
        run = Path(box[0])
    return run


def _resume(s: dict, run: Path, rank: int) -> tuple[dict, dict]:
    last = run / "weights" / "last.pt"
    if not last.is_file():
        raise ConfigError(f"resume: nothing to resume in {run} ({last} not found); set project= and name= to the run")
    ck = torch.load(last, map_location="cpu", weights_only=True)
    saved = yaml.safe_load(ck["settings"])
    if ck["epoch"] + 1 >= saved["epochs"]:
        raise ConfigError(f"resume: {run} finished all {saved['epochs']} epochs; nothing to resume")
    keep = {k: s[k] for k in ("device", "workers", "threads")}
    if rank == 0:
        print(f"detkd train: resuming {run} from {last}: epoch {ck['epoch'] + 2} of {saved['epochs']}", flush=True)
    return {**saved, **keep, "resume": True}, ck


# -- the loop ---------------------------------------------------------------------------------------------------------
def train(cfg: dict, callbacks: dict[str, Callable] | None = None) -> Path:
    """Train the configured student (distilled from the teacher when there is one); returns the run folder.
    ``callbacks``: ``{"on_epoch_end": fn(epoch, row, run)}`` (called on every rank after the epoch's checkpoint)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler
    from tqdm import tqdm

    s = settings(cfg)
    rank, world, dev, joined = dist_setup(s["device"])
    run = run_dir(s, rank, world)
    ck: dict = {}
    if s["resume"]:
        s, ck = _resume(s, run, rank)
    if s["threads"]:
        torch.set_num_threads(int(s["threads"]))
    if s["batch"] % world:
        raise ConfigError(f"batch {s['batch']} is the global batch: it must split evenly over {world} ranks")
    torch.manual_seed(s["seed"])  # the same initial weights (student, adapters) on every rank
    data_yaml, tr, va = read_splits(s["data"])
    nc, off = len(tr.names), tvkd.label_offset(tvkd.arch_family(s["student"]["arch"]))
    student, teacher = models(s, nc)
    if ck:
        student.load_state_dict(ck["model"])
    student.to(dev)
    if world > 1 and dev.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    frames = Frames(tr.images, nc, off, s["fliplr"])
    kd = None
    if teacher is not None and s["distill"] is not None:
        example = [Frames(tr.images, nc, off)[i][0].to(dev) for i in range(min(2, len(frames)))]
        kd = tvkd.make_distiller(student, teacher.to(dev), s["distill"], example)
        if ck:
            kd.load_state_dict(ck["distiller"])
        if world > 1:
            import torch.distributed as dist

            for t in kd.state_dict().values():
                dist.broadcast(t, 0)
    torch.manual_seed(s["seed"] + rank)  # augmentation differs per rank
    model = DDP(student, device_ids=[dev.index] if dev.type == "cuda" else None) if world > 1 else student
    params = [p for p in student.parameters() if p.requires_grad] + (list(kd.parameters()) if kd else [])
    if s["optimizer"] == "sgd":
        opt = torch.optim.SGD(params, lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    else:
        opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"])
    sampler = DistributedSampler(frames, num_replicas=world, rank=rank, shuffle=True, seed=s["seed"])
    loader = DataLoader(frames, batch_size=s["batch"] // world, sampler=sampler, num_workers=s["workers"],
                        collate_fn=collate)
    total, warm = len(loader) * s["epochs"], max(1, int(s["warmup_epochs"] * len(loader)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: min(1.0, (it + 1) / warm) * (
        0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(it, total) / total))))
    amp = bool(s["amp"]) and dev.type == "cuda"
    scaler = torch.amp.GradScaler(dev.type, enabled=amp)
    start, best = 0, -1.0
    if ck:
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        start, best = ck["epoch"] + 1, ck["best"]
    weights, csv_path = run / "weights", run / "results.csv"
    if rank == 0:
        weights.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in s.items() if k != "distill"},
                                                        sort_keys=False))
        if kd is not None:
            (run / "distill.yaml").write_text(yaml.safe_dump(kd.cfg.to_dict(), sort_keys=False))
        st = s["student"]
        code = tvkd.build_code(st["arch"], nc, s["imgsz"], **st["options"])
        (weights / "build_student.py").write_text(_BUILD.format(code=code))
        keep_rows(csv_path, start)
        print(f"detkd train: torchvision {st['arch']}" + (f" <- {s['teacher']['arch']}" if kd else " (no teacher)")
              + f", {len(frames)} train / {len(va.images)} val images at {s['imgsz']} px, {world} process(es) on "
              f"{dev}{', AMP' if amp else ''}; run folder {run}", flush=True)
    for epoch in range(start, s["epochs"]):
        t0 = time.time()
        sampler.set_epoch(epoch)
        model.train()
        if kd is not None:
            kd.train()
            kd.set_progress(epoch, s["epochs"])
        sums: dict[str, float] = {}
        steps = skipped = 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{s['epochs']}", disable=rank != 0, dynamic_ncols=True)
        for images, targets, _ in bar:
            images = [im.to(dev, non_blocking=True) for im in images]
            targets = [{k: v.to(dev) for k, v in t.items()} for t in targets]
            with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
                losses, terms = tvkd.distill_step(kd, model, images, targets) if kd else (model(images, targets), {})
            det = sum(losses.values())
            loss = det * (kd.cfg.task_weight if kd else 1.0) + terms.get("kd_total", 0.0)
            if all_mean({"bad": float(not torch.isfinite(loss.detach()))}, world)["bad"] > 0:
                opt.zero_grad(set_to_none=True)  # a non-finite loss on any rank: the step is skipped on all of them
                skipped += 1
                continue
            scaler.scale(loss).backward()
            if kd is not None:
                average_grads(kd, world)
            scaler.unscale_(opt)
            if s["clip"] > 0:
                nn.utils.clip_grad_norm_(params, s["clip"])
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            items = {"loss": float(det.detach()), **{k: float(v.detach()) for k, v in losses.items()},
                     **{k: float(v.detach()) for k, v in terms.items() if k != "kd_total"}}
            for k, v in items.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
            bar.set_postfix({k: f"{v / steps:.3g}" for k, v in sums.items()})
        means = all_mean({k: v / max(steps, 1) for k, v in sums.items()}, world)
        row: dict[str, Any] = {"epoch": epoch + 1, **{f"train/{k}": v for k, v in means.items()}}
        if rank == 0:
            if s["val"] and va.images:
                row.update(evaluate(student, Frames(va.images, nc, off), data_yaml, run / "val", s["batch"], dev))
            row.update({"lr": opt.param_groups[0]["lr"], "skipped_steps": skipped, "time_s": time.time() - t0})
            write_row(csv_path, row)
            fit = row.get("metrics/mAP50-95", float(epoch))
            state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
            if fit >= best:
                best = fit
                save_atomic(state, weights / "best.pt")
            save_atomic({"epoch": epoch, "model": state, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "scaler": scaler.state_dict(), "distiller": kd.state_dict() if kd else {}, "best": best,
                         "settings": yaml.safe_dump(s), "names": list(tr.names)}, weights / "last.pt")
            metrics = {k: v for k, v in row.items() if k.startswith("metrics/")}
            shown = ", ".join(f"{k} {v:.4g}" for k, v in {**means, **metrics}.items())
            print(f"detkd train: epoch {epoch + 1}: {shown}", flush=True)
        for fn in (callbacks or {}).values():
            fn(epoch, row, run)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if joined:
            dist.destroy_process_group()
    if rank == 0:
        print(f"detkd train: done. Student weights: {weights / 'best.pt'} (a plain torchvision state_dict; "
              f"{weights / 'build_student.py'} builds the model and loads it without detkd)" + (
                  f"\ndetkd train: last epoch's detections: detkd eval --detections {run / 'val' / 'detections.json'} "
                  f"--data {data_yaml}" if s["val"] and va.images else ""), flush=True)
    return run


_BUILD = '''"""The student of this run, rebuilt with plain torchvision (no detkd) and loaded from best.pt (or argv[1]).

    python build_student.py [weights.pt]        # or, in Python: from build_student import model
"""
import sys
from pathlib import Path

{code}
_weights = sys.argv[1] if __name__ == "__main__" and len(sys.argv) > 1 else Path(__file__).with_name("best.pt")
model.load_state_dict(torch.load(_weights, map_location="cpu", weights_only=True))
model.eval()
if __name__ == "__main__":
    n = sum(p.numel() for p in model.parameters())
    print(f"loaded {{_weights}} into {{type(model).__name__}} ({{n:,}} parameters)")
'''
