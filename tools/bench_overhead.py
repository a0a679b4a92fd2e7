#!/usr/bin/env python
"""Distillation overhead on the same batches, in one run, same thread count.

Times (median and p90 of --steps after --warmup):
  student   : a plain student training step (forward, Ultralytics detection loss, backward)
  teacher   : a teacher no-grad forward
  detkd     : a detkd distillation step (student + teacher + all configured KD terms, backward)
  ultra     : Ultralytics' built-in DistillationModel step (feature-only KD), same teacher/student
and the overhead  detkd - (teacher + student)  as a fraction of a student step (target <= 5%).

  python tools/bench_overhead.py --teacher yolov8s.yaml --student yolov8n.yaml --imgsz 320 --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

ensure_ultralytics_offline()

from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.nn.distill_model import DistillationModel  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

from detkd.bench.latency import cpu_model  # noqa: E402
from detkd.integrations.ultralytics import KDDetectionModel  # noqa: E402

RECIPES = {
    "all": {"logits": {"method": "sigmoid_kd", "options": {"avg_factor": "teacher_score"}},
            "boxes": {"method": "ld"}, "features": "auto", "feature_method": "cwd"},
    "fgd": {"logits": None, "boxes": None, "features": "auto", "feature_method": "fgd"},
}


def make_batch(n: int, imgsz: int, nc: int, boxes_per_img: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    m = n * boxes_per_img
    wh = torch.rand(m, 2, generator=g) * 0.3 + 0.05
    c = torch.rand(m, 2, generator=g) * (1 - wh) + wh / 2
    return {"img": torch.rand(n, 3, imgsz, imgsz, generator=g),
            "batch_idx": torch.arange(n).repeat_interleave(boxes_per_img).float(),
            "cls": torch.randint(0, nc, (m, 1), generator=g).float(),
            "bboxes": torch.cat([c, wh], 1)}


def build(cfg: str, nc: int, imgsz: int) -> DetectionModel:
    m = DetectionModel(cfg, nc=nc, verbose=False)
    m.args = get_cfg(overrides={"imgsz": imgsz})
    m.names = {i: str(i) for i in range(nc)}
    return m


def timeit(fn, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="yolov8s.yaml")
    ap.add_argument("--student", default="yolov8n.yaml")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--nc", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="all")
    ap.add_argument("--no-ultra", action="store_true", help="skip Ultralytics' built-in DistillationModel")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    batch = make_batch(a.batch, a.imgsz, a.nc)
    teacher = build(a.teacher, a.nc, a.imgsz).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build(a.student, a.nc, a.imgsz).train()
    kd_model = KDDetectionModel(build(a.student, a.nc, a.imgsz), teacher, dict(RECIPES[a.recipe]), imgsz=a.imgsz)
    kd_model.student_model.load_state_dict(student.state_dict())
    kd_model.train()

    def student_step():
        student.zero_grad(set_to_none=True)
        loss, _ = student.loss(batch)
        loss.sum().backward()

    def teacher_fwd():
        with torch.no_grad():
            teacher(batch["img"])

    def kd_step():
        kd_model.zero_grad(set_to_none=True)
        loss, _ = kd_model.loss(batch)
        loss.sum().backward()

    rows = {}
    rows["student"] = timeit(student_step, a.warmup, a.steps)
    rows["teacher"] = timeit(teacher_fwd, a.warmup, a.steps)
    rows["detkd"] = timeit(kd_step, a.warmup, a.steps)
    if not a.no_ultra:
        s2 = build(a.student, a.nc, a.imgsz)
        s2.args.dis = 6.0
        ultra = DistillationModel(teacher_model=teacher, student_model=s2).train()

        def ultra_step():
            ultra.zero_grad(set_to_none=True)
            loss, _ = ultra.loss(batch)
            loss.sum().backward()

        rows["ultra"] = timeit(ultra_step, a.warmup, a.steps)
    med = {k: statistics.median(v) for k, v in rows.items()}
    p90 = {k: sorted(v)[int(0.9 * (len(v) - 1))] for k, v in rows.items()}
    print(f"# bench_overhead: teacher {a.teacher}, student {a.student}, imgsz {a.imgsz}, batch {a.batch}, "
          f"recipe {a.recipe}, torch threads {torch.get_num_threads()}, CPU {cpu_model()}, torch {torch.__version__}")
    print(f"# median and p90 of {a.steps} steps after {a.warmup} warm-up steps")
    print(f"{'step':<10}{'median s':>10}{'p90 s':>10}")
    for k in rows:
        print(f"{k:<10}{med[k]:>10.3f}{p90[k]:>10.3f}")
    over = med["detkd"] - med["teacher"] - med["student"]
    print(f"detkd overhead beyond teacher forward + student step: {over:+.3f} s = "
          f"{100 * over / med['student']:+.1f}% of a student step (target <= +5%)")
    if "ultra" in med:
        print(f"Ultralytics built-in distill step: {med['ultra']:.3f} s; detkd/ultra = {med['detkd'] / med['ultra']:.2f}x")


if __name__ == "__main__":
    main()
