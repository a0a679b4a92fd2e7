"""Checkpoints from others never run code: a `.pt` with a pickled payload is refused by every command that loads a
model (train teacher / student / resume, eval, bench) before anything is unpickled, with one clear line, and the
payload does not run. Real checkpoints still load; `--trust-checkpoints` opts out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

ensure_ultralytics_offline()

from helpers import rect_dataset, untrained_checkpoint  # noqa: E402

IMGSZ = 64


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # what a hostile checkpoint does: run a command when unpickled
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    data = rect_dataset(root / "data", IMGSZ)
    marker = root / "PAYLOAD_RAN"
    evil = root / "evil.pt"
    torch.save({"model": _Payload(marker), "train_args": {}}, evil)
    good = untrained_checkpoint(root / "good.pt", {0: "red", 1: "green", 2: "blue"})
    return {"root": root, "data": data, "marker": marker, "evil": evil, "good": good}


def _detkd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    e.pop("DETKD_TRUST_CHECKPOINTS", None)
    return subprocess.run([sys.executable, "-m", "detkd", *args], capture_output=True, text=True, env=e, timeout=600)


def _config(files, tmp: Path, **kw) -> Path:
    cfg = {"teacher": str(files["good"]), "student": "yolov8n.yaml", "data": str(files["data"]), "epochs": 1,
           "imgsz": IMGSZ, "batch": 4, "device": "cpu", "workers": 0, "project": str(tmp / "runs"), "name": "r",
           "distill": {"logits": {"method": "sigmoid_kd", "weight": 1.0}}}
    cfg.update(kw)
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.parametrize("command", ["eval", "bench", "train-teacher", "train-student", "train-resume"])
def test_payload_checkpoint_is_refused_and_never_runs(files, tmp_path, command):
    evil, marker = str(files["evil"]), files["marker"]
    if command == "eval":
        r = _detkd("eval", evil, "--data", str(files["data"]), "--imgsz", str(IMGSZ), "--out", str(tmp_path / "e"))
    elif command == "bench":
        r = _detkd("bench", evil, "--imgsz", str(IMGSZ), "--runs", "1", "--warmup", "0", "--engine", "pytorch",
                   "--out", str(tmp_path / "b"))
    elif command == "train-teacher":
        r = _detkd("train", str(_config(files, tmp_path, teacher=evil)))
    elif command == "train-student":
        r = _detkd("train", str(_config(files, tmp_path, student=evil)))
    else:
        r = _detkd("train", str(_config(files, tmp_path, resume=evil)))
    assert not marker.exists(), f"the payload ran during `detkd {command}`"
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "refused to load" in err[0] and "posix.system" in err[0] and "--trust-checkpoints" in err[0]
    assert str(files["evil"]) in err[0]


def test_ultralytics_loader_itself_is_weights_only(files):
    """Defence in depth: even a load that skips detkd's scan goes through Ultralytics' weights-only loader."""
    import ultralytics.nn.tasks as tasks

    assert os.environ["ULTRALYTICS_SAFE_LOAD"] == "1" and tasks.SAFE_LOAD is True
    with pytest.raises(Exception):
        tasks.torch_safe_load(str(files["evil"]))
    assert not files["marker"].exists()
    ckpt, _ = tasks.torch_safe_load(str(files["good"]))  # a real checkpoint still loads
    assert ckpt["model"].yaml["nc"] == 3


def test_real_checkpoint_loads_and_trust_opts_out(files, monkeypatch):
    from detkd.checkpoints import CheckpointError, check_checkpoint, unsafe_globals

    assert unsafe_globals(files["good"]) == []
    assert check_checkpoint(files["good"]) == files["good"]
    with pytest.raises(CheckpointError, match="posix.system"):
        check_checkpoint(files["evil"])
    monkeypatch.setenv("DETKD_TRUST_CHECKPOINTS", "1")
    assert check_checkpoint(files["evil"]) == files["evil"]  # the user's explicit decision
    from detkd.integrations.ultralytics_env import ensure_safe_loading

    assert ensure_safe_loading() is False and os.environ["ULTRALYTICS_SAFE_LOAD"] == "0"
    monkeypatch.delenv("DETKD_TRUST_CHECKPOINTS")
    assert ensure_safe_loading() is True
    assert not files["marker"].exists()


def test_garbage_checkpoint_is_one_line(files, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    r = _detkd("eval", str(junk), "--data", str(files["data"]), "--imgsz", str(IMGSZ), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not a PyTorch checkpoint" in r.stderr and str(junk) in r.stderr
