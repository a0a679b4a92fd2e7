"""`detkd demo`: the whole story, offline, on the built-in security-camera data.

generate data -> train a teacher -> train a baseline student (no distillation) -> train a distilled student
(same seed, same epochs, all three signals) -> evaluate all three (COCO mAP on the held-out test split, and on
cameras never seen in training) -> CPU latency -> report with learning curves.

Few labels, much footage (on by default; ``few_labels=False`` / ``--no-few-labels`` skips it): the student keeps
the labels of 10% of the train frames and the other 90% are unlabeled footage. Two more students: the 10% alone,
and the 10% plus the teacher's pseudo-labels on the 90% (`detkd pseudo-label`: hard-label distillation), both with
the students' epochs and optimizer steps.

Budgets (`detkd.benchmark.BUDGETS`): ``--quick`` (a smoke test: a few minutes, numbers mean nothing; the test
suite and CI use it), default (a reduced version of the benchmark regime, ~20 minutes on 2 CPU cores) and
``--full`` (the GPU regime: hours on a CPU). Every training stage is reused when it already finished.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from detkd.benchmark import (BUDGETS, FEW_FRACTION, Stage, StageRunner, few_label_split, finished, make_data,
                             pseudo_label_data, say)

__all__ = ["run_demo", "BUDGETS", "finished"]
DISTILL = BUDGETS["default"].distill


def _say(msg: str) -> None:
    say("detkd demo", msg)


def run_demo(out: str | Path = "detkd_demo", budget: str = "default", threads: int | None = None, seed: int = 0,
             skip_existing: bool = True, jobs: int | None = None, few_labels: bool = True) -> dict:
    from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

    ensure_ultralytics_offline()
    from detkd.bench.info import model_info
    from detkd.bench.noise import NOISY_TEXT
    from detkd.bench.run import bench, format_table, latency_entry
    from detkd.eval.run import evaluate_model

    b = BUDGETS[budget]
    smoke = budget == "quick"
    threads = threads or max(1, os.cpu_count() or 1)
    jobs = jobs or (2 if threads >= 2 and b.device == "cpu" else 1)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not skip_existing and (out / "runs").exists():
        import shutil

        shutil.rmtree(out / "runs")
    t0 = time.time()
    if smoke:
        _say("SMOKE TEST (--quick): every stage runs on tiny data for 2 epochs; the numbers it prints mean nothing. "
             "Run `detkd demo` without --quick for a real comparison.")
    _say(f"budget '{budget}' ({b.description}): teacher {Path(b.teacher).stem} {b.teacher_epochs} epochs, students "
         f"{Path(b.student).stem} {b.student_epochs} epochs, {b.n_train} train frames at {b.imgsz} px, {threads} threads"
         + (f" ({jobs} trainings at once)" if jobs > 1 else ""))
    data_yaml = make_data(out / "data", b, seed, "detkd demo")
    stages = [Stage("teacher", "teacher", b.teacher, b.teacher_epochs, seed),
              Stage("baseline", "student", b.student, b.student_epochs, seed)]
    if few_labels:  # the 10% alone trains beside the teacher; the 10% + pseudo-labels once the teacher has finished
        few = few_label_split(out, data_yaml, seed=seed)
        stages.append(Stage("few_baseline", "student", b.student, b.student_epochs, seed, data=few["labeled"]))
    stages.append(Stage("distilled", "distilled", b.student, b.student_epochs, seed, distill=b.distill,
                        teacher_from="teacher"))
    if few_labels:
        stages.append(Stage("few_pseudo", "student", b.student, b.student_epochs, seed, teacher_from="teacher",
                            data=pseudo_label_data(out, data_yaml, b, "detkd demo", seed=seed)))
    split = b.report_split
    splits = [split] + (["test_ood"] if b.ood_cameras else [])
    metrics: dict[str, dict] = {}
    ood: dict[str, float] = {}
    info = {}

    def evaluate(role: str, w: Path, n_threads: int) -> None:
        metrics[role] = evaluate_model(w, data_yaml, split=split, imgsz=b.imgsz, out_dir=out / "eval" / role,
                                       threads=n_threads, progress=False)
        if "test_ood" in splits:
            ood[role] = evaluate_model(w, data_yaml, split="test_ood", imgsz=b.imgsz, out_dir=out / "eval_ood" / role,
                                       threads=n_threads, progress=False, voc=False)["AP"] * 100
        info[role] = model_info(w, b.imgsz)

    def evaluate_early(role: str, w: Path) -> None:  # a core that no stage is left to use: evaluate what finished
        _say(f"  evaluating {role} on {' and '.join(splits)} while the last training runs")
        evaluate(role, w, max(1, threads // jobs))

    weights = StageRunner(out, data_yaml, b, max(1, threads // jobs), stages, "detkd demo", jobs=jobs,
                          idle_work=evaluate_early).run()
    logs = {r: out / "runs" / r / "results.csv" for r in weights}
    roles = [s.name for s in stages]
    left = [r for r in roles if r not in metrics]
    if left:
        _say(f"evaluating {', '.join(left)} (COCO mAP, pycocotools) on {' and '.join(splits)}")
    for role in left:
        evaluate(role, weights[role], threads)
    _say(f"CPU inference of teacher, baseline and distilled student, timed round-robin: PyTorch eager vs ONNX "
         f"Runtime FP32 / INT8 ({threads} threads, imgsz {b.imgsz})")
    bres = bench([weights["teacher"], weights["baseline"], weights["distilled"]],
                 names=["teacher", "baseline student", "distilled student"], imgsz=b.imgsz,
                 threads=threads, batch_sizes=(1, 8), runs=30, warmup=5, int8=True, data=data_yaml,
                 n_calib=min(300, b.n_train), out_dir=out / "bench")
    print(format_table(bres), flush=True)
    info["teacher"]["latency_ms"] = latency_entry(bres, "teacher")
    info["distilled"]["latency_ms"] = latency_entry(bres, "distilled student")
    info["baseline"]["latency_ms"] = latency_entry(bres, "baseline student")
    _say("writing the report")
    from detkd.report.report import ModelEntry, build_report

    s, k, t = (metrics[r]["AP"] * 100 for r in ("baseline", "distilled", "teacher"))
    gap = (k - s) / (t - s) * 100 if t > s else float("nan")
    entries = [ModelEntry(role=role, name=f"{role} ({Path(b.teacher if role == 'teacher' else b.student).stem})",
                          metrics=str(out / "eval" / role / "metrics.json"), weights=str(weights[role]),
                          params=info[role]["params"], gflops=info[role]["gflops"],
                          latency_ms=info[role]["latency_ms"], results_csv=str(logs[role]))
               for role in ("teacher", "baseline", "distilled")]
    few_line = ""
    if few_labels:
        pct = f"{FEW_FRACTION:.0%}"
        names = {"few_baseline": f"{pct} labels only", "few_pseudo": f"{pct} labels + teacher pseudo-labels"}
        entries += [ModelEntry(role="other", name=f"{names[r]} ({Path(b.student).stem})",
                               metrics=str(out / "eval" / r / "metrics.json"), weights=str(weights[r]),
                               params=info[r]["params"], gflops=info[r]["gflops"], results_csv=str(logs[r]))
                    for r in names]
        fb, fp = (metrics[r]["AP"] * 100 for r in names)
        fg = (fp - fb) / (t - fb) * 100 if t > fb else float("nan")
        few_line = (f"few labels ({pct} of the train frames labeled, the rest unlabeled footage): student {fb:.1f} -> "
                    f"{fp:.1f} ({fp - fb:+.1f}) with the teacher's pseudo-labels, gap closed "
                    f"{'n/a' if fg != fg else f'{fg:.0f}%'}; the student with all labels {s:.1f}"
                    + (f"; unseen cameras {ood['few_baseline']:.1f} -> {ood['few_pseudo']:.1f}" if ood else ""))
    ood_line = ""
    if ood:
        go = (ood["distilled"] - ood["baseline"]) / (ood["teacher"] - ood["baseline"]) * 100 \
            if ood["teacher"] > ood["baseline"] else float("nan")
        ood_line = (f"unseen cameras: student {ood['baseline']:.1f} -> {ood['distilled']:.1f} "
                    f"({ood['distilled'] - ood['baseline']:+.1f}), teacher {ood['teacher']:.1f}, gap closed "
                    f"{'n/a' if go != go else f'{go:.0f}%'}")
    notes = (f"budget '{budget}' ({b.description}): teacher {Path(b.teacher).stem} {b.teacher_epochs} epochs, "
             f"students {Path(b.student).stem} {b.student_epochs} epochs (same data, seed {seed} and augmentation); "
             f"mAP on the '{split}' split, which no training or choice used (Ultralytics picks best.pt on 'val'); "
             + (f"{ood_line}; " if ood_line else "") + (f"{few_line}; " if few_line else "")
             + f"{threads} CPU threads, {time.time() - t0:.0f} s end to end")
    paths = build_report(entries, out / "report", title="detkd demo: security-camera detector distillation",
                         dataset=f"built-in security-camera scenes, {b.n_train} train / {b.n_val} val / {b.n_test} "
                                 f"test frames at {b.imgsz} px, seed {seed}",
                         notes=notes, bench=bres, smoke=smoke, headline_extra=few_line or None,
                         split=split)
    ls, lk = info["distilled"]["latency_ms"]["p50"], info["teacher"]["latency_ms"]["p50"]
    q = latency_entry(bres, "distilled student", engine="onnxruntime", precision="int8")
    headline = (("SMOKE TEST, numbers mean nothing: " if smoke else "")
                + f"student mAP50-95 {s:.1f} -> {k:.1f} ({k - s:+.1f}), teacher {t:.1f}, gap closed "
                f"{'n/a' if gap != gap else f'{gap:.0f}%'} ({split} split)"
                + (f"; {ood_line}" if ood_line else "") + (f"; {few_line}" if few_line else "")
                + f"; CPU latency {ls:.1f} ms (student) vs {lk:.1f} ms (teacher)"
                + (f", {q['p50']:.1f} ms student INT8 ONNX" if q else "") + f", {threads} threads, imgsz {b.imgsz}"
                + (f" ({NOISY_TEXT})" if bres["noise"]["noisy"] else ""))
    summary = {"headline": headline, "smoke": smoke, "budget": asdict(b), "split": split,
               "metrics": {r: {x: metrics[r][x] for x in ("AP", "AP50", "AP75")} for r in metrics},
               "ood_AP": ood, "info": info, "report": {k2: str(v) for k2, v in paths.items()},
               "seconds": time.time() - t0, "bench": str(out / "bench" / "bench.json")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _say(f"report: {paths.get('html', out / 'report')}")
    _say(headline)
    return summary
