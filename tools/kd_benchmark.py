#!/usr/bin/env python
"""The distillation benchmark table on the built-in security-camera data.

Rows: teacher, student baseline, Ultralytics' built-in `distill_model`, detkd logits only, boxes only, each
feature method (fitnet, cwd, pkd, at, mgd, fgd), and all three signals combined. Every student row uses the same
data, epochs and seed; with several seeds the table gives mAP50-95 mean ± std and whether each row gained on
every seed.

  python tools/kd_benchmark.py --budget full --seeds 0 1 2 --out runs/kd_benchmark
  python tools/kd_benchmark.py --budget default --seeds 0 --rows baseline ultralytics all   # a short run

Stages that already logged all their epochs are reused, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import yaml

from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

ensure_ultralytics_offline()

from detkd.demo import BUDGETS, DISTILL, _finished, _train  # noqa: E402

FEATURES = ("fitnet", "cwd", "pkd", "at", "mgd", "fgd")


def recipes() -> dict[str, dict | None]:
    r: dict[str, dict | None] = {"baseline": None, "ultralytics": None}
    r["logits"] = {**DISTILL, "boxes": None, "features": None}
    r["boxes"] = {**DISTILL, "logits": None, "features": None}
    for m in FEATURES:
        r[f"feat_{m}"] = {**DISTILL, "logits": None, "boxes": None, "feature_method": m}
    r["all"] = dict(DISTILL)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=None, help=f"subset of: teacher {' '.join(recipes())}")
    ap.add_argument("--out", default="runs/kd_benchmark")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    from ultralytics import YOLO

    from detkd.data.synth import generate
    from detkd.eval.run import evaluate_model

    b = BUDGETS[a.budget]
    out = Path(a.out).resolve()
    data_yaml = out / "data" / "data.yaml"
    if not data_yaml.exists():
        generate(out / "data", seed=0, n_train=b.n_train, n_val=b.n_val, imgsz=b.imgsz)
    rows = a.rows or ["teacher", *recipes()]
    teacher, _ = (out / "runs" / "teacher" / "weights" / "best.pt", None)
    if not (teacher.exists() and _finished(teacher.parents[1] / "results.csv", b.teacher_epochs)):
        teacher, _ = _train(b.teacher, data_yaml, out / "runs", "teacher", b.teacher_epochs, b, a.threads, 0)
    results: dict[str, list[dict]] = {}

    def ev(weights: Path, tag: str) -> dict:
        m = evaluate_model(weights, data_yaml, imgsz=b.imgsz, out_dir=out / "eval" / tag, threads=a.threads,
                           progress=False, voc=False)
        return {"AP": m["AP"] * 100, "AP50": m["AP50"] * 100}

    if "teacher" in rows:
        results["teacher"] = [ev(teacher, "teacher")]
    for name, recipe in recipes().items():
        if name not in rows:
            continue
        for seed in a.seeds:
            tag = f"{name}_s{seed}"
            best = out / "runs" / tag / "weights" / "best.pt"
            if not (best.exists() and _finished(best.parents[1] / "results.csv", b.student_epochs)):
                if name == "ultralytics":  # Ultralytics' own feature KD: distill_model=<teacher .pt>
                    import torch

                    model = YOLO(b.student)
                    model.add_callback("on_pretrain_routine_start", lambda tr: torch.set_num_threads(a.threads))
                    model.train(data=str(data_yaml), epochs=b.student_epochs, imgsz=b.imgsz, batch=b.batch,
                                device="cpu", workers=0, project=str(out / "runs"), name=tag, exist_ok=True,
                                seed=seed, deterministic=True, amp=False, plots=False, verbose=False,
                                close_mosaic=max(1, b.student_epochs // 4), distill_model=str(teacher))
                    best = Path(model.trainer.save_dir) / "weights" / "best.pt"
                else:
                    kd = None
                    if recipe is not None:
                        kd = out / f"{tag}.yaml"
                        kd.write_text(yaml.safe_dump({"teacher": str(teacher), "distill": recipe}))
                    best, _ = _train(b.student, data_yaml, out / "runs", tag, b.student_epochs, b, a.threads, seed, kd)
            results.setdefault(name, []).append(ev(best, tag))
    base = [r["AP"] for r in results.get("baseline", [])]
    lines = [f"# kd_benchmark: budget {a.budget} ({b.student} <- {b.teacher}, {b.student_epochs} epochs, imgsz "
             f"{b.imgsz}, {b.n_train} train / {b.n_val} val), seeds {a.seeds}, {a.threads} threads",
             f"{'row':<14}{'mAP50-95':>18}{'mAP50':>16}  gain on every seed"]
    for name, rs in results.items():
        ap_ = [r["AP"] for r in rs]
        ap50 = [r["AP50"] for r in rs]
        sd = statistics.stdev(ap_) if len(ap_) > 1 else 0.0
        sd50 = statistics.stdev(ap50) if len(ap50) > 1 else 0.0
        gain = "" if name in ("teacher", "baseline") or len(base) != len(ap_) else \
            ("yes" if all(x > y for x, y in zip(ap_, base)) else "no")
        lines.append(f"{name:<14}{statistics.mean(ap_):>11.2f} ± {sd:<4.2f}{statistics.mean(ap50):>9.2f} ± {sd50:<4.2f}  {gain}")
    if "teacher" in results and base and "all" in results:
        t = results["teacher"][0]["AP"]
        k = statistics.mean(r["AP"] for r in results["all"])
        s = statistics.mean(base)
        lines.append(f"gap closed by 'all': {(k - s) / (t - s) * 100:.0f}%" if t > s else "teacher <= baseline: gap n/a")
    text = "\n".join(lines)
    print(text)
    (out / "table.txt").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
