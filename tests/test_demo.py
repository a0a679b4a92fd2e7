"""`detkd demo --quick` end to end: data, three trainings, evaluation, report, headline (a few minutes)."""

import json
import os
import subprocess
import sys

import pytest


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "detkd", "demo", "--quick", "--out", str(out), "--threads", "2"],
                       capture_output=True, text=True, timeout=1500, env={**os.environ, "YOLO_VERBOSE": "True"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "student mAP50-95" in r.stdout and "gap closed" in r.stdout and "CPU latency" in r.stdout
    # --quick says, in the terminal and the report's headline, that its numbers mean nothing
    assert "SMOKE TEST" in r.stdout and "mean nothing" in r.stdout
    rep = json.loads((out / "report" / "report.json").read_text())
    assert rep["headline"]["text"].startswith("SMOKE TEST") and rep["headline"]["smoke"] is True
    # learning curves of teacher, baseline and distilled on one plot, with the gap per epoch
    lc = next(f for f in rep["plots"] if f["key"] == "learning_curves")
    assert (out / "report" / lc["file"]).is_file() and "gap" in lc["caption"]
    # a stage line with an ETA per training stage (teacher, baseline, distilled + the two few-label students)
    assert r.stdout.count("[detkd demo] stage ") == 5 and "ETA" in r.stdout
    # 2 threads: teacher and baseline train side by side (1 thread each, output in runs/<stage>.log); the students
    # that need the teacher (distilled; the pseudo-labelled one) start once it has finished
    lines = r.stdout.splitlines()
    at = {k: next(i for i, x in enumerate(lines) if k in x) for k in
          ("stage 1/5 teacher", "stage 2/5 baseline", "teacher finished", "stage 4/5 distilled",
           "stage 5/5 few_pseudo", "pseudo-labelling the unlabeled 90%")}
    assert at["stage 1/5 teacher"] < at["stage 2/5 baseline"] < at["teacher finished"] < at["stage 4/5 distilled"]
    assert at["teacher finished"] < at["stage 5/5 few_pseudo"] < at["pseudo-labelling the unlabeled 90%"]
    assert "1 threads" in lines[at["stage 1/5 teacher"]]
    # a core that no stage is left to use evaluates the stages finished so far while the last one trains
    early = [x for x in lines if "while the last training runs" in x]
    last_finish = max(i for i, x in enumerate(lines) if x.endswith("so far)") and " finished (" in x)
    assert early and all(lines.index(x) < last_finish for x in early)
    roles = ("teacher", "baseline", "distilled", "few_baseline", "few_pseudo")
    for role in roles:
        assert "mAP50-95" in (out / "runs" / f"{role}.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"] == "test" and set(summary["ood_AP"]) == set(roles)
    # few labels: 6 of the 64 train frames keep their labels (listed 10x), the other 58 get the teacher's labels
    few = out / "few"
    labeled = (few / "labeled_1.txt").read_text().split()
    assert len(labeled) == 6 and (few / "labeled_x.txt").read_text().split() == labeled * 10
    (pseudo,) = few.glob("pseudo_*")  # one folder per teacher checkpoint
    man = json.loads((pseudo / "pseudo_manifest.json").read_text())
    assert man["counts"]["pseudo"] == 58 and man["counts"]["real"] == 6
    assert man["teacher"]["path"] == str(out / "runs" / "teacher" / "weights" / "best.pt")
    ap = {r: summary["metrics"][r]["AP"] * 100 for r in ("few_baseline", "few_pseudo", "baseline")}
    assert (f"few labels (10% of the train frames labeled, the rest unlabeled footage): student "
            f"{ap['few_baseline']:.1f} -> {ap['few_pseudo']:.1f}") in r.stdout
    assert f"the student with all labels {ap['baseline']:.1f}" in rep["headline"]["text"]
    assert {"10% labels only (yolov8-femto)", "10% labels + teacher pseudo-labels (yolov8-femto)"} <= \
        {x["name"] for x in rep["models"]}
    for role in roles:
        assert (out / "runs" / role / "weights" / "best.pt").is_file()
        m = json.loads((out / "eval" / role / "metrics.json").read_text())
        assert 0.0 <= m["AP"] <= 1.0 and "per_class" in m
    for role in ("teacher", "baseline", "distilled"):  # the CPU bench times these three
        assert summary["info"][role]["latency_ms"]["p50"] > 0
    cols = (out / "runs" / "distilled" / "results.csv").read_text().splitlines()[0]
    assert "kd_cls" in cols and "kd_box" in cols and "kd_feat" in cols
    html = (out / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    assert (out / "report" / "report.md").is_file() and (out / "report" / "report.json").is_file()
    bench = json.loads((out / "bench" / "bench.json").read_text())
    kinds = {(r["model"], r["engine"], r["precision"]) for r in bench["rows"]}
    assert kinds == {(m, e, p) for m in ("teacher", "baseline student", "distilled student")
                     for e, p in (("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))}
    assert all("mAP50_95" in r for r in bench["rows"])
    assert "CPU deployment" in html and "INT8" in html
    assert summary["info"]["distilled"]["latency_ms"]["p50"] == next(
        r["latency_ms"]["p50"] for r in bench["rows"] if r["model"] == "distilled student" and r["engine"] == "pytorch")
    # the baseline is timed in the same round-robin bench, so baseline vs distilled (same architecture) compare
    assert summary["info"]["baseline"]["latency_ms"]["p50"] == next(
        r["latency_ms"]["p50"] for r in bench["rows"] if r["model"] == "baseline student" and r["engine"] == "pytorch")
    assert bench["noise"]["verdict"] in ("quiet", "noisy")


def test_interrupted_stage_is_not_reused(tmp_path):
    """A stage is reused only when its results.csv logged every epoch (an interrupted run trains again)."""
    from detkd.benchmark import finished as _finished

    csv = tmp_path / "results.csv"
    assert not _finished(csv, 2)
    csv.write_text("epoch,loss\n1,0.5\n")
    assert not _finished(csv, 2)
    csv.write_text("epoch,loss\n1,0.5\n2,0.4\n\n")
    assert _finished(csv, 2)


def test_parallel_stage_failure_names_the_stage_and_its_log(tmp_path):
    """With jobs > 1 a stage that fails in its worker process stops the run with its name and its log file."""
    import pytest

    from detkd.benchmark import BUDGETS, Stage, StageRunner

    b = BUDGETS["quick"]
    stages = [Stage("broken", "student", str(tmp_path / "missing.yaml"), 1)]
    with pytest.raises(RuntimeError, match=r"stage broken failed.*broken\.log"):
        StageRunner(tmp_path, tmp_path / "data.yaml", b, 1, stages, "t", jobs=2).run()
    assert (tmp_path / "runs" / "broken.log").is_file()
    # a stage whose teacher stage is not in the run is refused before anything trains
    with pytest.raises(ValueError, match="teacher stage 'teacher' is not in this run"):
        StageRunner(tmp_path, tmp_path / "data.yaml", b, 1, [Stage("kd", "distilled", "x.yaml", 1, teacher_from="teacher")],
                    "t", jobs=2).run()


def test_interrupted_stages_resume_from_last_pt(tmp_path, capsys):
    """A stage killed after an epoch continues from its last.pt (plain, detkd and Ultralytics' distill_model) and
    ends with every epoch logged once; a last.pt that cannot be resumed is trained again from the start."""
    from dataclasses import replace

    import yaml
    from ultralytics.utils import callbacks

    from detkd.assets import FEMTO_YAML
    from detkd.benchmark import BUDGETS, train_run
    from helpers import StopTraining, rect_dataset, stop_after_first_save, untrained_checkpoint

    data = rect_dataset(tmp_path / "data", 64, n_train=8, n_val=4)
    b = replace(BUDGETS["quick"], imgsz=64, batch=4)
    teacher = untrained_checkpoint(tmp_path / "t.pt", {0: "red", 1: "green", 2: "blue"})
    kd_yaml = tmp_path / "kd.yaml"
    kd_yaml.write_text(yaml.safe_dump({"teacher": str(teacher), "distill": b.distill}))

    runs = tmp_path / "runs"
    for name, kw in (("plain", {}), ("kd", {"distill_yaml": kd_yaml}), ("ul", {"ultralytics_teacher": teacher})):
        callbacks.default_callbacks["on_model_save"].append(stop_after_first_save)
        try:
            with pytest.raises(StopTraining):
                train_run(str(FEMTO_YAML), data, runs, name, 2, b, 1, 0, **kw)
        finally:
            callbacks.default_callbacks["on_model_save"].remove(stop_after_first_save)
        csv = runs / name / "results.csv"
        first = csv.read_text().splitlines()
        assert len(first) == 2  # header + epoch 1
        capsys.readouterr()
        best = train_run(str(FEMTO_YAML), data, runs, name, 2, b, 1, 0, **kw)
        assert f"{name}: resuming after epoch 1 of 2" in capsys.readouterr().out
        lines = csv.read_text().splitlines()
        assert lines[:2] == first, name  # epoch 1 kept as logged (a retrain would rewrite it, time included)
        assert [r.split(",")[0].strip() for r in lines[1:]] == ["1", "2"] and best.is_file()
    # a last.pt cut short by the kill: the stage starts again instead of failing
    (runs / "plain" / "results.csv").write_text("epoch,time\n1,1.0\n")
    (runs / "plain" / "weights" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    capsys.readouterr()
    best = train_run(str(FEMTO_YAML), data, runs, "plain", 2, b, 1, 0)
    assert "plain: could not resume" in capsys.readouterr().out
    rows = [r.split(",")[0].strip() for r in (runs / "plain" / "results.csv").read_text().splitlines()[1:]]
    assert rows == ["1", "2"] and best.is_file()


def test_benchmark_stages_that_need_the_teacher_wait_for_it(tmp_path):
    """With stages in parallel, every stage that uses the teacher (KD rows, and few_hard, whose data are the
    teacher's pseudo-labels) names the teacher stage, so it starts only once the teacher has finished."""
    import importlib.util
    from pathlib import Path

    from detkd.benchmark import BUDGETS
    from helpers import rect_dataset

    spec = importlib.util.spec_from_file_location("kd_benchmark",
                                                  Path(__file__).resolve().parents[1] / "tools" / "kd_benchmark.py")
    kb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kb)
    data = rect_dataset(tmp_path / "data", 32, n_train=10, n_val=2)
    kb._FEW_CTX.update(out=tmp_path, data=data)
    rows = ["teacher", "baseline", "detkd", "ultralytics", "baseline_2x", *kb.FEW_ROWS]
    stages = {s.name: s for s in kb.stages_for(rows, [0], BUDGETS["quick"])}
    uses_teacher = {"detkd_s0", "ultralytics_s0", "few_hard_s0", "few_soft_s0", "few_both_s0"}
    assert {n for n, s in stages.items() if s.teacher_from == "teacher"} == uses_teacher


def test_progress_lists_the_stages_of_every_run_on_the_folder(tmp_path):
    """Two benchmark commands on one output folder (different rows): progress.json keeps the other run's stages,
    with their state on disk, instead of listing only the last writer's."""
    from detkd.benchmark import BUDGETS, Stage, StageRunner

    b = BUDGETS["quick"]
    a = StageRunner(tmp_path, tmp_path / "data.yaml", b, 1, [Stage("detkd_s0", "distilled", "x.yaml", 3)], "t")
    a._write_progress()
    run = tmp_path / "runs" / "detkd_s0"  # the first run's stage finishes while the second run writes
    (run / "weights").mkdir(parents=True)
    (run / "weights" / "best.pt").write_bytes(b"x")
    (run / "results.csv").write_text("epoch,time\n1,1.0\n2,2.0\n3,3.5\n")
    other = StageRunner(tmp_path, tmp_path / "data.yaml", b, 1, [Stage("ultralytics_s0", "ultralytics", "x.yaml", 3)],
                        "t")
    other._write_progress()
    state = json.loads((tmp_path / "progress.json").read_text())
    assert set(state) == {"detkd_s0", "ultralytics_s0"}
    assert state["detkd_s0"]["done"] is True and state["detkd_s0"]["seconds"] == 3.5
    assert state["ultralytics_s0"]["done"] is False


def test_finished_stages_trains_nothing(tmp_path):
    """`kd_benchmark.py --no-train` (a table while another command trains into the same folder): only stages that
    logged every epoch are returned; an unfinished one is neither trained nor resumed (its files stay as they are)."""
    from detkd.benchmark import BUDGETS, Stage, StageRunner

    for name, rows in (("done_s0", 3), ("half_s0", 2)):
        run = tmp_path / "runs" / name
        (run / "weights").mkdir(parents=True)
        (run / "weights" / "best.pt").write_bytes(b"x")
        (run / "weights" / "last.pt").write_bytes(b"y")
        (run / "results.csv").write_text("epoch,time\n" + "".join(f"{e},{e}.0\n" for e in range(1, rows + 1)))
    stages = [Stage("done_s0", "student", "missing.yaml", 3), Stage("half_s0", "distilled", "missing.yaml", 3)]
    w = StageRunner(tmp_path, tmp_path / "data.yaml", BUDGETS["quick"], 1, stages, "t").finished_stages()
    assert w == {"done_s0": tmp_path / "runs" / "done_s0" / "weights" / "best.pt"}
    half = tmp_path / "runs" / "half_s0"
    assert (half / "results.csv").read_text() == "epoch,time\n1,1.0\n2,2.0\n"
    assert (half / "weights" / "last.pt").read_bytes() == b"y"


def test_pseudo_label_data_never_rewrites_a_folder_in_use(tmp_path):
    """The few-label stages' pseudo-labels live in one folder per teacher checkpoint: the same teacher reuses its
    folder, a retrained teacher writes a new one, and the first folder (which a running stage may be reading) keeps
    its files. (Relabelling in place deleted the images under a stage that was training on them.)"""
    import os
    from types import SimpleNamespace

    from detkd.benchmark import BUDGETS, pseudo_label_data
    from helpers import rect_dataset, untrained_checkpoint

    data = rect_dataset(tmp_path / "data", 32, n_train=10, n_val=2)
    teacher = untrained_checkpoint(tmp_path / "t.pt", {0: "red", 1: "green", 2: "blue"}, cfg="yolov8n.yaml")
    runner = SimpleNamespace(weights={"teacher": teacher})
    make = pseudo_label_data(tmp_path / "out", data, BUDGETS["quick"], "t")
    first = make(runner)
    files = sorted(p.name for p in (first.parent / "images" / "train").iterdir())
    assert len(files) == 10 and make(runner) == first  # the same teacher: reused
    st = teacher.stat()
    os.utime(teacher, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "retrained"
    second = make(runner)
    assert second.parent != first.parent and second.is_file()
    assert sorted(p.name for p in (first.parent / "images" / "train").iterdir()) == files


def test_few_label_split_follows_the_seed(tmp_path):
    """`detkd demo --seed 1` into a folder that holds seed 0's run gets seed 1's labeled frames, not the old list."""
    from detkd.benchmark import few_label_split
    from helpers import rect_dataset

    data = rect_dataset(tmp_path / "data", 32, n_train=20, n_val=2)
    out = tmp_path / "out"
    a = few_label_split(out, data, seed=0)["unique"]
    first = (out / "few" / "labeled_1.txt").read_text()
    assert len(first.split()) == 2 and few_label_split(out, data, seed=0)["unique"] == a
    assert (out / "few" / "labeled_1.txt").read_text() == first
    few_label_split(out, data, seed=1)
    second = (out / "few" / "labeled_1.txt").read_text()
    # the pseudo-labelled set of seed 1 merges seed 1's labeled frames (and leaves the split as it is)
    from pathlib import Path
    from types import SimpleNamespace

    from detkd.benchmark import BUDGETS, pseudo_label_data
    from helpers import untrained_checkpoint

    t = untrained_checkpoint(tmp_path / "t.pt", {0: "red", 1: "green", 2: "blue"})
    ds = pseudo_label_data(out, data, BUDGETS["quick"], "t", seed=1)(SimpleNamespace(weights={"teacher": t}))
    assert (out / "few" / "labeled_1.txt").read_text() == second
    man = json.loads((ds.parent / "pseudo_manifest.json").read_text())
    real = {Path(e["source"]).name for e in man["images"] if not e["pseudo"]}
    assert real == {Path(x).name for x in second.split()}
    assert second != first and len(second.split()) == 2
    unl = (out / "few" / "unlabeled.txt").read_text().split()
    assert len(unl) == 18 and not set(unl) & set(second.split())
