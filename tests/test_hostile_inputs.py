"""Hostile inputs and failures (issue 14, section 5): each gives one clear line, never a raw traceback, never
silent nonsense. Garbage checkpoints, non-detection students, resuming a finished run, a full disk, list-shaped
report specs, duplicate bench names, NaN / inf / tiny-temperature configs, two runs in one folder, a NaN step.

Tiny models on 64 px rectangles: each training here is one or two epochs of two batches.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

ensure_ultralytics_offline()

from ultralytics import YOLO  # noqa: E402

from detkd import cli  # noqa: E402
from detkd.assets import PICO_YAML  # noqa: E402
from detkd.errors import ConfigError, DetkdError  # noqa: E402
from detkd.integrations import ultralytics as ul  # noqa: E402
from helpers import rect_dataset, train_tiny_teacher  # noqa: E402

IMGSZ = 64


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    return rect_dataset(tmp_path_factory.mktemp("rects"), IMGSZ)


@pytest.fixture(scope="module")
def teacher_pt(data_yaml, tmp_path_factory) -> Path:
    return Path(train_tiny_teacher(data_yaml, tmp_path_factory.mktemp("teacher"), IMGSZ).last)


def _cfg(tmp_path: Path, teacher_pt: Path, data_yaml: Path, **over) -> Path:
    cfg = {"teacher": str(teacher_pt), "student": str(PICO_YAML), "data": str(data_yaml), "epochs": 1,
           "imgsz": IMGSZ, "batch": 8, "device": "cpu", "workers": 0, "project": str(tmp_path / "runs"),
           "name": "run", "plots": False, "amp": False, "seed": 0, **over}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _one_error_line(err: str, verb: str) -> str:
    assert "Traceback" not in err, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"detkd {verb}: error: "), err[-2000:]
    return line


def _train_kd(tmp_path, teacher_pt, data_yaml, name="kd", callbacks=(), **kw):
    kd = tmp_path / "kd.yaml"
    kd.write_text(yaml.safe_dump({"teacher": str(teacher_pt)}))
    m = YOLO(str(PICO_YAML))
    for event, fn in callbacks:
        m.add_callback(event, fn)
    args = dict(data=str(data_yaml), epochs=1, imgsz=IMGSZ, batch=8, device="cpu", workers=0,
                trainer=ul.DistillTrainer, distill_model=str(kd), project=str(tmp_path / "runs"), name=name,
                plots=False, verbose=False, seed=0, amp=False)
    m.train(**{**args, **kw})
    return m


# ------------------------------------------------------------------------------------------------------------------
# 1. garbage checkpoints; unexpected exceptions
# ------------------------------------------------------------------------------------------------------------------
def test_garbage_pt_in_train_and_eval_is_one_line(teacher_pt, data_yaml, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    cfg = _cfg(tmp_path, teacher_pt, data_yaml)
    for argv, verb in ((["train", cfg, f"student={garbage}"], "train"),
                       (["eval", garbage, "--data", data_yaml, "--out", tmp_path / "ev"], "eval")):
        r = subprocess.run([sys.executable, "-m", "detkd", *map(str, argv)], capture_output=True, text=True,
                           timeout=300, env={**os.environ})
        assert r.returncode == 2, r.stderr[-2000:]
        assert str(garbage) in _one_error_line(r.stderr, verb)
    assert not (tmp_path / "runs").exists()
    # a real torch.save file that is no Ultralytics model: refused as the student, before any run folder
    not_model = tmp_path / "dict.pt"
    torch.save({"a": 1}, not_model)
    rc, err = _cli(capsys, "train", cfg, f"student={not_model}")
    assert rc == 2 and f"student: {not_model} could not be loaded" in _one_error_line(err, "train")
    assert not (tmp_path / "runs").exists()


def test_unexpected_exception_one_line_and_debug_traceback(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(cli, "_cmd_doctor", boom)
    monkeypatch.delenv("DETKD_DEBUG", raising=False)
    rc, err = _cli(capsys, "doctor")
    assert rc == 1
    assert err.strip() == ("detkd doctor: error: unexpected RuntimeError: something broke second line "
                           "(rerun with DETKD_DEBUG=1 for the traceback)")
    monkeypatch.setenv("DETKD_DEBUG", "1")
    rc, err = _cli(capsys, "doctor")
    assert rc == 1 and "Traceback" in err and "RuntimeError: something broke" in err
    assert err.strip().splitlines()[-1] == "detkd doctor: error: unexpected RuntimeError: something broke second line"


# ------------------------------------------------------------------------------------------------------------------
# 2. non-detection students
# ------------------------------------------------------------------------------------------------------------------
def test_segmentation_student_refused_before_training(teacher_pt, data_yaml, tmp_path, capsys):
    cfg = _cfg(tmp_path, teacher_pt, data_yaml)
    rc, err = _cli(capsys, "train", cfg, "student=yolov8n-seg.yaml")
    line = _one_error_line(err, "train")
    assert rc == 2 and "yolov8n-seg.yaml is a segment model (Segment head)" in line and "yolov8n.yaml" in line
    assert not (tmp_path / "runs").exists()
    # Python API: refused at get_model, before the first batch
    kd = tmp_path / "kd.yaml"
    kd.write_text(yaml.safe_dump({"teacher": str(teacher_pt)}))
    with pytest.raises(ConfigError, match="segment model"):
        YOLO("yolov8n-seg.yaml").train(data=str(data_yaml), epochs=1, imgsz=IMGSZ, batch=8, device="cpu", workers=0,
                                       trainer=ul.DistillTrainer, distill_model=str(kd), project=str(tmp_path / "py"),
                                       name="seg", plots=False, verbose=False, amp=False)
    assert not list((tmp_path / "py").rglob("results.csv"))


# ------------------------------------------------------------------------------------------------------------------
# 3. resume
# ------------------------------------------------------------------------------------------------------------------
def test_resume_finished_run_refused_and_resume_true_resumes_named_run(teacher_pt, data_yaml, tmp_path, capsys):
    cfg = _cfg(tmp_path, teacher_pt, data_yaml, name="done")
    assert cli.main(["train", str(cfg)]) == 0
    runs = tmp_path / "runs"
    last = runs / "done" / "weights" / "last.pt"
    before = sorted(p.name for p in runs.iterdir())
    capsys.readouterr()
    for over in (f"resume={last}", "resume=True"):
        rc, err = _cli(capsys, "train", cfg, over)
        line = _one_error_line(err, "train")
        assert rc == 2 and f"run {runs / 'done'} already finished 1 epoch;" in line, line
        assert f"student={last} epochs=" in line
        assert sorted(p.name for p in runs.iterdir()) == before  # no empty run folder left behind
    # Python API: DistillTrainer refuses a finished checkpoint before making a folder
    with pytest.raises(ConfigError, match="already finished"):
        YOLO(str(last)).train(resume=str(last), trainer=ul.DistillTrainer)
    assert sorted(p.name for p in runs.iterdir()) == before
    # resume=True where there is no run
    rc, err = _cli(capsys, "train", cfg, "resume=True", "name=nothing")
    assert rc == 2 and "resume=True: nothing to resume in" in _one_error_line(err, "train")
    assert sorted(p.name for p in runs.iterdir()) == before

    # resume=True with a config resumes the run it names (project/name), not a new run from scratch
    class Stop(Exception):
        pass

    def stop(trainer):
        if trainer.epoch == 0:
            raise Stop

    from detkd.train import load_train_config, train

    with pytest.raises(Stop):
        train(load_train_config(cfg, ["name=part", "epochs=2"]), callbacks={"on_model_save": stop})
    capsys.readouterr()
    assert cli.main(["train", str(cfg), "name=part", "epochs=2", "resume=True"]) == 0
    out = capsys.readouterr().out
    assert f"detkd train: resuming {runs / 'part'} from {runs / 'part' / 'weights' / 'last.pt'}: epoch 2 of 2" in out
    assert sorted(p.name for p in runs.iterdir()) == sorted([*before, "part"])
    rows = (runs / "part" / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + epochs 1 and 2, in the same folder


# ------------------------------------------------------------------------------------------------------------------
# 4. full disk
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["torch_save", "partial_write", "final_strip"])
def test_full_disk_keeps_last_good_checkpoint(teacher_pt, data_yaml, tmp_path, monkeypatch, where):
    full = {"on": False}
    real_save, real_write = torch.save, Path.write_bytes

    def save(obj, f, *a, **k):
        if full["on"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    def write_bytes(self, data):
        if full["on"] and self.name == "last.pt.tmp":
            real_write(self, data[: len(data) // 2])  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    if where == "partial_write":
        monkeypatch.setattr(Path, "write_bytes", write_bytes)
    else:
        monkeypatch.setattr(torch, "save", save)

    def fill(trainer):  # the disk fills after epoch 1 was saved
        full["on"] = True

    event = "on_fit_epoch_end" if where == "final_strip" else "on_train_epoch_end"
    epochs = 1 if where == "final_strip" else 2
    cb = (event, fill) if where == "final_strip" else (event, lambda t: t.epoch == 1 and fill(t))
    with pytest.raises(DetkdError) as e:
        _train_kd(tmp_path, teacher_pt, data_yaml, callbacks=[cb], epochs=epochs)
    wdir = tmp_path / "runs" / "kd" / "weights"
    last = wdir / "last.pt"
    written = {"torch_save": wdir / "last.kd.pt", "partial_write": last, "final_strip": last}[where]
    assert str(e.value) == (f"no space left on device writing {written}; last good checkpoint: {last} (epoch 1); "
                            f"free some space, then resume with resume={last}")
    assert isinstance(e.value, OSError)
    assert not list(wdir.glob("*.tmp")), list(wdir.iterdir())
    monkeypatch.undo()
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["optimizer"] is not None  # epoch 1's checkpoint, intact and resumable
    assert torch.load(wdir / "last.kd.pt", weights_only=True)["epoch"] == 0  # consistent with last.pt
    if where != "final_strip":
        ul.check_resumable(last)  # resumable: no ConfigError


# ------------------------------------------------------------------------------------------------------------------
# 5. report spec shape
# ------------------------------------------------------------------------------------------------------------------
def test_report_spec_plain_list_names_expected_format(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("- {role: teacher, name: t, metrics: t.json}\n- {role: distilled, name: s, metrics: s.json}\n")
    rc, err = _cli(capsys, "report", spec)
    line = _one_error_line(err, "report")
    assert rc == 2 and "plain YAML list" in line and "'models:'" in line
    spec.write_text("models: [t.json]\n")
    rc, err = _cli(capsys, "report", spec)
    assert rc == 2 and "models[0] is str 't.json'" in _one_error_line(err, "report")


# ------------------------------------------------------------------------------------------------------------------
# 6. bench names
# ------------------------------------------------------------------------------------------------------------------
def test_bench_names_from_run_folders(tmp_path):
    from detkd.bench.run import bench, default_names

    assert default_names(["a/best.pt", "b/best.pt"]) == ["a", "b"]
    assert default_names(["runs/teacher/weights/best.pt", "runs/student/weights/best.pt"]) == ["teacher", "student"]
    assert default_names(["x/t/weights/best.pt", "y/t/weights/best.pt"]) == ["x/t/best", "y/t/best"]
    assert default_names(["t/weights/best.pt", "t/weights/last.pt"]) == ["best", "last"]
    y = YOLO(str(PICO_YAML))
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        y.save(tmp_path / run / "best.pt")
    paths = [tmp_path / "a" / "best.pt", tmp_path / "b" / "best.pt"]
    res = bench(paths, imgsz=32, threads=1, runs=1, warmup=0, engines=["pytorch"], isolate=False, progress=False)
    assert [r["model"] for r in res["rows"]] == ["a", "b"]
    with pytest.raises(ConfigError, match=r"give the same name \(a file is listed twice\); pass display names with "
                                          r"--names"):
        bench([paths[0], paths[0]], engines=["pytorch"])


# ------------------------------------------------------------------------------------------------------------------
# 7. numbers in configs
# ------------------------------------------------------------------------------------------------------------------
def test_config_numbers_nonfinite_numeric_strings_tiny_temperature(tmp_path):
    from detkd.config import DistillConfig, load_config
    from detkd.train import _check_numbers

    for bad, msg in [({"logits": {"weight": float("nan")}}, "distill.logits.weight: must be a finite number, got nan"),
                     ({"boxes": {"weight": float("inf")}}, "distill.boxes.weight: must be a finite number, got inf"),
                     ({"task_weight": "nan"}, "distill.task_weight: must be a finite number, got 'nan'"),
                     ({"logits": {"temperature": 1e-9}}, "distill.logits.temperature: temperature 1e-09 is too small"),
                     ({"features": [{"student": "a", "teacher": "b", "options": {"tau": 1e-9}}]},
                      "distill.features[0].options.tau: temperature 1e-09 is too small"),
                     ({"logits": {"temperature_schedule": {"kind": "linear", "start": 4, "end": 0.0001}}},
                      "distill.logits.temperature_schedule.end: temperature 0.0001 is too small")]:
        with pytest.raises(ConfigError) as e:
            DistillConfig.from_dict(bad)
        assert str(e.value).startswith(msg), str(e.value)
    # YAML 1.1 reads 1e30 / 1e-3 (no dot) as strings: accepted as numbers
    p = tmp_path / "kd.yaml"
    p.write_text("distill:\n  logits: {weight: 1e30, temperature: 2e0}\n  task_weight: 1e-3\n"
                 "  features: [{student: a, teacher: b, method: fgd, options: {temp: 5e-1}}]\n")
    c = load_config(p)
    assert c.logits.weight == 1e30 and c.logits.temperature == 2.0 and c.task_weight == 1e-3
    assert c.features[0].options["temp"] == 0.5
    p.write_text("distill:\n  logits: {weight: .nan}\n")
    with pytest.raises(ConfigError, match=r"kd.yaml: distill.logits.weight: must be a finite number, got nan"):
        load_config(p)
    # top-level (Ultralytics) numbers from overrides or YAML
    cfg = {"lr0": "1e-3", "epochs": 2}
    _check_numbers(cfg, "c.yaml")
    assert cfg["lr0"] == 1e-3
    for bad in ({"lr0": float("inf")}, {"lr0": "nan"}):
        with pytest.raises(ConfigError, match="c.yaml: lr0: must be a finite number"):
            _check_numbers(bad, "c.yaml")
    with pytest.raises(ConfigError, match="c.yaml: 'lr0=abc' is of invalid type str"):
        _check_numbers({"lr0": "abc"}, "c.yaml")


# ------------------------------------------------------------------------------------------------------------------
# 8. one run per folder
# ------------------------------------------------------------------------------------------------------------------
def test_second_run_into_a_folder_in_use_is_refused(teacher_pt, data_yaml, tmp_path):
    run = tmp_path / "runs" / "busy"
    run.mkdir(parents=True)
    (run / "results.csv").write_text("epoch\n1\n")
    (run / "args.yaml").write_text("theirs: true\n")
    code = ("import sys, time; from detkd.integrations.ultralytics import lock_run_dir; "
            f"f = lock_run_dir({str(run)!r}); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"run folder {run} is in use by another training run \(pid "
                                              rf"{holder.pid}\)"):
            _train_kd(tmp_path, teacher_pt, data_yaml, name="busy", exist_ok=True)
        assert (run / "results.csv").read_text() == "epoch\n1\n" and (run / "args.yaml").read_text() == "theirs: true\n"
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock went with it, and the folder can be trained into
    m = _train_kd(tmp_path, teacher_pt, data_yaml, name="busy", exist_ok=True)
    assert Path(m.trainer.save_dir) == run and (run / "weights" / "last.pt").is_file()
    f = ul.lock_run_dir(run)  # released at the end of training
    f.close()


# ------------------------------------------------------------------------------------------------------------------
# 9. a NaN step
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nan_step,epochs", [(3, 2), (1, 1)])
def test_nan_step_rolls_back_and_leaves_loadable_last_pt(teacher_pt, data_yaml, tmp_path, monkeypatch, nan_step,
                                                         epochs):
    """(3, 2): NaN KD terms at the first step of epoch 2 -> Ultralytics' rollback to last.pt (+ last.kd.pt) and the
    epoch is redone; (1, 1): NaN in the first epoch (no rollback possible) -> save_model still writes last.pt."""
    from ultralytics.utils import LOGGER

    from detkd.distiller import Distiller

    forward, calls, warnings = Distiller.forward, [0], []

    def nan_once(self, *a, **k):
        out = forward(self, *a, **k)
        if self.training and self.teacher is not None:
            calls[0] += 1
            if calls[0] == nan_step:
                out = {key: v * float("nan") for key, v in out.items()}
        return out

    monkeypatch.setattr(Distiller, "forward", nan_once)
    monkeypatch.setattr(LOGGER, "warning", lambda msg, *a, **k: warnings.append(str(msg)))
    m = _train_kd(tmp_path, teacher_pt, data_yaml, epochs=epochs, nbs=8)  # nbs = batch: one optimizer step per batch
    wdir = Path(m.trainer.save_dir) / "weights"
    assert calls[0] >= nan_step
    if epochs == 2:
        assert any("rolling back to" in w for w in warnings), warnings
        assert len((wdir.parent / "results.csv").read_text().strip().splitlines()) == 3
    from ultralytics.nn.tasks import load_checkpoint

    model, ckpt = load_checkpoint(wdir / "last.pt")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert not list(wdir.glob("*.tmp"))
