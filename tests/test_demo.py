"""`detkd demo --quick` end to end: data, three trainings, evaluation, report, headline (a few minutes)."""

import json
import os
import subprocess
import sys


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "detkd", "demo", "--quick", "--out", str(out), "--threads", "2"],
                       capture_output=True, text=True, timeout=1500, env={**os.environ})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "student mAP50-95" in r.stdout and "gap closed" in r.stdout and "CPU latency" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    for role in ("teacher", "baseline", "distilled"):
        assert (out / "runs" / role / "weights" / "best.pt").is_file()
        m = json.loads((out / "eval" / role / "metrics.json").read_text())
        assert 0.0 <= m["AP"] <= 1.0 and "per_class" in m
        assert summary["info"][role]["latency_ms"]["p50"] > 0
    cols = (out / "runs" / "distilled" / "results.csv").read_text().splitlines()[0]
    assert "kd_cls" in cols and "kd_box" in cols and "kd_feat" in cols
    html = (out / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    assert (out / "report" / "report.md").is_file() and (out / "report" / "report.json").is_file()
