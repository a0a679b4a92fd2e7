#!/usr/bin/env python
"""The distillation benchmark table on the built-in security-camera data.

Default rows (each student row for every seed, same data, epochs, seed and augmentation):
  teacher            trained once, to its plateau
  baseline           the student alone
  ultralytics        Ultralytics' built-in `distill_model` (feature MSE) from the same teacher
  detkd              detkd's default recipe (logits + boxes + features)
  baseline_2x        the student alone for twice the epochs ("does distillation halve the bill?")
Optional rows: logits, boxes, feat_<method> (fitnet cwd pkd at mgd fgd) — single-signal ablations.
Few labels, much footage (--rows few_baseline few_hard few_soft few_both): the student keeps the labels of 10% of
the train frames (chosen by the data seed); the other 90% are unlabeled footage. The teacher is the one above
(trained on all labels). Every few-label row takes the same optimizer steps as the 100%-labels baseline:
  few_baseline       the 10% only (listed 10 times, so an epoch has the full set's steps)
  few_hard           the 10% + the teacher's pseudo-labels on the 90% (`detkd pseudo-label`, per-class F1-best
                     thresholds chosen on val)
  few_soft           the 10% + soft-label distillation on the 90% (`distill.unlabeled`, half of each batch; half
                     the epochs, since such an epoch has twice the steps)
  few_both           the pseudo-labelled set of few_hard + detkd's default recipe on every frame
The reference row is `baseline` (the student with 100% of the labels).

mAP50-95 by `detkd eval` (pycocotools) on the budget's *test* split, which nothing trains or chooses on
(Ultralytics picks best.pt on val; sweeps choose on val), and on the *test_ood* split (cameras never seen in
training). Learning curves (val mAP per epoch, from results.csv) go to curves.json and a report.

  python tools/kd_benchmark.py --budget bench --seeds 0 1 2 --out runs/kd_benchmark
  python tools/kd_benchmark.py --budget bench --seeds 0 --rows teacher baseline detkd      # a subset
  python tools/kd_benchmark.py --budget full --device cuda                                 # GPU regime

Every training is a stage: a finished stage is reused, an interrupted one is trained again, so rerunning the same
command continues where it stopped. progress.json says which stages are done; each stage prints an ETA. While a
run trains, `--no-train` writes the table of the stages finished so far (it never touches an unfinished stage).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkd.integrations.ultralytics_env import ensure_ultralytics_offline  # noqa: E402

ensure_ultralytics_offline()

from detkd.benchmark import (BUDGETS, Stage, StageRunner, budget, few_label_split, make_data,  # noqa: E402
                             pseudo_label_data, say)

FEATURES = ("fitnet", "cwd", "pkd", "at", "mgd", "fgd")
DEFAULT_ROWS = ["teacher", "baseline", "ultralytics", "detkd", "baseline_2x"]
FEW_ROWS = ("few_baseline", "few_hard", "few_soft", "few_both")
FEW_RATIO = 0.5


def recipes(distill: dict) -> dict[str, dict | None]:
    r: dict[str, dict | None] = {"baseline": None, "ultralytics": None, "baseline_2x": None, "detkd": dict(distill)}
    r["logits"] = {**distill, "boxes": None, "features": None}
    r["boxes"] = {**distill, "logits": None, "features": None}
    for m in FEATURES:
        r[f"feat_{m}"] = {**distill, "logits": None, "boxes": None, "feature_method": m}
    return r


_FEW_CTX: dict = {}  # out / data_yaml for the few-label stages (set in main)


def _few_stage(row: str, name: str, seed: int, b) -> Stage:
    out, data_yaml = _FEW_CTX["out"], _FEW_CTX["data"]
    few = few_label_split(out, data_yaml)
    if row == "few_baseline":
        return Stage(name, "student", b.student, b.student_epochs, seed, data=few["labeled"])
    if row == "few_hard":
        # teacher_from: its data (the teacher's pseudo-labels) waits for the teacher stage when stages run in parallel
        return Stage(name, "student", b.student, b.student_epochs, seed, teacher_from="teacher",
                     data=pseudo_label_data(out, data_yaml, b, "kd_benchmark"))
    if row == "few_both":
        return Stage(name, "distilled", b.student, b.student_epochs, seed, distill=dict(b.distill),
                     teacher_from="teacher", data=pseudo_label_data(out, data_yaml, b, "kd_benchmark"))
    recipe = {**b.distill, "unlabeled": {"source": str(few["unlabeled"]), "ratio": FEW_RATIO}}
    return Stage(name, "distilled_unlabeled", b.student, max(1, round(b.student_epochs * (1 - FEW_RATIO))), seed,
                 distill=recipe, teacher_from="teacher", data=few["labeled"])


def stages_for(rows: list[str], seeds: list[int], b) -> list[Stage]:
    rec = recipes(b.distill)
    needs_teacher = "teacher" in rows or any(r not in ("baseline", "baseline_2x", "few_baseline") for r in rows)
    st = [Stage("teacher", "teacher", b.teacher, b.teacher_epochs, 0)] if needs_teacher else []
    for seed in seeds:  # seed-major: a finished seed gives a complete partial table
        for row in rows:
            if row == "teacher":
                continue
            if row not in rec and row not in FEW_ROWS:
                raise SystemExit(f"unknown row {row!r}; choose from: teacher {' '.join(rec)}")
            name = f"{row}_s{seed}"
            if row in FEW_ROWS:
                st.append(_few_stage(row, name, seed, b))
            elif row in ("baseline", "baseline_2x"):
                st.append(Stage(name, "student", b.student, b.student_epochs * (2 if row == "baseline_2x" else 1), seed))
            elif row == "ultralytics":
                st.append(Stage(name, "ultralytics", b.student, b.student_epochs, seed, teacher_from="teacher"))
            else:
                st.append(Stage(name, "distilled", b.student, b.student_epochs, seed, distill=rec[row],
                                teacher_from="teacher"))
    return st


def _map_curve(csv: Path) -> list[float]:
    from detkd.report.report import read_results_csv

    log = read_results_csv(csv)
    col = next(c for c in log if c.replace(" ", "") == "metrics/mAP50-95(B)")
    return [round(float(x) * 100, 2) for x in log[col]]


def plateau_gain(curve: list[float]) -> float:
    """Relative val-mAP gain over the last 20% of epochs: (last - at 80%) / at 80% (the flattening criterion)."""
    i = max(0, int(round(0.8 * len(curve))) - 1)
    return (curve[-1] - curve[i]) / curve[i] if curve and curve[i] > 0 else float("nan")


def plateau_text(curve: list[float]) -> str:
    g = plateau_gain(curve)
    if g != g:
        return "last 20% of epochs: n/a (no mAP yet)"
    return f"last 20% of epochs: {g * 100:+.1f}% relative, {'flat' if g < 0.05 else 'still rising'} (< +5% is flat)"


def table(results: dict[str, dict[str, list[float]]], split: str, seeds: list[int], b) -> list[str]:
    """Markdown rows: mean ± std over seeds, per seed, gain on every seed and gap closed (few-label rows against
    few_baseline, the others against baseline), then the goal lines."""
    res = {row: v[split] for row, v in results.items() if split in v}
    mean = statistics.mean
    lines = ["| row | mAP50-95 mean ± std | per seed | gain on every seed | gap closed |", "|---|---:|---|---|---:|"]
    t = res.get("teacher", [None])[0]
    for row, v in res.items():
        ref = res.get("few_baseline" if row in FEW_ROWS else "baseline", [])
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        gain = "" if row in ("teacher", "baseline", "few_baseline") or len(ref) != len(v) else \
            ("yes" if all(x > y for x, y in zip(v, ref)) else "no")
        gap = ""
        if t is not None and ref and row != "teacher" and t > mean(ref) and v is not ref:
            gap = f"{(mean(v) - mean(ref)) / (t - mean(ref)) * 100:.0f}%"
        lines.append(f"| {row} | {mean(v):.2f} ± {sd:.2f} | {' / '.join(f'{x:.2f}' for x in v)} | {gain} | {gap} |")
    if "detkd" in res and "ultralytics" in res:
        d = mean(res["detkd"]) - mean(res["ultralytics"])
        lines.append(f"\ndetkd - Ultralytics' distill_model: {d:+.2f} mAP50-95 (goal >= +1.0)")
    if "detkd" in res and "baseline_2x" in res:
        d = mean(res["detkd"]) - mean(res["baseline_2x"])
        lines.append(f"detkd at {b.student_epochs} epochs - baseline at {2 * b.student_epochs}: {d:+.2f} "
                     f"(>= 0: distillation halves the bill)")
    few = [r for r in ("few_hard", "few_soft", "few_both") if r in res]
    if few and "few_baseline" in res:
        best = max(few, key=lambda r: mean(res[r]))
        fb = mean(res["few_baseline"])
        txt = f"few labels: best distilled row {best} {mean(res[best]):.2f}"
        if "baseline" in res:
            txt += f" vs the 100%-labels student {mean(res['baseline']):.2f} (goal: reach it)"
        if t is not None and t > fb:
            txt += f"; closes {(mean(res[best]) - fb) / (t - fb) * 100:.0f}% of the few_baseline-teacher gap (goal >= 60%)"
        lines.append(txt)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="bench")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS)
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the generated data (other variants: 1, 2, ...)")
    ap.add_argument("--out", default="runs/kd_benchmark")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--jobs", type=int, default=None,
                    help="stages trained at once, each in its own process (default: 2 on a CPU with >= 2 cores, else 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per stage (default: cores / jobs)")
    ap.add_argument("--no-eval", action="store_true", help="train only (evaluate in a later run)")
    ap.add_argument("--no-train", action="store_true",
                    help="evaluate and tabulate the stages that have finished, train nothing (safe while another "
                         "command trains the rest into the same --out)")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    a.jobs = a.jobs or (2 if a.device == "cpu" and cores >= 2 else 1)
    a.threads = a.threads or max(1, cores // a.jobs)
    from detkd.eval.run import evaluate_model

    b = budget(a.budget, a.device)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    say("kd_benchmark", f"budget '{a.budget}': teacher {Path(b.teacher).stem} {b.teacher_epochs} ep, students "
                        f"{Path(b.student).stem} {b.student_epochs} ep, {b.n_train} frames at {b.imgsz} px, seeds "
                        f"{a.seeds}, rows {a.rows}, {a.jobs} stage(s) at once x {a.threads} thread(s), device {a.device}")
    data_yaml = make_data(out / "data", b, a.data_seed, "kd_benchmark")
    _FEW_CTX.update(out=out, data=data_yaml)
    stages = stages_for(a.rows, a.seeds, b)
    runner = StageRunner(out, data_yaml, b, a.threads, stages, "kd_benchmark", jobs=a.jobs)
    if a.no_train:  # e.g. a table of the seeds done so far while another command trains the rest
        weights = runner.finished_stages()
        left = [s.name for s in stages if s.name not in weights]
        if left:
            say("kd_benchmark", f"--no-train: {len(left)} stage(s) not finished, left out of the table: {' '.join(left)}")
        stages = [s for s in stages if s.name in weights]
    else:
        weights = runner.run()
    if a.no_eval:
        return
    splits = [b.report_split] + (["test_ood"] if b.ood_cameras else [])
    cache = out / "eval" / "cache.json"  # evaluations are stages too: reused while the weights are unchanged
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    results: dict[str, dict[str, list[float]]] = {}
    for st in stages:
        row = st.name.rsplit("_s", 1)[0] if st.name != "teacher" else "teacher"
        for split in splits:
            key = f"{st.name}/{split}/{weights[st.name].stat().st_mtime_ns}"
            if key not in done:
                m = evaluate_model(weights[st.name], data_yaml, split=split, imgsz=b.imgsz,
                                   out_dir=out / "eval" / split / st.name, threads=a.threads, progress=False, voc=False)
                done[key] = m["AP"] * 100
                cache.write_text(json.dumps(done, indent=1))
            results.setdefault(row, {}).setdefault(split, []).append(done[key])
    curves = {st.name: _map_curve(out / "runs" / st.name / "results.csv") for st in stages}
    (out / "curves.json").write_text(json.dumps(curves, indent=1))
    lines = [f"# kd_benchmark: budget {a.budget} ({Path(b.student).stem} <- {Path(b.teacher).stem}, students "
             f"{b.student_epochs} epochs, teacher {b.teacher_epochs}, imgsz {b.imgsz}, {b.n_train} train frames, data "
             f"seed {a.data_seed}), training seeds {a.seeds}, {a.threads} threads"]
    for split in splits:
        lines += ["", f"## {split} split" + (" (cameras never seen in training)" if split == "test_ood" else ""), ""]
        lines += table(results, split, a.seeds, b)
    lines += ["", "## val mAP50-95 per epoch (learning curves; seed 0)", ""]
    for name, c in curves.items():
        if name == "teacher" or name.endswith("_s0"):
            lines.append(f"- {name}: " + " ".join(f"{x:.1f}" for x in c) + f"  ({plateau_text(c)})")
    text = "\n".join(lines)
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _report(out, stages, weights, b, splits[0])


def _report(out: Path, stages, weights, b, split: str) -> None:
    """detkd reports for seed 0 (learning curves, per-class AP): ``report/`` for teacher / baseline / detkd /
    baseline_2x / Ultralytics, ``report_few/`` for the few-label rows (the 10%-labels student as the baseline, the
    first of few_both / few_soft / few_hard as the distilled one, the 100%-labels student beside them)."""
    from detkd.report.report import ModelEntry, build_report

    names = {s.name for s in stages}
    dist_few = next((r for r in ("few_both_s0", "few_soft_s0", "few_hard_s0") if r in names), None)
    reports = {
        "report": ("kd_benchmark (seed 0)", {"teacher": "teacher", "baseline_s0": "baseline", "detkd_s0": "distilled",
                                             "baseline_2x_s0": "other", "ultralytics_s0": "other"}),
        "report_few": ("kd_benchmark, few labels: 10% labeled + 90% unlabeled footage (seed 0)",
                       {"teacher": "teacher", "few_baseline_s0": "baseline", "few_hard_s0": "other",
                        "few_soft_s0": "other", "baseline_s0": "other"}),
    }
    reports["report_few"][1][dist_few] = "distilled"
    for folder, (title, roles) in reports.items():
        if folder == "report_few" and "few_baseline_s0" not in names:
            continue
        entries = [ModelEntry(role=roles[s.name], name=s.name,
                              metrics=str(out / "eval" / split / s.name / "metrics.json"), weights=str(weights[s.name]),
                              results_csv=str(out / "runs" / s.name / "results.csv"))
                   for s in stages if s.name in roles]
        if len(entries) >= 2 and any(e.role == "baseline" for e in entries):
            p = build_report(entries, out / folder, title=title, split=split, dataset=f"built-in security-camera "
                             f"data, {b.n_train} train frames, {b.imgsz} px; '{split}' split")
            say("kd_benchmark", f"report: {p.get('html')}")


if __name__ == "__main__":
    main()
