"""Distillation in your own PyTorch training loop: torchvision RetinaNet, ResNet-50 teacher -> ResNet-18 student.

Everything detkd-specific is the `Distiller` (taps modules by name, runs the frozen teacher, returns the terms); the
loop, the models, AMP, DDP, checkpoints and evaluation are plain PyTorch / torchvision and yours to change:

    python examples/own_loop.py --out runs/own_loop                      # built-in data, teacher first, then student
    python examples/own_loop.py --teacher runs/own_loop/teacher.pt --epochs 10
    torchrun --nproc_per_node 2 examples/own_loop.py --out runs/own_loop  # DDP (gloo on CPU, NCCL on CUDA)

Writes OUT/teacher.pt, OUT/student.pt (state_dicts that load into the same torchvision models without detkd),
OUT/last.pt (resume: run the same command again), OUT/detections.json + OUT/metrics.json each epoch (score them
again with ``detkd eval --detections OUT/detections.json --data DATA``).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torchvision.models.detection import RetinaNet, retinanet_resnet50_fpn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detkd import Distiller
from detkd.distiller import DenseOutputs
from detkd.eval import evaluate_detections
from detkd.eval.coco import write_results_json
from detkd.eval.predict import to_coco_detections
from detkd.integrations.torchvision_train import Frames, collate, read_splits


def teacher_model(nc: int, size: int) -> nn.Module:
    return retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=nc, min_size=size, max_size=size)


def student_model(nc: int, size: int) -> nn.Module:  # same anchors and FPN strides as the teacher: terms per anchor
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256),
                                   norm_layer=nn.BatchNorm2d)
    return RetinaNet(backbone, num_classes=nc, min_size=size, max_size=size)


class Grab:
    """A forward hook keeping a module's last output: for what the Distiller cannot find in one module's output
    (RetinaNet's head gives deltas; the anchors to decode them come from ``anchor_generator``)."""

    def __init__(self, module: nn.Module):
        self.out = None
        module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.out = output


def dense(head: Grab, anchors: Grab, model: nn.Module) -> DenseOutputs:
    """RetinaNet's head outputs with boxes decoded against its anchors (anchors first: (N, A, K), (N, A, 4))."""
    reg, a = head.out["bbox_regression"].float(), torch.stack(anchors.out).float()  # decoded in float32 under AMP
    n, na = reg.shape[:2]
    boxes = model.box_coder.decode_single(reg.reshape(-1, 4), a.reshape(-1, 4)).reshape(n, na, 4)
    return DenseOutputs(cls=head.out["cls_logits"], boxes=boxes)


def evaluate(model: nn.Module, frames: Frames, data_yaml: Path, out: Path, device: torch.device) -> float:
    """COCO mAP50-95 on the val frames; writes out/detections.json (category ids 1..K) and out/metrics.json."""
    model.eval()
    model.score_thresh, model.detections_per_img = 0.001, 100
    dets, lut = [], torch.arange(1, model.head.classification_head.num_classes + 1).numpy()
    with torch.no_grad():
        for i in range(len(frames)):
            img, _, image_id = frames[i]
            o = model([img.to(device)])[0]
            dets += to_coco_detections(image_id, o["boxes"].cpu().numpy(), o["scores"].cpu().numpy(),
                                       o["labels"].cpu().numpy(), lut)
    model.train()
    path = write_results_json(dets, out / "detections.json")
    return evaluate_detections(path, data_yaml, split="val", out_dir=out, voc=False)["AP"]


def train(args, model: nn.Module, teacher: nn.Module | None, frames: Frames, val: Frames, data_yaml: Path,
          epochs: int, tag: str, rank: int, world: int, device: torch.device) -> None:
    """Train ``model`` (distilled from ``teacher`` when given); checkpoints OUT/<tag>.pt (state_dict) and last.pt."""
    out, last = Path(args.out), Path(args.out) / "last.pt"
    kd = None
    if teacher is not None:
        cfg = {"logits": {"method": "sigmoid_kd", "weight": 1.0, "options": {"avg_factor": "teacher_score"}},
               "boxes": {"method": "l1_giou", "weight": 1.0},
               "features": [{"student": f"backbone:{k}", "teacher": f"backbone:{k}", "method": "cwd"}  # FPN P3-P5
                            for k in ("0", "1", "2")]}
        example = torch.stack([frames[i][0] for i in range(2)]).to(device)
        kd = Distiller(model, teacher, cfg, example_inputs=example)
        s_grab = Grab(model.head), Grab(model.anchor_generator)
        t_grab = Grab(teacher.head), Grab(teacher.anchor_generator)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    params = list(model.parameters()) + (list(kd.parameters()) if kd else [])
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    sampler = torch.utils.data.DistributedSampler(frames, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(frames, batch_size=args.batch // world, sampler=sampler, collate_fn=collate)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    start = 0
    if last.is_file() and torch.load(last, weights_only=True)["tag"] == tag:  # resume after a kill
        ck = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        if kd:
            kd.load_state_dict(ck["kd"])
        start = ck["epoch"] + 1
    steps = 0
    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)
        if kd:
            kd.set_progress(epoch, epochs)
        for images, targets, _ in loader:
            for g in opt.param_groups:  # cosine schedule over all steps
                g["lr"] = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * epoch / epochs)))
            x = torch.stack(images).to(device)  # torchvision detectors take a batch tensor (or a list of images)
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                if kd is None:
                    loss = sum(ddp(x, targets).values())
                else:
                    with kd.record(ddp):                         # taps the student's modules named in cfg
                        loss = sum(ddp(x, targets).values())     # torchvision's own detection losses
                    kd.teacher_forward(x)                        # the frozen teacher on the same batch
                    terms = kd(x, student_output=dense(*s_grab, model), teacher_output=dense(*t_grab, teacher))
                    loss = loss + terms["kd_total"]
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if kd and world > 1:  # the adapters are not inside DDP: average their gradients like the student's
                for p in kd.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= world
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, 10.0)
            scaler.step(opt)
            scaler.update()
            steps += 1
            if rank == 0 and steps % 10 == 1:
                shown = " ".join(f"{k} {float(v.detach()):.3f}" for k, v in terms.items()) if kd else ""
                print(f"{tag} epoch {epoch + 1}/{epochs} loss {float(loss.detach()):.3f} {shown}", flush=True)
            if args.max_steps and steps >= args.max_steps:
                break
        if rank == 0:
            ap = evaluate(model, val, data_yaml, out, device) if len(val) else float("nan")
            print(f"{tag} epoch {epoch + 1}/{epochs}: val mAP50-95 {ap:.4f}", flush=True)
            state = {k: v.cpu() for k, v in model.state_dict().items()}
            torch.save({"tag": tag, "epoch": epoch, "model": state, "optimizer": opt.state_dict(),
                        "scaler": scaler.state_dict(), "kd": kd.state_dict() if kd else {}}, out / ".last.tmp")
            os.replace(out / ".last.tmp", last)  # atomic: a kill never leaves half a checkpoint
            torch.save(state, out / f".{tag}.tmp")
            os.replace(out / f".{tag}.tmp", out / f"{tag}.pt")
        if args.max_steps and steps >= args.max_steps:
            break
    if world > 1:
        dist.barrier()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/own_loop")
    p.add_argument("--data", help="data yaml / COCO / VOC (default: the built-in synthetic data, made in OUT/data)")
    p.add_argument("--frames", type=int, default=300, help="built-in data: train frames (val: a quarter)")
    p.add_argument("--teacher", help="teacher state_dict (default: train one first for --teacher-epochs)")
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="global batch (split over torchrun ranks)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=0, help="stop each training after this many steps (smoke test)")
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(rank)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or out / "data" / "data.yaml"
    if not args.data and rank == 0 and not Path(data).is_file():
        from detkd.data.synth import generate

        generate(out / "data", n_train=args.frames, n_val=max(2, args.frames // 4), imgsz=args.imgsz, progress=False)
    if world > 1:
        dist.barrier()
    data_yaml, tr, va = read_splits(data)
    nc = len(tr.names)
    frames, val = Frames(tr.images, nc, 0, fliplr=0.5), Frames(va.images, nc, 0)
    teacher = teacher_model(nc, args.imgsz).to(device)
    stage = torch.load(out / "last.pt", weights_only=True)["tag"] if (out / "last.pt").is_file() else None
    if args.teacher or stage == "student":  # given, or trained by an earlier run of this command
        teacher.load_state_dict(torch.load(args.teacher or out / "teacher.pt", map_location=device, weights_only=True))
    else:  # trained here first (resumed when last.pt is the teacher's)
        train(args, teacher, None, frames, val, data_yaml, args.teacher_epochs, "teacher", rank, world, device)
    student = student_model(nc, args.imgsz).to(device)
    train(args, student, teacher, frames, val, data_yaml, args.epochs, "student", rank, world, device)
    if rank == 0:
        print(f"done: {out / 'student.pt'} (load into student_model() with plain torchvision); "
              f"detkd eval --detections {out / 'detections.json'} --data {data_yaml}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
