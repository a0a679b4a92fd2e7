"""Your own loop: the README's snippet runs as written, and examples/own_loop.py trains, checkpoints and writes
detections that `detkd eval --detections` scores (a few steps, 64 px)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Your own training loop", 1)[1].split("\n### ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture()
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_readme_own_loop_snippet_runs_as_written(one_thread, monkeypatch):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download attempted"))
    code = readme_snippet()
    assert "from detkd import Distiller" in code and "kd.record()" in code
    ns: dict = {"__name__": "readme"}
    exec(compile(code, "README.md (own loop)", "exec"), ns)
    kd, student, teacher, loss = ns["kd"], ns["student"], ns["teacher"], ns["loss"]
    assert torch.isfinite(loss)
    assert kd.teacher_forwards == 1 and not any(p.requires_grad for p in teacher.parameters())
    assert set(kd.last_terms) == {"kd_cls", "kd_feat/backbone:0", "kd_feat/backbone:1", "kd_feat/backbone:2"}
    assert all(float(v) > 0 for k, v in kd.last_terms.items() if k.startswith("kd_feat"))
    assert student.head.classification_head.cls_logits.weight.grad.abs().sum() > 0


def test_example_script_runs_a_few_steps(tmp_path):
    from detkd.data.synth import generate
    from detkd.eval import evaluate_detections

    generate(tmp_path / "data", n_train=4, n_val=2, imgsz=64, progress=False)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "examples" / "own_loop.py"), "--out", str(out), "--data",
           str(tmp_path / "data" / "data.yaml"), "--imgsz", "64", "--batch", "2", "--teacher-epochs", "1",
           "--epochs", "1", "--max-steps", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "student epoch 1/1 loss" in r.stdout and "kd_box" in r.stdout and "val mAP50-95" in r.stdout
    for f in ("teacher.pt", "student.pt", "last.pt", "detections.json", "metrics.json"):
        assert (out / f).is_file(), f
    assert torch.load(out / "last.pt", weights_only=True)["tag"] == "student"
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import own_loop
    finally:
        sys.path.remove(str(ROOT / "examples"))
    student = own_loop.student_model(5, 64)
    student.load_state_dict(torch.load(out / "student.pt", weights_only=True))  # plain torchvision model
    m = evaluate_detections(out / "detections.json", tmp_path / "data" / "data.yaml")
    assert m["num_images"] == 2
    # rerunning the finished command resumes from last.pt: nothing left to train, the teacher is not trained again
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0 and "teacher epoch" not in r.stdout and "student epoch" not in r.stdout, r.stdout
