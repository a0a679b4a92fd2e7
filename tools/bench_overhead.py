#!/usr/bin/env python
"""Distillation overhead on the same batches, in one run, same thread count.

Times (median and p90 of --steps after --warmup; the rows are timed round-robin, one call of each per round):
  student   : a plain student training step (forward, Ultralytics detection loss, backward)
  teacher   : a forward of the teacher as the user has it (eval mode, BatchNorm, head decode, contiguous
              weights) under torch.inference_mode (what detkd's teacher runtime uses by default; the overhead below
              would otherwise count inference_mode's saving as a negative cost)
  detkd     : a detkd distillation step (student + teacher + all configured KD terms, backward) with detkd's default
              teacher_runtime (on CPU: Conv+BN folded, channels-last, no head decode: cheaper than the row above)
  ultra     : Ultralytics' built-in DistillationModel step (feature-only KD), same teacher/student
and the overhead  detkd - (teacher + student)  as a fraction of a student step (target <= 5%). With --teacher-opts,
kd:default - (t:default + student@kd) is the cost of the KD terms alone, beyond detkd's own teacher forward.

With --teacher-opts, also the teacher-cost options (``distill.teacher_runtime``), each row on the same batch and
thread count, as median seconds and as a ratio to the plain student step. These rows are timed round-robin
together with a plain student step (student@t, student@kd), so that load changes on a shared machine hit all of
them alike, and each ratio uses the student timings of its own round:
  t:no_grad         teacher forward through the Distiller under torch.no_grad, nothing else (the baseline)
  t:inference       ... under torch.inference_mode
  t:chlast          inference_mode + channels_last weights and input
  t:fused           inference_mode + Conv+BN folded
  t:fused+chlast    both
  t:half            inference_mode + float16 teacher (CUDA only; skipped with a note on CPU)
  t:default         detkd's default teacher_runtime (fuse / channels_last: auto)
  kd:default        the detkd step with default teacher settings
  kd:best           the detkd step with the fastest t:* variant
  kd:cached         the detkd step with teacher_runtime.cache (every step a full cache hit: no teacher forward)

  python tools/bench_overhead.py --teacher yolov8s.yaml --student yolov8n.yaml --imgsz 320 --batch 16
  python tools/bench_overhead.py --teacher-opts --imgsz 256 --batch 8 --steps 8 --threads 1
  python tools/bench_overhead.py --teacher-opts --device cuda --amp --imgsz 640 --batch 32
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
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


_OFF = {"fuse": False, "channels_last": False}
TEACHER_VARIANTS = {  # teacher_runtime of each t:* row (half, fuse, channels_last off unless named: one option a row)
    "t:no_grad": {**_OFF, "inference_mode": False},
    "t:inference": _OFF,
    "t:chlast": {**_OFF, "channels_last": True},
    "t:fused": {**_OFF, "fuse": True},
    "t:fused+chlast": {"fuse": True, "channels_last": True},
    "t:half": {**_OFF, "half": True},
    "t:default": {"half": "auto"},
}


def timeit_interleaved(fns: dict, warmup: int, steps: int, sync=None) -> dict[str, list[float]]:
    """Seconds per call of each ``fns`` value, round-robin (one call of each per round), so that load changes
    on a shared machine hit every row alike."""
    sync = sync or (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            out[k].append(time.perf_counter() - t)
    return out


def teacher_opts_rows(a, student_step, student, teacher, batch, kd_step_of, amp, sync):
    """The t:* and kd:* rows, timed round-robin with the plain student step in two rounds (teacher forwards,
    then distillation steps); returns ``(rows, notes)``. Each round's own student timings are in the rows as
    ``student@t`` / ``student@kd``: the ratios of that round use them."""
    notes: dict[str, str] = {}
    recipe = dict(RECIPES[a.recipe])
    cuda = batch["img"].is_cuda

    def kd_model(runtime: dict) -> KDDetectionModel:
        m = KDDetectionModel(copy.deepcopy(student), copy.deepcopy(teacher),
                             {**recipe, "teacher_runtime": {"half": False, **runtime}}, imgsz=a.imgsz)
        return m.train()

    fwd = {"student@t": student_step}
    for name, runtime in TEACHER_VARIANTS.items():
        if name == "t:half" and not cuda:
            notes[name] = "skipped: half precision runs on CUDA only (--device cuda)"
            continue
        d = kd_model(runtime).distiller

        def f(d=d):
            with amp():
                d.teacher_forward(batch["img"])

        fwd[name] = f
    rows = timeit_interleaved(fwd, a.warmup, a.steps, sync)
    del fwd
    timed = {k: statistics.median(v) for k, v in rows.items() if k.startswith("t:")}
    best = min(timed, key=timed.get)
    notes["kd:best"] = f"teacher {best}"
    cached = kd_model({"cache": "memory"})
    keyed = {**batch, "im_file": tuple(f"img{i}.jpg" for i in range(batch["img"].shape[0]))}
    kd_fns = {"student@kd": student_step,
              "kd:default": kd_step_of(kd_model({"half": "auto"}), batch),  # default teacher_runtime
              "kd:best": kd_step_of(kd_model(TEACHER_VARIANTS[best]), batch),
              "kd:cached": kd_step_of(cached, keyed)}  # the first warm-up step fills the cache
    rows.update(timeit_interleaved(kd_fns, a.warmup, a.steps, sync))
    d = cached.distiller
    notes["kd:cached"] = (f"{d.teacher_forwards} teacher forward in {a.warmup + a.steps} steps, "
                          f"{len(d.teacher_cache)} samples / {d.teacher_cache.nbytes / 2**20:.1f} MiB cached")
    return rows, notes


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
    ap.add_argument("--teacher-opts", action="store_true",
                    help="also time the teacher-cost options (distill.teacher_runtime): see the rows above")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    ap.add_argument("--amp", action="store_true", help="float16 autocast around every step (CUDA only)")
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_overhead: --device cuda, but CUDA is not available on this machine")
    if a.amp and device.type != "cuda":
        sys.exit("bench_overhead: --amp is for --device cuda")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    batch = {k: v.to(device) for k, v in make_batch(a.batch, a.imgsz, a.nc).items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    def amp():
        return torch.autocast("cuda", dtype=torch.float16) if a.amp else contextlib.nullcontext()

    teacher = build(a.teacher, a.nc, a.imgsz).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    plain = copy.deepcopy(teacher)  # the teacher as the user has it: detkd's runtime changes `teacher` in place
    student = build(a.student, a.nc, a.imgsz).to(device).train()
    kd_model = KDDetectionModel(build(a.student, a.nc, a.imgsz).to(device), teacher, dict(RECIPES[a.recipe]),
                                imgsz=a.imgsz)
    kd_model.student_model.load_state_dict(student.state_dict())
    kd_model.train()

    def student_step():
        student.zero_grad(set_to_none=True)
        with amp():
            loss, _ = student.loss(batch)
        loss.sum().backward()

    def teacher_fwd():
        with torch.inference_mode(), amp():
            plain(batch["img"])

    def kd_step_of(model, b):
        def step():
            model.zero_grad(set_to_none=True)
            with amp():
                loss, _ = model.loss(b)
            loss.sum().backward()

        return step

    fns = {"student": student_step, "teacher": teacher_fwd, "detkd": kd_step_of(kd_model, batch)}
    if not a.no_ultra:
        s2 = build(a.student, a.nc, a.imgsz).to(device)
        s2.args.dis = 6.0
        ultra = DistillationModel(teacher_model=copy.deepcopy(plain), student_model=s2).train()

        def ultra_step():
            ultra.zero_grad(set_to_none=True)
            with amp():
                loss, _ = ultra.loss(batch)
            loss.sum().backward()

        fns["ultra"] = ultra_step
    # round-robin: one call of each per round, so load drift on a shared machine hits every row alike
    rows = timeit_interleaved(fns, a.warmup, a.steps, sync)
    opt_rows: dict = {}
    notes: dict = {}
    if a.teacher_opts:
        opt_rows, notes = teacher_opts_rows(a, student_step, student, plain, batch, kd_step_of, amp, sync)
    med = {k: statistics.median(v) for k, v in {**rows, **opt_rows}.items()}
    p90 = {k: sorted(v)[int(0.9 * (len(v) - 1))] for k, v in {**rows, **opt_rows}.items()}
    where = f"GPU {torch.cuda.get_device_name(device)}, amp {a.amp}, " if device.type == "cuda" else ""
    print(f"# bench_overhead: teacher {a.teacher}, student {a.student}, imgsz {a.imgsz}, batch {a.batch}, "
          f"recipe {a.recipe}, torch threads {torch.get_num_threads()}, {where}CPU {cpu_model()}, "
          f"torch {torch.__version__}")
    print(f"# median and p90 of {a.steps} steps after {a.warmup} warm-up steps")
    print(f"{'step':<10}{'median s':>10}{'p90 s':>10}")
    for k in rows:
        print(f"{k:<10}{med[k]:>10.3f}{p90[k]:>10.3f}")
    over = med["detkd"] - med["teacher"] - med["student"]
    print(f"detkd overhead beyond teacher forward + student step: {over:+.3f} s = "
          f"{100 * over / med['student']:+.1f}% of a student step (target <= +5%)")
    per_round = sorted((d - t - s_) / s_ for d, t, s_ in zip(rows["detkd"], rows["teacher"], rows["student"]))
    print(f"per-round overhead (same round's three timings), median {100 * statistics.median(per_round):+.1f}% "
          f"of a student step, middle half {100 * per_round[len(per_round) // 4]:+.1f}% .. "
          f"{100 * per_round[(3 * len(per_round)) // 4]:+.1f}%")
    if "ultra" in med:
        print(f"Ultralytics built-in distill step: {med['ultra']:.3f} s; detkd/ultra = {med['detkd'] / med['ultra']:.2f}x")
    if a.teacher_opts:
        print("# teacher options (--teacher-opts, distill.teacher_runtime): same batch and threads, rows timed "
              "round-robin with a plain student step (student@t, student@kd);")
        print("# x student = median / that round's student median; x no_grad = median / t:no_grad median")
        print(f"{'row':<16}{'median s':>10}{'p90 s':>10}{'x student':>11}{'x no_grad':>11}  note")
        order = ["student@t", *TEACHER_VARIANTS, "student@kd", "kd:default", "kd:best", "kd:cached"]
        for k in order:
            if k not in med:
                print(f"{k:<16}{'-':>10}{'-':>10}{'-':>11}{'-':>11}  {notes.get(k, '')}")
                continue
            base = med["student@t"] if k.startswith(("t:", "student@t")) else med["student@kd"]
            rel = f"{med[k] / med['t:no_grad']:>11.2f}" if k.startswith("t:") else f"{'':>11}"
            print(f"{k:<16}{med[k]:>10.3f}{p90[k]:>10.3f}{med[k] / base:>11.2f}{rel}  {notes.get(k, '')}")
        if "t:default" in med:
            terms = med["kd:default"] - med["t:default"] - med["student@kd"]
            print(f"KD terms alone (kd:default - t:default - student@kd): {terms:+.3f} s = "
                  f"{100 * terms / med['student@kd']:+.1f}% of a student step")


if __name__ == "__main__":
    main()
