"""`detkd demo`: the whole story, offline, on the built-in security-camera data.

generate data -> train a teacher -> train a baseline student (no distillation) -> train a distilled student
(same seed, same epochs, all three signals) -> evaluate all three (COCO mAP) -> CPU latency -> report.

Budgets: ``--quick`` (a few minutes; the test uses it), default (about 15 minutes on 2 CPU cores) and
``--full`` (the real benchmark: bigger data, more epochs — hours on a CPU, minutes on a GPU).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from detkd.assets import PICO_YAML
from detkd.integrations.recipes import DEFAULT_RECIPE


@dataclass
class Budget:
    n_train: int
    n_val: int
    imgsz: int
    teacher: str
    student: str
    teacher_epochs: int
    student_epochs: int
    batch: int = 16
    distill: dict = field(default_factory=dict)


DISTILL = DEFAULT_RECIPE  # logits (sigmoid KD) + boxes (LD) + neck features (CWD)

BUDGETS = {
    "quick": Budget(64, 24, 96, "yolov8n.yaml", str(PICO_YAML), 2, 2, 16, DISTILL),
    "default": Budget(600, 150, 192, "yolov8n.yaml", str(PICO_YAML), 14, 12, 16, DISTILL),
    "full": Budget(2000, 500, 256, "yolov8s.yaml", "yolov8n.yaml", 80, 60, 16, DISTILL),
}


def _say(msg: str) -> None:
    print(f"[detkd demo] {msg}", flush=True)


def _train(model_cfg: str, data: Path, out: Path, name: str, epochs: int, b: Budget, threads: int, seed: int,
           distill_yaml: Path | None = None) -> tuple[Path, Path]:
    """Train with Ultralytics (plain, or DistillTrainer when distill_yaml is given). Returns (best.pt, run dir)."""
    import torch
    from ultralytics import YOLO

    model = YOLO(model_cfg, task="detect")
    model.add_callback("on_pretrain_routine_start", lambda tr: torch.set_num_threads(threads))
    kw = dict(data=str(data), epochs=epochs, imgsz=b.imgsz, batch=b.batch, device="cpu", workers=0,
              project=str(out), name=name, exist_ok=True, seed=seed, deterministic=True, amp=False, plots=False,
              verbose=False, close_mosaic=max(1, epochs // 4))
    if distill_yaml is not None:
        from detkd.integrations.ultralytics import DistillTrainer

        os.environ["DETKD_THREADS"] = str(threads)
        model.train(trainer=DistillTrainer, distill_model=str(distill_yaml), **kw)
    else:
        model.train(**kw)
    run = Path(model.trainer.save_dir)
    best = run / "weights" / "best.pt"
    return (best if best.exists() else run / "weights" / "last.pt"), run


def _finished(results_csv: Path, epochs: int) -> bool:
    """True when an earlier run of this stage logged all its epochs (an interrupted one is trained again)."""
    if not results_csv.is_file():
        return False
    lines = [x for x in results_csv.read_text().splitlines()[1:] if x.strip()]
    return len(lines) >= epochs


def run_demo(out: str | Path = "detkd_demo", budget: str = "default", threads: int | None = None, seed: int = 0,
             skip_existing: bool = True) -> dict:
    from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

    ensure_ultralytics_offline()
    from detkd.bench.info import model_info
    from detkd.bench.latency import torch_latency
    from detkd.bench.run import bench, format_table, latency_entry
    from detkd.data.synth import generate
    from detkd.eval.run import evaluate_model

    b = BUDGETS[budget]
    threads = threads or max(1, os.cpu_count() or 1)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data_dir = out / "data"
    if not (skip_existing and (data_dir / "data.yaml").exists()):
        _say(f"1/7 generating the security-camera data: {b.n_train} train + {b.n_val} val frames at {b.imgsz} px")
        generate(data_dir, seed=seed, n_train=b.n_train, n_val=b.n_val, imgsz=b.imgsz)
    data_yaml = data_dir / "data.yaml"
    runs = out / "runs"
    weights: dict[str, Path] = {}
    logs: dict[str, Path] = {}

    def stage(i: int, role: str, cfg: str, epochs: int, distill_yaml: Path | None = None) -> None:
        best = runs / role / "weights" / "best.pt"
        if skip_existing and best.exists() and _finished(runs / role / "results.csv", epochs):
            _say(f"{i}/7 {role}: reusing {best}")
            weights[role], logs[role] = best, runs / role / "results.csv"
            return
        _say(f"{i}/7 training the {role} ({Path(cfg).name}, {epochs} epochs, {threads} threads)")
        weights[role], run = _train(cfg, data_yaml, runs, role, epochs, b, threads, seed, distill_yaml)
        logs[role] = run / "results.csv"

    stage(2, "teacher", b.teacher, b.teacher_epochs)
    stage(3, "baseline", b.student, b.student_epochs)
    kd_yaml = out / "distill.yaml"
    kd_yaml.write_text(yaml.safe_dump({"teacher": str(weights["teacher"]), "distill": b.distill}, sort_keys=False))
    stage(4, "distilled", b.student, b.student_epochs, kd_yaml)

    _say("5/7 evaluating all three on the validation frames (COCO mAP, pycocotools)")
    metrics, info = {}, {}
    for role in ("teacher", "baseline", "distilled"):
        metrics[role] = evaluate_model(weights[role], data_yaml, split="val", imgsz=b.imgsz, out_dir=out / "eval" / role,
                                       threads=threads, progress=False)
        info[role] = model_info(weights[role], b.imgsz)
    _say(f"6/7 CPU inference of teacher and distilled student: PyTorch eager vs ONNX Runtime FP32 / INT8 "
         f"({threads} threads, imgsz {b.imgsz})")
    bres = bench([weights["teacher"], weights["distilled"]], names=["teacher", "distilled student"], imgsz=b.imgsz,
                 threads=threads, batch_sizes=(1, 8), runs=30, warmup=5, int8=True, data=data_yaml,
                 n_calib=min(300, b.n_train), out_dir=out / "bench")
    print(format_table(bres), flush=True)
    info["teacher"]["latency_ms"] = latency_entry(bres, "teacher")
    info["distilled"]["latency_ms"] = latency_entry(bres, "distilled student")
    info["baseline"]["latency_ms"] = torch_latency(weights["baseline"], b.imgsz, threads=threads)
    _say("7/7 writing the report")
    from detkd.report.report import ModelEntry, build_report

    entries = [ModelEntry(role=role, name=f"{role} ({Path(BUDGETS[budget].teacher if role == 'teacher' else b.student).stem})",
                          metrics=str(out / "eval" / role / "metrics.json"), weights=str(weights[role]),
                          params=info[role]["params"], gflops=info[role]["gflops"],
                          latency_ms=info[role]["latency_ms"], results_csv=str(logs[role]))
               for role in ("teacher", "baseline", "distilled")]
    paths = build_report(entries, out / "report", title="detkd demo: security-camera detector distillation",
                         dataset=f"built-in security-camera scenes, {b.n_train} train / {b.n_val} val frames at {b.imgsz} px, seed {seed}",
                         notes=f"budget '{budget}', {threads} CPU threads, {time.time() - t0:.0f} s end to end",
                         bench=bres)
    s, k, t = (metrics[r]["AP"] * 100 for r in ("baseline", "distilled", "teacher"))
    gap = (k - s) / (t - s) * 100 if t > s else float("nan")
    ls, lk = info["distilled"]["latency_ms"]["p50"], info["teacher"]["latency_ms"]["p50"]
    q = latency_entry(bres, "distilled student", engine="onnxruntime", precision="int8")
    headline = (f"student mAP50-95 {s:.1f} -> {k:.1f} ({k - s:+.1f}), teacher {t:.1f}, gap closed "
                f"{'n/a' if gap != gap else f'{gap:.0f}%'}, CPU latency {ls:.1f} ms (student) vs {lk:.1f} ms (teacher)"
                + (f", {q['p50']:.1f} ms student INT8 ONNX" if q else "") + f", {threads} threads, imgsz {b.imgsz}")
    summary = {"headline": headline, "budget": asdict(b), "metrics": {r: {x: metrics[r][x] for x in ("AP", "AP50", "AP75")}
                                                                       for r in metrics},
               "info": info, "report": {k2: str(v) for k2, v in paths.items()}, "seconds": time.time() - t0,
               "bench": str(out / "bench" / "bench.json")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _say(f"report: {paths.get('html', out / 'report')}")
    _say(headline)
    return summary
