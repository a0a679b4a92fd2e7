"""`detkd bench`: model files checked up front, size / compute against hand counts, latency fields, the table,
the JSON that `detkd report` embeds, and the command line's errors."""

import json
import warnings

import numpy as np
import pytest
import torch

from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

ensure_ultralytics_offline()

from detkd.bench.info import model_info, onnx_info  # noqa: E402
from detkd.bench.latency import measure, model_format, onnx_precision  # noqa: E402
from detkd.bench.run import bench, format_table, latency_entry  # noqa: E402
from detkd.errors import ConfigError, DataError  # noqa: E402


def _tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1),
                               torch.nn.Flatten(), torch.nn.LazyLinear(5))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from ultralytics import YOLO

    from detkd.assets import PICO_YAML

    d = tmp_path_factory.mktemp("bench")
    y = YOLO(str(PICO_YAML))
    y.model.names = {0: "a", 1: "b"}
    pt = d / "pico.pt"
    y.save(pt)
    big = YOLO("yolov8n.yaml")
    big_pt = d / "v8n.pt"
    big.save(big_pt)
    net = _tiny_net()
    net(torch.zeros(1, 3, 32, 32))  # materialise the lazy layer
    onnx_path = d / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(onnx_path), dynamo=False, input_names=["images"],
                          dynamic_axes={"images": {0: "batch"}})
    return {"dir": d, "pt": pt, "big_pt": big_pt, "onnx": onnx_path}


def test_onnx_info_counts_by_hand(files):
    """Conv 3->8 (3x3, pad 1) + Conv 8->4 (1x1) + Linear 4*32*32 -> 5 on a 32x32 image, counted by hand."""
    info = onnx_info(files["onnx"], 32)
    hw = 32 * 32
    macs = hw * 8 * 3 * 9 + hw * 4 * 8 + 4 * hw * 5
    params = (8 * 27 + 8) + (4 * 8 + 4) + (4 * hw * 5 + 5)
    assert info["params"] == params
    assert info["gflops"] == pytest.approx(2 * macs / 1e9)
    assert info["size_mb"] == pytest.approx(files["onnx"].stat().st_size / 1e6)
    assert onnx_precision(files["onnx"]) == "fp32"


def test_model_info_matches_the_loaded_model(files):
    from ultralytics.nn.tasks import load_checkpoint

    m, _ = load_checkpoint(str(files["pt"]))
    info = model_info(files["pt"], 64)
    assert info["params"] == sum(p.numel() for p in m.parameters())
    assert info["gflops"] > 0


def test_model_format_errors_name_the_file(tmp_path, files):
    assert model_format(files["pt"]) == "ultralytics"
    assert model_format(files["onnx"]) == "onnx"
    with pytest.raises(DataError, match="not found.*missing.pt"):
        model_format(tmp_path / "missing.pt")
    sd = tmp_path / "state_dict.pt"
    torch.save(_tiny_net().state_dict(), sd)
    with pytest.raises(DataError, match="state_dict.pt: not an Ultralytics detection checkpoint"):
        model_format(sd)
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    with pytest.raises(DataError, match="unsupported model file '.txt'"):
        model_format(txt)
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(DataError, match="broken.onnx"):
        onnx_info(bad, 32)


def test_measure_fields_and_threads_restored(files):
    before = torch.get_num_threads()
    r = measure(files["pt"], "pytorch", 64, threads=1, batch_sizes=(1, 2), runs=5, warmup=1)
    assert torch.get_num_threads() == before
    assert 0 < r["min"] <= r["p50"] <= r["p95"]
    assert r["threads"] == 1 and r["imgsz"] == 64 and r["engine"] == "pytorch" and r["precision"] == "fp32"
    assert set(r["throughput"]) == {1, 2}
    assert r["throughput"][1] == pytest.approx(1000 / r["p50"])
    assert r["peak_rss_mb"] > 0 and r["cpu"]
    o = measure(files["onnx"], "onnxruntime", 32, threads=1, batch_sizes=(1, 3), runs=5, warmup=1)
    assert o["engine"] == "onnxruntime" and set(o["throughput"]) == {1, 3}
    with pytest.raises(DataError, match="unknown engine"):
        measure(files["pt"], "tensorrt", 64)


def test_bench_table_json_and_speedups(files):
    """Two Ultralytics models, eager only, in-process: rows, speed-up vs the first model, JSON on disk."""
    out = files["dir"] / "b"
    res = bench([files["big_pt"], files["pt"]], names=["teacher", "student"], imgsz=64, threads=1,
                batch_sizes=(1, 2), runs=5, warmup=1, engines=["pytorch"], out_dir=out, isolate=False, progress=False)
    t, s = res["rows"]
    assert (t["model"], s["model"]) == ("teacher", "student")
    assert t["speedup_vs_first"] == 1.0
    assert s["speedup_vs_first"] == pytest.approx(t["latency_ms"]["p50"] / s["latency_ms"]["p50"])
    assert s["params"] < t["params"] and s["gflops"] < t["gflops"]
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk["rows"][1]["latency_ms"]["p50"] == pytest.approx(s["latency_ms"]["p50"])
    table = (out / "bench.md").read_text()
    assert f"{res['threads']} thread" in table and res["cpu"] in table and "| student | eager | FP32 |" in table
    assert latency_entry(res, str(files["pt"]))["p50"] == s["latency_ms"]["p50"]
    assert latency_entry(res, "student", engine="onnxruntime") is None
    assert format_table(res).count("\n| ") == 6  # 2 tables: header + 2 rows each (separator lines start with "|-")
    assert f"| student | {s['params'] / 1e6:.2f} |" in format_table(res)


def test_bench_isolated_measures_in_a_fresh_process(files):
    res = bench([files["onnx"]], imgsz=32, threads=1, runs=3, warmup=1, progress=False, isolate=True)
    (r,) = res["rows"]
    assert r["engine"] == "onnxruntime" and r["precision"] == "fp32" and r["latency_ms"]["p50"] > 0
    # a fresh interpreter with onnxruntime + torch imported is far from this test process's RSS history
    assert r["peak_rss_mb"] > r["model_rss_mb"] >= 0


def test_bench_bad_input(tmp_path, files):
    with pytest.raises(ConfigError, match="INT8 needs calibration images"):
        bench([files["pt"]], int8=True)
    with pytest.raises(ConfigError, match="unknown engine"):
        bench([files["pt"]], engines=["tensorrt"])
    with pytest.raises(DataError, match="nope.pt"):
        bench([files["pt"], tmp_path / "nope.pt"], engines=["pytorch"])
    with pytest.raises(ConfigError, match="names must be unique"):
        bench([files["pt"], files["pt"]], engines=["pytorch"])


def test_cli_bench_error_is_one_line(tmp_path, capsys):
    from detkd.cli import main

    rc = main(["bench", str(tmp_path / "nothing.pt"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "nothing.pt" in err and "Traceback" not in err


def test_report_embeds_bench(tmp_path, files):
    """The report shows the bench table and takes each model's latency from it (matched by weights path)."""
    from detkd.report.report import ModelEntry, build_report

    res = bench([files["big_pt"], files["pt"]], names=["teacher", "student"], imgsz=64, threads=1, runs=3,
                warmup=1, engines=["pytorch"], out_dir=tmp_path / "bench", isolate=False, progress=False)
    metrics = {"AP": 0.3, "AP50": 0.5, "AP75": 0.3, "APs": 0.1, "APm": 0.3, "APl": 0.4, "AR1": 0.2, "AR10": 0.3,
               "AR100": 0.4, "ARs": 0.1, "ARm": 0.3, "ARl": 0.4, "per_class": {"a": {"AP": 0.3, "AP50": 0.5}}}
    entries = [ModelEntry(role="teacher", name="teacher", metrics=metrics, weights=str(files["big_pt"])),
               ModelEntry(role="baseline", name="student", metrics={**metrics, "AP": 0.2}, weights=str(files["pt"]))]
    paths = build_report(entries, tmp_path / "rep", bench=tmp_path / "bench" / "bench.json")
    html = paths["html"].read_text()
    assert "CPU deployment" in html and res["cpu"] in html
    rep = json.loads(paths["json"].read_text())
    assert rep["bench"]["rows"][0]["model"] == "teacher"
    lat = {m["name"]: m["latency_ms"] for m in rep["models"]}
    assert lat["student"]["p50"] == pytest.approx(res["rows"][1]["latency_ms"]["p50"])
    md = paths["md"].read_text()
    assert "## CPU deployment" in md and "| teacher | eager | FP32 |" in md
    with pytest.raises(DataError, match="bench result not found"):
        build_report(entries, tmp_path / "rep2", bench=tmp_path / "none.json")


def test_int8_detected(tmp_path, files):
    """A statically quantized (QDQ) graph reads as int8; measure() reports that precision."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"images": np.random.default_rng(i).random((1, 3, 32, 32), dtype=np.float32)}
                            for i in range(4)])

        def get_next(self):
            return next(self.it, None)

    q = tmp_path / "tiny.int8.onnx"
    quantize_static(str(files["onnx"]), str(q), Reader(), quant_format=QuantFormat.QDQ)
    assert onnx_precision(q) == "int8"
    assert measure(q, "onnxruntime", 32, runs=2, warmup=0)["precision"] == "int8"
    assert onnx_info(q, 32)["gflops"] == pytest.approx(onnx_info(files["onnx"], 32)["gflops"])


def test_worker_peak_memory_is_its_own():
    """A measuring process started from a big parent reports its own peak, not the parent's (ru_maxrss would)."""
    import subprocess
    import sys

    from detkd.bench.latency import _peak_rss_mb

    big = np.ones(600 * 2**20 // 8)  # 600 MiB touched in this (parent) process
    assert _peak_rss_mb() > 600
    out = subprocess.run([sys.executable, "-c", "from detkd.bench.latency import _peak_rss_mb; print(_peak_rss_mb())"],
                         capture_output=True, text=True, check=True).stdout
    assert float(out) < 400, out
    del big
