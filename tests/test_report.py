"""`detkd.report`: numbers in report.json against independent arithmetic, the Markdown headline and tables,
a self-contained HTML page (every PNG embedded, no links), optional inputs left out, n/a for NaN."""

import base64
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from detkd.errors import ConfigError, DataError
from detkd.eval.coco import STAT_NAMES, write_metrics_json
from detkd.report.report import ModelEntry, build_report, load_metrics, read_results_csv

CLASSES = ["person", "car", "bicycle", "dog"]
REC = np.linspace(0.0, 1.0, 101)


def fake_metrics(ap: float, per_class_ap: dict, knee: float, aps: float = -1.0) -> dict:
    """An evaluate_coco-shaped dict with chosen numbers (fractions, as pycocotools reports them)."""
    stats = {k: 0.0 for k in STAT_NAMES}
    stats.update(AP=ap, AP50=min(1.0, ap * 1.6), AP75=ap * 1.05, APs=aps, APm=ap * 0.9, APl=ap * 1.2,
                 AR1=ap * 0.5, AR10=ap, AR100=ap * 1.1, ARs=aps, ARm=ap, ARl=ap)  # fmt: skip
    per_class = {c: {"AP": a, "AP50": a * 1.5 if a == a else a} for c, a in per_class_ap.items()}
    p50 = np.stack([np.clip(1.0 - np.maximum(0.0, REC - knee) * 3, 0, 1) for _ in CLASSES])
    for i, c in enumerate(CLASSES):
        if per_class_ap[c] != per_class_ap[c]:  # no ground truth: pycocotools' -1 row
            p50[i] = -1.0
    return {**stats, "stats": [stats[k] for k in STAT_NAMES], "per_class": per_class,
            "pr": {"class_names": list(CLASSES), "rec_thrs": REC, "precision50": p50, "precision50_95": p50 * 0.6},
            "engine": "pycocotools", "num_images": 40, "num_detections": 400}  # fmt: skip


TEACHER = fake_metrics(0.451, {"person": 0.62, "car": 0.55, "bicycle": 0.31, "dog": 0.40}, 0.8)
BASE = fake_metrics(0.302, {"person": 0.45, "car": 0.40, "bicycle": 0.18, "dog": 0.20}, 0.5, aps=0.11)
KD = fake_metrics(0.363, {"person": 0.52, "car": 0.43, "bicycle": 0.17, "dog": float("nan")}, 0.6, aps=0.12)

LAT = {"threads": 2, "cpu": "Test CPU @ 2.0GHz", "imgsz": 320, "engine": "onnxruntime", "runs": 20}
CSV_COLS = ["epoch", "time", "train/box_loss", "train/cls_loss", "train/dfl_loss", "metrics/precision(B)",
            "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)", "val/box_loss", "val/cls_loss",
            "val/dfl_loss", "lr/pg0", "lr/pg1", "lr/pg2"]  # fmt: skip
KD_COLS = ["train/kd_cls", "train/kd_box", "train/kd_feat"]


def write_results_csv(path, kd: bool, epochs: int = 5, pad: bool = False):
    """A results.csv with Ultralytics 8.4's columns (distilled runs add train/kd_* and val/kd_*)."""
    val_kd = [c.replace("train/", "val/") for c in KD_COLS]
    cols = CSV_COLS[:5] + (KD_COLS if kd else []) + CSV_COLS[5:12] + (val_kd if kd else []) + CSV_COLS[12:]
    lines = [",".join(f"{c:>20}" if pad else c for c in cols)]
    for e in range(1, epochs + 1):
        vals = [float(e), 10.0 * e] + [1.0 / e + 0.01 * i for i in range(len(cols) - 2)]
        lines.append(",".join(f"{v:>20g}" if pad else f"{v:g}" for v in vals))
    path.write_text("\n".join(lines) + "\n")
    return path


def entries(tmp_path, *, latency=True, csv=True, kd_metrics=KD, teacher=TEACHER):
    b_csv = write_results_csv(tmp_path / "b.csv", kd=False) if csv else None
    k_csv = write_results_csv(tmp_path / "k.csv", kd=True) if csv else None
    w = tmp_path / "student.pt"
    w.write_bytes(b"\0" * 2_500_000)
    return [
        ModelEntry("teacher", "teacher-s", teacher, params=11_136_374, gflops=28.6,
                   latency_ms={**LAT, "p50": 81.44, "p95": 90.2} if latency else None, size_mb=22.5),
        ModelEntry("baseline", "baseline-n", BASE, weights=w, params=3_157_200, gflops=8.9,
                   latency_ms={**LAT, "p50": 21.26, "p95": 24.0} if latency else None, results_csv=b_csv),
        ModelEntry("distilled", "distilled-n", kd_metrics, weights=w, params=3_157_200, gflops=8.9,
                   latency_ms={**LAT, "p50": 21.04, "p95": 23.7} if latency else None, results_csv=k_csv),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    paths = build_report(entries(tmp), tmp / "out", title="KD test report", dataset="fake set, 40 images",
                         notes="unit test")  # fmt: skip
    return paths, json.loads(paths["json"].read_text())


def md_row(md: str, first_cell: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row for {first_cell!r}")


def test_json_numbers(full):
    _, rep = full
    h = rep["headline"]
    gap = (0.363 - 0.302) / (0.451 - 0.302)  # independent: (KD - baseline) / (teacher - baseline)
    assert h["gap_closed"] == pytest.approx(gap, abs=1e-12)
    assert h["delta_AP"] == pytest.approx(0.363 - 0.302, abs=1e-12)
    assert (h["baseline_AP"], h["distilled_AP"], h["teacher_AP"]) == (0.302, 0.363, 0.451)
    assert h["latency"] == {"student_p50_ms": 21.04, "teacher_p50_ms": 81.44, "threads": 2, "noisy": False}
    by_name = {m["name"]: m for m in rep["models"]}
    assert by_name["baseline-n"]["size_mb"] == pytest.approx(2.5)  # measured from the weights file
    assert by_name["teacher-s"]["size_mb"] == 22.5
    assert by_name["baseline-n"]["APs"] == 0.11 and by_name["teacher-s"]["APs"] == -1.0
    rows = {r["class"]: r for r in rep["per_class"]}
    for c in ("person", "car", "bicycle"):
        assert rows[c]["delta_AP"] == pytest.approx(KD["per_class"][c]["AP"] - BASE["per_class"][c]["AP"], abs=1e-12)
        assert rows[c]["delta_AP50"] == pytest.approx(KD["per_class"][c]["AP50"] - BASE["per_class"][c]["AP50"])
        assert rows[c]["AP"]["teacher-s"] == TEACHER["per_class"][c]["AP"]
    # NaN (no ground truth for the distilled model's "dog") is null, with no delta, and sorts last
    assert rows["dog"]["AP"]["distilled-n"] is None and rows["dog"]["delta_AP"] is None
    assert [r["class"] for r in rep["per_class"]] == ["person", "car", "bicycle", "dog"]  # +7, +3, -1, n/a
    assert rows["person"]["rank"] == "best" and rows["bicycle"]["rank"] == "worst" and rows["car"]["rank"] is None


def test_markdown_headline_and_tables(full):
    paths, _ = full
    md = paths["md"].read_text()
    assert md.startswith("# KD test report")
    gap = round(100 * (0.363 - 0.302) / (0.451 - 0.302))
    assert (f"student mAP50-95 30.2 -> 36.3 (+6.1), teacher 45.1, gap closed {gap}%, "
            "CPU latency (p50, 2 threads) 21.0 ms (student) vs 81.4 ms (teacher)") in md  # fmt: skip
    # model table: mAP50-95, mAP50, AP75, APs/m/l, params, GFLOPs, size, latency p50/p95
    for name, m, params, size, p50, p95 in (("teacher-s", TEACHER, "11.14", "22.5", "81.4", "90.2"),
                                            ("baseline-n", BASE, "3.16", "2.5", "21.3", "24.0"),
                                            ("distilled-n", KD, "3.16", "2.5", "21.0", "23.7")):  # fmt: skip
        expect = [f"{100 * m[k]:.1f}" if m[k] >= 0 else "n/a" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        assert md_row(md, name)[2:] == [*expect, params, "29" if name == "teacher-s" else "8.9", size, p50, p95]
    # per-class rows with deltas (difference of the shown values), best/worst marked
    assert md_row(md, "**person** (best)") == ["**person** (best)", "62.0", "45.0", "52.0", "+7.0", "+10.5"]
    assert md_row(md, "car") == ["car", "55.0", "40.0", "43.0", "+3.0", "+4.5"]
    assert md_row(md, "**bicycle** (worst)")[4:] == ["-1.0", "-1.5"]
    assert md_row(md, "dog") == ["dog", "40.0", "20.0", "n/a", "n/a", "n/a"]
    for png in ("pr_curves.png", "per_class_ap.png", "tradeoff.png", "training_curves.png"):
        assert f"]({png})" in md


def test_html_self_contained(full):
    from PIL import Image

    paths, rep = full
    page = paths["html"].read_text()
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|link|iframe|object)\b", page, re.I) and "@import" not in page and "url(" not in page
    refs = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page, re.I)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    pngs = sorted(p for k, p in paths.items() if k not in ("md", "html", "json"))
    assert {p.name for p in pngs} == {f["file"] for f in rep["plots"]} == \
        {"pr_curves.png", "per_class_ap.png", "tradeoff.png", "training_curves.png", "learning_curves.png"}  # fmt: skip
    embedded = [base64.b64decode(r.split(",", 1)[1], validate=True) for r in refs]
    for data in embedded:
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        Image.open(io.BytesIO(data)).verify()
    assert sorted(embedded) == sorted(p.read_bytes() for p in pngs)  # every PNG embedded, byte for byte
    assert "36.3" in page and "gap closed" in page and '<tr class="worst">' in page


def test_training_curves_read_kd_columns(full, tmp_path):
    _, rep = full
    fig = next(f for f in rep["plots"] if f["key"] == "training_curves")
    assert fig["columns"][0] == "metrics/mAP50-95(B)"
    assert set(fig["columns"]) == {"metrics/mAP50-95(B)", "train/box_loss", "train/cls_loss", "train/dfl_loss",
                                   *KD_COLS}  # fmt: skip
    # padded headers (older Ultralytics) parse to the same columns and values
    a = read_results_csv(write_results_csv(tmp_path / "a.csv", kd=True))
    b = read_results_csv(write_results_csv(tmp_path / "b.csv", kd=True, pad=True))
    assert list(a) == list(b) and "train/kd_feat" in a
    for k in a:
        np.testing.assert_allclose(a[k], b[k])
    np.testing.assert_array_equal(a["epoch"], [1, 2, 3, 4, 5])


def test_missing_optional_inputs(tmp_path):
    es = entries(tmp_path, latency=False, csv=False)
    es[2].results_csv = tmp_path / "nope" / "results.csv"  # given but absent: noted, not fatal
    paths = build_report(es, tmp_path / "out")
    rep = json.loads(paths["json"].read_text())
    md = paths["md"].read_text()
    assert "CPU latency" not in rep["headline"]["text"] and rep["headline"]["latency"] is None
    keys = {f["key"]: f for f in rep["plots"]}
    assert "training_curves" not in keys and keys["tradeoff"]["x"] == "params_M"  # no latency: vs params
    assert md_row(md, "baseline-n")[-2:] == ["–", "–"]
    assert "training logs not found" in md
    # bare minimum: metrics only, no PR arrays, no params / size / latency / logs
    bare = [ModelEntry(e.role, e.name, {k: v for k, v in m.items() if k != "pr"})
            for e, m in zip(es, (TEACHER, BASE, KD))]  # fmt: skip
    paths = build_report(bare, tmp_path / "bare")
    rep = json.loads(paths["json"].read_text())
    assert [f["key"] for f in rep["plots"]] == ["per_class_ap"]
    assert rep["headline"]["gap_closed"] == pytest.approx((0.363 - 0.302) / (0.451 - 0.302))
    assert "data:image/png;base64," in paths["html"].read_text()


def test_nan_per_class_shows_na(full):
    paths, _ = full
    page = paths["html"].read_text()
    row = re.search(r"<tr><td>dog</td>(.*?)</tr>", page).group(1)
    assert re.findall(r"<td[^>]*>([^<]*)</td>", row) == ["40.0", "20.0", "n/a", "n/a", "n/a"]
    assert md_row(paths["md"].read_text(), "dog")[3] == "n/a"


def test_gap_not_defined_when_teacher_not_better(tmp_path):
    weak = fake_metrics(0.25, {"person": 0.3, "car": 0.3, "bicycle": 0.1, "dog": 0.1}, 0.4)
    paths = build_report(entries(tmp_path, teacher=weak, csv=False), tmp_path / "out")
    rep = json.loads(paths["json"].read_text())
    assert rep["headline"]["gap_closed"] is None
    assert "teacher 25.0, gap closed n/a" in paths["md"].read_text()


def test_metrics_from_json_match_dict(tmp_path, full):
    """write_metrics_json turns arrays into lists and NaN into null; the report must not care."""
    _, rep_dict = full
    k_json = write_metrics_json(KD, tmp_path / "kd.json")
    assert json.loads(k_json.read_text())["per_class"]["dog"]["AP"] is None
    loaded = load_metrics(k_json)
    assert math.isnan(loaded["per_class"]["dog"]["AP"]) and loaded["pr"]["precision50"].shape == (4, 101)
    paths = build_report(entries(tmp_path, kd_metrics=str(k_json)), tmp_path / "out", title="KD test report",
                         dataset="fake set, 40 images", notes="unit test")  # fmt: skip
    rep = json.loads(paths["json"].read_text())
    assert rep["headline"] == rep_dict["headline"] and rep["per_class"] == rep_dict["per_class"]
    assert [f["key"] for f in rep["plots"]] == [f["key"] for f in rep_dict["plots"]]


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="role"):
        ModelEntry("student", "x", BASE)
    with pytest.raises(ConfigError, match="unique"):
        build_report([ModelEntry("baseline", "x", BASE), ModelEntry("distilled", "x", KD)], tmp_path)
    with pytest.raises(DataError, match="not found"):
        build_report([ModelEntry("baseline", "x", tmp_path / "missing.json")], tmp_path)


def test_model_info_counts(tmp_path):
    import torch

    from detkd.integrations.ultralytics_env import ensure_ultralytics_offline
    from detkd.report.report import _count_gflops, model_info

    ensure_ultralytics_offline()
    from ultralytics.nn.tasks import DetectionModel

    import detkd.assets

    model = DetectionModel(str(Path(detkd.assets.__file__).with_name("yolov8-pico.yaml")), nc=3, verbose=False)
    w = tmp_path / "pico.pt"
    torch.save({"model": model}, w)
    info = model_info(w, 64)
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["size_mb"] == w.stat().st_size / 1e6
    # the hook count of conv layers agrees with Ultralytics/thop within a few % (BN, activations excluded)
    assert info["gflops"] == pytest.approx(_count_gflops(model, 64), rel=0.05)
    # and the hook count is exact on a layer computed by hand: 2 * out_numel * (C_in/groups * kh * kw)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 16 * 16, 5))  # fmt: skip
    assert _count_gflops(conv, 32) == pytest.approx(2 * (8 * 16 * 16 * 3 * 9 + 5 * 8 * 16 * 16) / 1e9)


def test_real_evaluate_coco_output(tmp_path):
    """The dict evaluate_coco returns (and its JSON) goes straight in, including a category without ground
    truth (pycocotools' -1 PR row, NaN per-class AP)."""
    from detkd.eval.coco import evaluate_coco

    rng = np.random.default_rng(0)
    cats = [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}, {"id": 3, "name": "unused"}]
    images, anns = [], []
    for i in range(6):
        images.append({"id": i, "width": 200, "height": 200})
        for j in range(3):
            x, y = rng.uniform(0, 120, 2)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1 + j % 2, "bbox": [x, y, 60, 50]})
    gt = {"images": images, "annotations": anns, "categories": cats}

    def dets(noise):
        return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9 - 0.01 * k,
                 "bbox": [a["bbox"][0] + noise * (k % 3), a["bbox"][1], 60, 50]} for k, a in enumerate(anns)]  # fmt: skip

    t, b, k = (evaluate_coco(gt, dets(n)) for n in (0.0, 14.0, 6.0))
    assert math.isnan(t["per_class"]["unused"]["AP"]) and t["AP"] > k["AP"] > b["AP"]
    k_json = write_metrics_json(k, tmp_path / "k.json")
    paths = build_report([ModelEntry("teacher", "T", t), ModelEntry("baseline", "B", b),
                          ModelEntry("distilled", "D", k_json)], tmp_path / "out")  # fmt: skip
    rep = json.loads(paths["json"].read_text())
    assert rep["headline"]["gap_closed"] == pytest.approx((k["AP"] - b["AP"]) / (t["AP"] - b["AP"]))
    rows = {r["class"]: r for r in rep["per_class"]}
    assert rows["car"]["delta_AP"] == pytest.approx(k["per_class"]["car"]["AP"] - b["per_class"]["car"]["AP"])
    assert rows["unused"]["delta_AP"] is None and md_row(paths["md"].read_text(), "unused")[1:] == ["n/a"] * 5
    assert "pr_curves" in {f["key"] for f in rep["plots"]}


def test_report_from_spec(tmp_path):
    from detkd.report.report import report_from_spec

    for name, m in (("t", TEACHER), ("b", BASE), ("k", KD)):
        write_metrics_json(m, tmp_path / "eval" / name / "metrics.json")
    (tmp_path / "lat.json").write_text(json.dumps({**LAT, "p50": 20.0, "p95": 22.0}))
    write_results_csv(tmp_path / "k.csv", kd=True)
    spec = tmp_path / "report.yaml"
    spec.write_text("title: spec report\nmodels:\n"
                    "  - {role: teacher, name: T, metrics: eval/t/metrics.json}\n"
                    "  - {role: baseline, name: B, metrics: eval/b/metrics.json, params: 3000000}\n"
                    "  - {role: distilled, name: D, metrics: eval/k/metrics.json, latency_ms: lat.json, "
                    "results_csv: k.csv}\n")  # fmt: skip
    paths = report_from_spec(spec)
    assert paths["html"] == tmp_path / "report" / "report.html"
    rep = json.loads(paths["json"].read_text())
    assert rep["title"] == "spec report" and rep["headline"]["latency"]["student_p50_ms"] == 20.0
    assert rep["headline"]["gap_closed"] == pytest.approx((0.363 - 0.302) / (0.451 - 0.302))
    assert "training_curves" in {f["key"] for f in rep["plots"]}
    spec.write_text("models:\n  - {role: baseline, name: B, metrics: eval/b/metrics.json, weight: x.pt}\n")
    with pytest.raises(ConfigError, match="weight"):
        report_from_spec(spec)


def test_curve_legend_fits_the_figure(tmp_path, monkeypatch):
    """Five models with long names (the demo's teacher, baseline, distilled and two few-label students): the
    legend above the learning curves wraps into rows instead of running off both sides of the image."""
    from detkd.report import plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or Path(path))
    names = ["teacher (yolov8n)", "baseline (yolov8-femto)", "distilled (yolov8-femto)",
             "10% labels only (yolov8-femto)", "10% labels + teacher pseudo-labels (yolov8-femto)"]
    logs = [{"data": {"epoch": [1, 2, 3], "metrics/mAP50-95(B)": [0.1, 0.2, 0.3 + i / 10]}, "label": n,
             "color": f"C{i}", "ls": "-"} for i, n in enumerate(names)]
    plots.training_curves(tmp_path / "lc.png", logs, ["metrics/mAP50-95(B)", "gap"], ncols=2)
    fig = figs[0]
    fig.canvas.draw()
    box = fig.legends[0].get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1, (box, fig.bbox)
    assert len(fig.legends[0].get_texts()) == 5


def test_model_table_names_the_split_it_reports(tmp_path, full):
    """The fine print under the model table names the split the mAP is on (the demo and the benchmark report the
    test split); it no longer says "validation set" whatever the metrics were computed on."""
    paths, rep = full
    import html

    for f in ("md", "html"):
        text = html.unescape(paths[f].read_text())
        assert "on the validation set" not in text.split("CPU deployment")[0]
        assert "COCO box AP on each model's evaluation split" in text
    assert rep["split"] is None
    p = build_report(entries(tmp_path), tmp_path / "out", title="t", split="test")
    for f in ("md", "html"):
        assert "COCO box AP on the 'test' split" in html.unescape(p[f].read_text())
    assert json.loads(p["json"].read_text())["split"] == "test"
