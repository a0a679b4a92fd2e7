"""Zero network calls, seen from the kernel's side: commands run under `strace -f`, so calls made by native code
(onnxruntime's telemetry, C++ DNS lookups) are seen too, not only Python's socket module. A call to loopback is
allowed, and so are local (AF_UNIX) sockets; anything else fails the test. Skipped, with the reason, where strace is missing or ptrace is not allowed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from helpers import rect_dataset, untrained_checkpoint

IMGSZ = 64
_ADDR = re.compile(r"(connect|sendto|sendmsg)\(\d+, .*?sa_family=(AF_INET6?|AF_UNIX)[^}]*\}")


def _strace_ok() -> str | None:
    if shutil.which("strace") is None:
        return "strace is not installed"
    r = subprocess.run(["strace", "-f", "-qq", "-e", "trace=connect", "true"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"strace cannot trace here: {r.stderr.strip()[:200]}"


pytestmark = pytest.mark.skipif(_strace_ok() is not None, reason=str(_strace_ok()))


def network_calls(trace: Path) -> list[str]:
    """Network syscalls in an strace log that leave the machine (loopback and plain local sockets are fine)."""
    bad = []
    for line in trace.read_text(errors="replace").splitlines():
        m = _ADDR.search(line)
        if not m:
            continue
        fam, call = m.group(2), m.group(0)
        if fam == "AF_UNIX":  # local sockets (nscd also answers passwd/group lookups; a failed nscd DNS lookup
            continue          # falls back to AF_INET port 53, which is caught below)
        if re.search(r'inet_addr\("127\.|inet_pton\(AF_INET6, "::1"', call):
            continue
        bad.append(line)
    return bad


def _traced(cmd: list[str], tmp: Path, timeout: int = 600) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp / "strace.txt"
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}  # detkd must set it itself
    r = subprocess.run(["strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg", "-o", str(log), *cmd],
                       capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp)
    return r, network_calls(log)


def test_strace_parser_sees_a_real_dns_query():
    lines = ['123 connect(8, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.255.255.53")}, 16) = 0',
             '124 connect(3, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
             '125 connect(4, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = -1 ENOENT',
             '126 connect(5, {sa_family=AF_UNIX, sun_path="/tmp/x.sock"}, 110) = 0']
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.txt"
        p.write_text("\n".join(lines))
        assert network_calls(p) == [lines[0]]


@pytest.mark.slow
def test_onnxruntime_session_makes_no_network_calls(tmp_path):
    """onnxruntime 1.32's telemetry sends DNS queries from C++ once a session lives ~10 s unless
    ORT_DISABLE_TELEMETRY=1 is set before it is imported; detkd sets it. The session here lives 15 s."""
    script = tmp_path / "ort.py"
    script.write_text(textwrap.dedent("""
        import time, numpy as np, onnx
        from onnx import TensorProto, helper
        from detkd.bench.onnx import ort_session
        g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); m.ir_version = 8
        onnx.save(m, "relu.onnx")
        s = ort_session("relu.onnx", threads=1)
        t0 = time.time()
        while time.time() - t0 < 15:
            s.run(None, {"x": np.ones((1, 4), np.float32)}); time.sleep(0.05)
        print("ran")
    """))
    r, calls = _traced([sys.executable, str(script)], tmp_path)
    assert r.returncode == 0 and "ran" in r.stdout, r.stderr[-2000:]
    assert calls == [], f"network calls from the onnxruntime session: {calls[:3]}"


@pytest.mark.slow
def test_detkd_train_and_eval_make_no_network_calls(tmp_path):
    data = rect_dataset(tmp_path / "data", IMGSZ)
    from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

    ensure_ultralytics_offline()
    teacher = untrained_checkpoint(tmp_path / "teacher.pt", {0: "red", 1: "green", 2: "blue"})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "teacher": str(teacher), "student": "yolov8n.yaml", "data": str(data), "epochs": 1, "imgsz": IMGSZ,
        "batch": 8, "device": "cpu", "workers": 0, "project": str(tmp_path / "runs"), "name": "r", "plots": True,
        "distill": {"logits": {"method": "sigmoid_kd", "weight": 1.0}}}))
    r, calls = _traced([sys.executable, "-m", "detkd", "train", str(cfg)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert calls == [], f"network calls during detkd train: {calls[:3]}"
    best = tmp_path / "runs" / "r" / "weights" / "best.pt"
    r, calls = _traced([sys.executable, "-m", "detkd", "eval", str(best), "--data", str(data), "--imgsz", str(IMGSZ),
                        "--out", str(tmp_path / "ev")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert calls == [], f"network calls during detkd eval: {calls[:3]}"
