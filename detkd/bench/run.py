"""`detkd bench`: CPU latency / throughput / memory / size of one or more detectors, PyTorch eager vs ONNX Runtime
(FP32 and, with ``int8=True``, static INT8), optionally with mAP on a dataset — one table and one JSON.

For every Ultralytics ``.pt`` the rows are: PyTorch eager FP32, its ONNX export on onnxruntime (FP32) and, with
``int8``, that export quantized with onnxruntime's static INT8 (calibrated on training images of ``data``). An
``.onnx`` input gives one onnxruntime row (precision read from the graph). Each row is measured in a process of
its own (``isolate=True``) so its peak memory is its own, and all rows are timed round-robin (one batch of runs of
each row per round, until every row settles or ``budget_s`` ends; `detkd.bench.noise`) so that load changes on a
shared machine hit every row alike. The result's ``noise`` section says plainly when the machine was too noisy for
the latencies to mean anything. "speed-up" compares rows of the same engine and precision with the first model
given (pass the teacher first to read student-vs-teacher speed-ups).

    from detkd.bench.run import bench, format_table
    res = bench(["teacher.pt", "student.pt"], imgsz=320, threads=2, batch_sizes=(1, 8), int8=True, data="data.yaml")
    print(format_table(res))
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from detkd.bench.info import format_gflops, model_info, onnx_info
from detkd.bench.latency import ENGINES, cpu_model, measure_interleaved, model_format, onnx_precision
from detkd.bench.noise import noise_line, noise_verdict
from detkd.errors import ConfigError, DataError

INT8_MAX_DROP = 1.0  # mAP50-95 points: a larger INT8 loss is called out in the notes


def _versions() -> dict:
    out = {}
    for mod in ("torch", "onnxruntime", "ultralytics"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional engine is reported as absent
            out[mod] = None
    return out


def default_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Display names for ``paths``: the file stems when those are unique, else the run folder of each
    (``runs/teacher/weights/best.pt`` -> ``teacher``), else run folder and stem (``teacher/best``), else more of the
    path; `ConfigError` saying to pass ``--names`` when even the whole paths give no unique names."""
    paths = [Path(p) for p in paths]
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems

    def parts(p: Path) -> list[str]:  # folders above the file, nearest first, without Ultralytics' 'weights'
        return [q for q in reversed(p.parent.parts) if q not in ("weights", "/", "\\", "")]

    runs = [(parts(p) or [p.stem])[0] for p in paths]
    if len(set(runs)) == len(runs):
        return runs
    for depth in range(1, 1 + max(len(parts(p)) for p in paths)):
        cand = ["/".join(list(reversed(parts(p)[:depth])) + [p.stem]) for p in paths]
        if len(set(cand)) == len(cand):
            return cand
    dup = sorted({str(p) for p, n in zip(paths, stems) if stems.count(n) > 1})
    twice = len({p.resolve() for p in paths}) < len(paths)
    raise ConfigError(f"names must be unique, one per model, and {', '.join(dup)} give the same name"
                      f"{' (a file is listed twice)' if twice else ''}; pass display names with --names "
                      "(names=[...] in Python), one per model")


def _file_tag(name: str) -> str:
    """``name`` made safe as one file-name component (derived names such as ``teacher/best`` hold a slash)."""
    return name.replace("/", "_").replace("\\", "_")


def _fresh(target: Path, source: Path) -> bool:
    return target.is_file() and target.stat().st_mtime >= source.stat().st_mtime


def bench(
    models: Sequence[str | os.PathLike],
    *,
    imgsz: int = 640,
    threads: int = 1,
    batch_sizes: Sequence[int] = (1,),
    runs: int = 50,
    warmup: int = 10,
    engines: Sequence[str] = ENGINES,
    int8: bool = False,
    data: str | os.PathLike | None = None,
    n_calib: int = 300,
    evaluate: bool | None = None,
    names: Sequence[str] | None = None,
    out_dir: str | os.PathLike | None = None,
    isolate: bool = True,
    progress: bool = True,
    budget_s: float = 60.0,
) -> dict:
    """Benchmark ``models`` (see the module docstring); returns the result dict and, with ``out_dir``, writes
    ``bench.json`` and ``bench.md`` there (ONNX exports go to ``out_dir/onnx``, else next to each ``.pt``).

    Args:
        imgsz, threads: input size (square) and CPU threads for every measurement.
        batch_sizes: throughput is measured at each (batch 1 comes from the latency runs).
        runs, warmup: timed (at least, unless ``budget_s`` ends first) and untimed batch-1 forwards per row (fewer
            at larger batches).
        budget_s: seconds of round-robin latency rounds: rounds go on until every row's spread is small (and each
            has ``runs`` runs) or this budget ends (`detkd.bench.latency.measure_interleaved`).
        engines: subset of ``("pytorch", "onnxruntime")``.
        int8: add an onnxruntime static-INT8 row per model (needs ``data`` for calibration images).
        data: a dataset (YOLO data yaml / COCO / VOC, as `detkd eval` takes): calibration for INT8 and, when
            ``evaluate`` (default: whenever ``data`` is given), COCO mAP of every row on its val split.
        names: display names (default: file stems, or run folders when stems repeat; see `default_names`).
    """
    if not models:
        raise ConfigError("bench needs at least one model")
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        raise ConfigError(f"unknown engine(s) {bad}; choose from {list(ENGINES)}")
    if int8 and data is None:
        raise ConfigError("INT8 needs calibration images: pass data=<dataset yaml> (--data on the command line)")
    if data is not None and not Path(data).exists():
        raise DataError(f"dataset not found: {data}")
    if threads < 1 or runs < 1 or any(int(b) < 1 for b in batch_sizes):
        raise ConfigError(f"threads ({threads}), runs ({runs}) and batch sizes ({list(batch_sizes)}) must be >= 1")
    if not budget_s >= 0:
        raise ConfigError(f"budget_s ({budget_s}) must be >= 0 seconds")
    evaluate = data is not None if evaluate is None else evaluate
    if evaluate and data is None:
        raise ConfigError("evaluate=True needs data=<dataset yaml>")
    paths = [Path(m) for m in models]
    kinds = [model_format(p) for p in paths]  # every file is checked before any work starts
    if names:
        names = [str(n) for n in names]
        if len(names) != len(paths) or len(set(names)) != len(names):
            raise ConfigError(f"names must be unique, one per model: got {len(names)} name(s) {names} for "
                              f"{len(paths)} model(s)")
    else:
        names = default_names(paths)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        (out / "onnx").mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    # ---- plan the rows (exports and quantization happen here) ----
    plan: list[dict] = []
    notes: list[str] = []
    for name, p, kind in zip(names, paths, kinds):
        fp32_onnx = None
        if kind == "ultralytics":
            if "pytorch" in engines:
                plan.append({"model": name, "source": str(p), "path": str(p), "engine": "pytorch"})
            if "onnxruntime" in engines or int8:
                target = (out / "onnx" / f"{_file_tag(name)}.onnx") if out is not None else p.with_suffix(".onnx")
                if not _fresh(target, p):
                    from detkd.bench.onnx import export_onnx

                    export_onnx(p, imgsz, out=target, dynamic=True, progress=False)
                fp32_onnx = target
                if "onnxruntime" in engines:
                    plan.append({"model": name, "source": str(p), "path": str(target), "engine": "onnxruntime"})
        else:
            plan.append({"model": name, "source": str(p), "path": str(p), "engine": "onnxruntime"})
            if onnx_precision(p) == "fp32":
                fp32_onnx = p
        if int8:
            if fp32_onnx is None:
                notes.append(f"{name}: not quantized (the ONNX model is not FP32)")
                continue
            from detkd.bench.quantize import quantize_int8

            target = ((out / "onnx" / f"{_file_tag(name)}.int8.onnx") if out is not None
                      else fp32_onnx.with_suffix(".int8.onnx"))
            q = quantize_int8(fp32_onnx, data, imgsz, out=target, n_calib=n_calib, progress=progress)
            plan.append({"model": name, "source": str(p), "path": str(q["path"]), "engine": "onnxruntime",
                         "quantization": {k: v for k, v in q.items() if k != "path"}})

    # ---- measure ----
    rows: list[dict] = []
    lats, timing = measure_interleaved([{"path": r["path"], "engine": r["engine"]} for r in plan], int(imgsz),
                                       int(threads), batch_sizes=[int(b) for b in batch_sizes], runs=int(runs),
                                       warmup=int(warmup), budget_s=float(budget_s), isolate=isolate, progress=progress)
    for r, lat in zip(plan, lats):
        info = model_info(r["path"], imgsz) if r["engine"] == "pytorch" else onnx_info(r["path"], imgsz)
        rows.append({**r, "precision": lat["precision"], "latency_ms": {k: lat[k] for k in
                     ("p50", "p95", "mean", "min", "spread", "rounds", "runs", "warmup", "threads", "imgsz", "engine",
                      "cpu")},
                     "throughput": lat["throughput"], "peak_rss_mb": lat["peak_rss_mb"],
                     "model_rss_mb": lat["model_rss_mb"], "params": info["params"], "gflops": info["gflops"],
                     "size_mb": info["size_mb"]})
        notes += [f"{r['model']} {r['engine']}: {s}" for s in lat["skipped"]]

    # ---- accuracy ----
    if evaluate:
        from detkd.eval.run import evaluate_model

        for r in tqdm(rows, desc="mAP", unit="model", disable=not progress, dynamic_ncols=True):
            tag = f"{_file_tag(r['model'])}_{r['engine']}_{r['precision']}"
            m = evaluate_model(r["path"], data, imgsz=imgsz, threads=threads, voc=False, progress=False,
                               out_dir=(out / "eval" / tag) if out is not None else None)
            r["mAP50_95"], r["mAP50"] = m["AP"] * 100, m["AP50"] * 100

    # ---- ratios and notes ----
    first: dict[tuple, dict] = {}
    for r in rows:
        key = (r["engine"], r["precision"])
        ref = first.setdefault(key, r)
        r["speedup_vs_first"] = ref["latency_ms"]["p50"] / r["latency_ms"]["p50"]
        r["speedup_ref"] = ref["model"]
        eager = next((x for x in rows if x["source"] == r["source"] and x["engine"] == "pytorch"), None)
        r["speedup_vs_eager"] = eager["latency_ms"]["p50"] / r["latency_ms"]["p50"] if eager else None
        fp32 = next((x for x in rows if x["source"] == r["source"] and x["engine"] == "onnxruntime"
                     and x["precision"] == "fp32"), None)
        if r["precision"] == "int8" and fp32 is not None:
            r["speedup_vs_fp32"] = fp32["latency_ms"]["p50"] / r["latency_ms"]["p50"]
            if r["speedup_vs_fp32"] < 1.0:
                notes.append(f"{r['model']}: INT8 is not faster than FP32 on this CPU at {threads} thread(s) "
                             f"({r['latency_ms']['p50']:.1f} vs {fp32['latency_ms']['p50']:.1f} ms p50): for a model "
                             "this small the quantize/dequantize steps cost more than the integer convolutions save")
            if "mAP50_95" in r and "mAP50_95" in fp32:
                drop = fp32["mAP50_95"] - r["mAP50_95"]
                r["int8_drop"] = drop
                qz = r.get("quantization") or {}
                kept = qz.get("excluded_nodes") or []
                mods = sorted({n.split("/")[1] for n in kept if n.count("/") >= 2})
                kept_txt = (f"{len(kept)} node(s) of {', '.join('/' + m for m in mods) or 'the graph'} (the detection "
                            "head's box decoding: DFL, anchor/stride arithmetic, concat, class sigmoid) were left in "
                            "FP32; the list is in bench.json") if kept else "no node was left in FP32"
                if drop > INT8_MAX_DROP:
                    notes.append(f"{r['model']}: INT8 loses {drop:.1f} mAP50-95 points against FP32 ONNX "
                                 f"(more than {INT8_MAX_DROP:.1f}); {kept_txt}. Leave more of the head in FP32 or "
                                 "calibrate on more images before shipping it.")
                else:
                    notes.append(f"{r['model']}: INT8 within {INT8_MAX_DROP:.1f} mAP50-95 of FP32 "
                                 f"({-drop:+.2f} points); {kept_txt}.")
    noise = {**noise_verdict(rows), **timing,
             "how": "rows timed round-robin, one batch of runs of each row per round (each batch after one untimed "
                    "run); spread: interquartile range of a row's per-round medians over their median"}
    res = {"cpu": cpu_model(), "threads": int(threads), "imgsz": int(imgsz), "batch_sizes": [int(b) for b in batch_sizes],
           "runs": rows[0]["latency_ms"]["runs"] if rows else int(runs), "runs_requested": int(runs),
           "warmup": int(warmup), "versions": _versions(), "data": str(data) if data else None,
           "what": "model forward only (no letterbox / NMS), batch 1 latency in ms per image; throughput in images/s",
           "rows": rows, "notes": notes, "noise": noise}
    if out is not None:
        _write(out / "bench.json", json.dumps(res, indent=2))
        _write(out / "bench.md", format_table(res) + "\n")
    return res


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _f(v, fmt: str, na: str = "—") -> str:
    return na if v is None else format(v, fmt)


def table_rows(res: dict) -> tuple[list[str], list[list[str]]]:
    """The bench table as (header, rows of strings), shared by the terminal, Markdown and `detkd report`."""
    bs = [b for b in res["batch_sizes"] if b != 1]
    has_map = any("mAP50_95" in r for r in res["rows"])
    ref = res["rows"][0]["model"] if res["rows"] else ""
    head = ["model", "engine", "prec", "p50 ms", "p95 ms", "spread", "img/s b1", *[f"img/s b{b}" for b in bs],
            "peak MB", "size MB", f"speed-up vs {ref}"]
    if has_map:
        head += ["mAP50-95", "mAP50"]
    out = []
    for r in res["rows"]:
        lat, thr = r["latency_ms"], {int(k): v for k, v in r["throughput"].items()}
        sp = f"{r['speedup_vs_first']:.2f}x"  # same engine and precision, against the first model
        row = [r["model"], "eager" if r["engine"] == "pytorch" else "ORT", r["precision"].upper(),
               f"{lat['p50']:.1f}", f"{lat['p95']:.1f}",
               "—" if lat.get("spread") is None else f"{100 * lat['spread']:.0f}%",
               _f(thr.get(1), ".1f"), *[_f(thr.get(b), ".1f") for b in bs],
               f"{r['peak_rss_mb']:.0f}", f"{r['size_mb']:.2f}", sp]
        if has_map:
            row += [_f(r.get("mAP50_95"), ".2f"), _f(r.get("mAP50"), ".2f")]
        out.append(row)
    return head, out


def format_table(res: dict) -> str:
    """Markdown table with a header line naming the CPU, threads, image size and versions."""
    head, rows = table_rows(res)
    v = res["versions"]
    lines = [f"CPU: {res['cpu']} · {res['threads']} thread{'s' if res['threads'] != 1 else ''} · imgsz "
             f"{res['imgsz']} · {res['runs']} runs after {res['warmup']} warm-up · torch {v.get('torch')}, "
             f"onnxruntime {v.get('onnxruntime')}",
             f"({res['what']}; peak MB: peak RSS of the measuring process; spread: interquartile range of the "
             "row's per-round medians, % of its p50, rows timed round-robin; speed-up: p50 ratio against the first "
             "model on the same engine and precision)", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    verdict = noise_line(res.get("noise"))
    if verdict:
        lines += ["", verdict]
    seen: dict[str, dict] = {}
    for r in res["rows"]:  # one line per model: its eager row when there is one (the checkpoint), else the first
        if r["model"] not in seen or r["engine"] == "pytorch":
            seen[r["model"]] = r
    lines += ["", f"| model | params M | GFLOPs @{res['imgsz']} | file MB |", "|---|---:|---:|---:|"]
    lines += [f"| {m} | {r['params'] / 1e6:.2f} | {format_gflops(r['gflops'])} | {r['size_mb']:.2f} |" for m, r in seen.items()]
    if res["notes"]:
        lines += [""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines)


def latency_entry(res: dict, model: str, engine: str = "pytorch", precision: str = "fp32") -> dict | None:
    """The ``latency_ms`` dict `detkd report` takes, for ``model`` (its name or path) on ``engine``/``precision``;
    with ``"noisy": True`` when the bench found the machine too noisy for its latencies to mean anything."""
    def same(a: str, b: str) -> bool:
        return a == b or Path(a).resolve() == Path(b).resolve()

    for r in res["rows"]:
        if r["engine"] == engine and r["precision"] == precision and (
                model == r["model"] or same(model, r["source"]) or same(model, r["path"])):
            out = dict(r["latency_ms"])
            if res.get("noise"):
                out["noisy"] = bool(res["noise"].get("noisy"))
            return out
    return None
