#!/usr/bin/env python
"""Training throughput on CUDA: images/s of a plain student step vs distillation steps, AMP on.

Every row is one full training step on the same synthetic batch (tools/bench_overhead.make_batch): forward under
``torch.autocast(float16)``, loss, ``GradScaler`` backward, SGD step. Median of --steps after --warmup, with
``torch.cuda.synchronize()`` around each timed step; images/s = batch / median; peak GPU memory per row.

  student          plain Ultralytics DetectionModel step
  teacher fwd      the teacher's no-grad forward alone (fp32 weights under autocast), for reference
  kd:default       KDDetectionModel, default teacher_runtime (half: auto -> float16 teacher under AMP,
                   inference_mode)
  kd:fp32-teacher  teacher_runtime.half: false (float32 weights under autocast)
  kd:fused+chlast  default + fused Conv+BN + channels_last teacher
  kd:cached        default + teacher_runtime.cache (every timed step a full hit: no teacher forward)

  python tools/bench_gpu.py --teacher yolov8l.yaml --student yolov8n.yaml --imgsz 640 --batch 32
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from detkd.integrations.ultralytics_env import ensure_ultralytics_offline  # noqa: E402

ensure_ultralytics_offline()

from bench_overhead import RECIPES, build, make_batch  # noqa: E402

from detkd.integrations.ultralytics import KDDetectionModel  # noqa: E402

ROWS = {
    "kd:default": {},
    "kd:fp32-teacher": {"half": False},
    "kd:fused+chlast": {"fuse": True, "channels_last": True},
    "kd:cached": {"cache": "memory"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="yolov8s.yaml")
    ap.add_argument("--student", default="yolov8n.yaml")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--nc", type=int, default=80)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="all")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--no-cudnn-benchmark", action="store_true", help="leave torch.backends.cudnn.benchmark off")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: CUDA is not available on this machine; run it where a GPU is visible "
                 "(for CPU numbers use tools/bench_overhead.py)")
    device = torch.device(a.device)
    torch.backends.cudnn.benchmark = not a.no_cudnn_benchmark
    torch.manual_seed(0)
    batch = {k: v.to(device) for k, v in make_batch(a.batch, a.imgsz, a.nc).items()}
    batch["im_file"] = tuple(f"img{i}.jpg" for i in range(a.batch))  # cache keys (used by kd:cached only)
    teacher = build(a.teacher, a.nc, a.imgsz).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build(a.student, a.nc, a.imgsz).to(device).train()

    def timed(fn) -> tuple[float, float]:
        """(median seconds, peak GiB) of ``fn`` over --steps after --warmup."""
        for _ in range(a.warmup):
            fn()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = []
        for _ in range(a.steps):
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            out.append(time.perf_counter() - t)
        return statistics.median(out), torch.cuda.max_memory_allocated(device) / 2**30

    def train_step(model, loss_fn):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda")

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16):
                loss, _ = loss_fn(batch)
            scaler.scale(loss.sum()).backward()
            scaler.step(opt)
            scaler.update()

        return step

    results: dict[str, tuple[float, float]] = {}
    notes: dict[str, str] = {}
    results["student"] = timed(train_step(student, student.loss))

    def teacher_fwd():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            teacher(batch["img"])

    results["teacher fwd"] = timed(teacher_fwd)
    for name, runtime in ROWS.items():
        model = KDDetectionModel(copy.deepcopy(student), copy.deepcopy(teacher),
                                 {**RECIPES[a.recipe], "teacher_runtime": runtime}, imgsz=a.imgsz).train()
        d = model.distiller
        results[name] = timed(train_step(model, model.loss))
        t_dtype = next(d.teacher.parameters()).dtype
        notes[name] = f"teacher {str(t_dtype).replace('torch.', '')}, {d.teacher_forwards} teacher forwards"
        if d.teacher_cache is not None:
            notes[name] += f", cache hits {d.cache_hits} / misses {d.cache_misses}"
        del model, d
        torch.cuda.empty_cache()

    print(f"# bench_gpu: teacher {a.teacher}, student {a.student}, imgsz {a.imgsz}, batch {a.batch}, "
          f"recipe {a.recipe}, "
          f"AMP float16, GPU {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
          f"cudnn.benchmark {torch.backends.cudnn.benchmark}")
    print(f"# median of {a.steps} steps after {a.warmup} warm-up steps; x student = step time / student step time")
    print(f"{'row':<18}{'median s':>10}{'images/s':>10}{'x student':>11}{'peak GiB':>10}  note")
    base = results["student"][0]
    for k, (med, peak) in results.items():
        print(f"{k:<18}{med:>10.4f}{a.batch / med:>10.1f}{med / base:>11.2f}{peak:>10.2f}  {notes.get(k, '')}")


if __name__ == "__main__":
    main()
