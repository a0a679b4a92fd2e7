"""Static INT8 quantization of an Ultralytics ONNX export with onnxruntime, and its accuracy report.

`quantize_int8` = ``quant_pre_process`` (ONNX shape inference + onnxruntime's basic graph optimisations:
constant folding, Identity removal; without it the biases an export shares through ``Identity`` nodes are
left unquantized; symbolic shape inference is skipped, it fails on the in-graph anchor arithmetic of a dynamic
export) -> ``quantize_static`` in QDQ format, calibrated on a seeded sample of letterboxed training images
(batch 1, `detkd.bench.onnx.letterboxed_batch`, i.e. exactly the pre-processing of
`detkd.eval.predict.predict_onnx`).

Data types (defaults): weights ``QInt8``, symmetric, per output channel, 7-bit range (``reduce_range=True``);
activations ``QUInt8``, asymmetric. Why, measured on an AMD EPYC (Zen 3: AVX2, no AVX-512, no VNNI), one
onnxruntime thread, a trained YOLOv8n at 192 px (FP32 ONNX p50 11.8 ms):

* u8 activations x s8 weights is what the MLAS integer kernels are built for on x86 (onnxruntime's own CPU
  advice): 7.8 ms. Signed int8 activations (onnxruntime's generic default) ran at 19.4 ms, slower than FP32.
* Without VNNI, the AVX2 u8s8 kernel (``vpmaddubsw``) adds pairs of u8 x s8 products in int16 and saturates
  when both weights of a pair are near +-127 (onnxruntime quantization guide). Per-channel scales put every
  channel's largest weight at +-127, so it bites: 8-bit per-channel weights gave box errors vs FP32 of p99
  8.4 px, 7-bit weights 3.1 px (s8 activations, which do not saturate: 2.8 px), at the same speed. A 7-bit
  model is also safe on whatever CPU it is deployed to; pass ``reduce_range=False`` for a VNNI-only target.

Which nodes stay FP32 (``exclude="auto"``), the rule: Ultralytics names every exported node after the module
that produced it (``/model.<i>/<submodule path>/<Op>_<k>``) and the detection head is the last module ``i``.
Left in FP32 are all nodes of that last module **except** its learned convolution branches
(``cv2.<level>/``, ``cv3.<level>/``, ``cv4.<level>/``, ``one2one_cv2.<level>/``, ...), i.e. the box decoding:
the DFL (Reshape, Transpose, Softmax and the fixed 0..reg_max-1 1x1 Conv), the anchor / stride arithmetic
(Range, Expand, Add, Sub, Mul, Div on anchor points), the per-level Reshape + Concat, the Sigmoid of the class
scores and the final Concat into ``output0`` (plus TopK / Gather of end-to-end heads). One INT8 scale cannot
cover both box pixels (0..imgsz) and probabilities (0..1), and the DFL expectation is sensitive to rounding of
its softmax. The branch convolutions (the head's learned weights, most of its FLOPs) stay quantized; their
outputs, the box-distribution and class logits, are quantized per tensor before they enter the FP32 decode.
The rule uses names, not node indices, so it applies to v8 / 11 / 26 exports alike. ``exclude="head"``
additionally keeps the branch convolutions in FP32 (the whole last module).

Measured (demo data, 150 val images, 192 px, 300 calibration images, defaults otherwise; mAP50-95 in points):
YOLOv8n FP32 8.91 -> INT8 8.81 with ``"auto"``, 8.76 with ``"head"``, 0.00 with nothing excluded (every score
rounds to 0); calibration minmax 8.81 / percentile 8.87 / entropy 8.62; Conv-only quantization (Ultralytics'
choice) 8.70 and slower (float SiLU between Q/DQ pairs). The pico student: 1.97 -> 1.84 with ``"auto"``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any


from detkd.errors import ConfigError, DataError

__all__ = ["quantize_int8", "int8_report", "head_decode_nodes", "CalibrationReader", "METHODS", "MAX_DROP_PTS"]

#: Calibration methods: name -> ``onnxruntime.quantization.CalibrationMethod`` member name.
METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
#: `int8_report` flags an INT8 model whose mAP50-95 is lower than its FP32 export's by more than this (points).
MAX_DROP_PTS = 1.0

_MODULE = re.compile(r"^/model\.(\d+)/")
_BRANCH = r"(?:one2one_)?cv\d+\.\d+/"  # learned conv branches of Detect / Segment / Pose / OBB / v10 / 26 heads


def head_decode_nodes(model, scope: str = "decode") -> list[str]:
    """Names of the nodes of an Ultralytics export's detection head to keep in FP32 (see module docstring).

    Args:
        model: ``onnx.ModelProto`` or a path.
        scope: ``"decode"`` — the head's post-processing (everything in the last ``/model.<i>/`` module outside
            its ``cv*.<level>/`` branches); ``"head"`` — every node of that module.

    Raises:
        ConfigError: no node is named ``/model.<i>/...`` (not an Ultralytics export, or renamed by a simplifier).
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    ids = [int(m.group(1)) for n in model.graph.node if (m := _MODULE.match(n.name))]
    if not ids:
        raise ConfigError(
            "exclude='auto': no node named '/model.<i>/...' in the graph, so the detection head cannot be found "
            "(not an Ultralytics export?); pass exclude=[node names] or exclude=None"
        )
    prefix = f"/model.{max(ids)}/"
    if scope == "head":
        return [n.name for n in model.graph.node if n.name.startswith(prefix) and n.op_type != "Constant"]
    if scope != "decode":
        raise ConfigError(f"head_decode_nodes scope={scope!r}: use 'decode' or 'head'")
    branch = re.compile(re.escape(prefix) + _BRANCH)
    return [n.name for n in model.graph.node
            if n.name.startswith(prefix) and not branch.match(n.name) and n.op_type != "Constant"]  # fmt: skip


def _summarise(model, names: Sequence[str]) -> str:
    """``"/model.22: Reshape x12, Concat x9, ...; /model.22/dfl: Softmax x1, ..."`` — the op types of ``names``
    grouped by the module path of each node (its name without the last component)."""
    ops = {n.name: n.op_type for n in model.graph.node}
    by_mod: dict[str, Counter] = {}
    for name in names:
        by_mod.setdefault(name.rsplit("/", 1)[0] or "/", Counter())[ops.get(name, "?")] += 1
    return "; ".join(f"{mod}: " + ", ".join(f"{k} x{v}" for k, v in c.most_common()) for mod, c in by_mod.items())


class CalibrationReader:
    """onnxruntime ``CalibrationDataReader`` over image files: one letterboxed image per ``get_next`` (batch 1),
    ``{input_name: (1, 3, imgsz, imgsz) float32}``. Supports ``set_range`` (onnxruntime's strided calibration,
    which bounds the memory of the histogram calibrators) and ``rewind``."""

    def __init__(self, files: Sequence[str], imgsz: int, input_name: str = "images", progress: bool = True):
        from tqdm import tqdm

        self.files, self.imgsz, self.input_name = list(files), int(imgsz), input_name
        self.start, self.end, self.i = 0, len(self.files), 0
        self.bar = tqdm(total=len(self.files), desc="calibrate", unit="img", disable=not progress, dynamic_ncols=True)

    def __len__(self) -> int:
        return len(self.files)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.i = int(start_index), min(int(end_index), len(self.files)), int(start_index)

    def rewind(self) -> None:
        self.start, self.end, self.i = 0, len(self.files), 0

    def get_next(self) -> dict | None:
        from detkd.bench.onnx import letterboxed_batch

        if self.i >= self.end:
            return None
        x = letterboxed_batch([self.files[self.i]], self.imgsz)
        self.i += 1
        self.bar.update(1)
        return {self.input_name: x}

    def __iter__(self):
        return self

    def __next__(self):
        r = self.get_next()
        if r is None:
            raise StopIteration
        return r

    def close(self) -> None:
        self.bar.close()


def _stride(n: int, cap: int = 16) -> int:
    """Largest divisor of ``n`` not above ``cap`` (onnxruntime's strided calibration needs an exact divisor)."""
    return max(d for d in range(1, min(cap, n) + 1) if n % d == 0)


def quantize_int8(
    onnx_path: str | os.PathLike,
    data_yaml: str | os.PathLike,
    imgsz: int,
    out: str | os.PathLike | None = None,
    *,
    n_calib: int = 300,
    split: str = "train",
    method: str = "minmax",
    per_channel: bool = True,
    exclude: str | Sequence[str] | None = "auto",
    seed: int = 0,
    activations: str = "uint8",
    reduce_range: bool = True,
    op_types: Sequence[str] | None = None,
    preprocess: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize an FP32 Ultralytics ONNX export to static INT8 (QDQ) with onnxruntime.

    Calibration: ``n_calib`` images of ``split`` drawn without replacement with ``numpy.random.default_rng(seed)``
    (all of them when the split is smaller), letterboxed to ``imgsz``, fed one at a time; activation ranges from
    ``method``: ``"minmax"`` (running min / max), ``"entropy"`` (KL-divergence threshold, TensorRT style) or
    ``"percentile"`` (99.999th percentile of |x|). Calibration runs in strides of <= 16 images so the
    histogram methods keep at most 16 images' activations in memory.

    Args:
        onnx_path: FP32 export (`detkd.bench.onnx.export_onnx`). data_yaml: dataset for calibration images.
        imgsz: calibration input size (the size the model will run at).
        out: output path; default ``<onnx without .onnx>.int8.onnx``. Written atomically.
        per_channel: per-output-channel weight scales (default True; per-tensor loses accuracy on the
            BN-folded YOLO convs whose channel ranges differ a lot).
        exclude: ``"auto"`` — keep the head's box decoding in FP32 (rule in the module docstring);
            ``"head"`` — the whole last module (decode and the cv2/cv3 branch convs); a list of node names;
            None — quantize everything onnxruntime supports.
        seed: calibration sample seed.
        activations: ``"uint8"`` (default; asymmetric, fast on x86, see module docstring) or ``"int8"``
            (onnxruntime's generic default, suited to ARM; about 2.5x slower than uint8 on the x86 CPU measured).
        reduce_range: 7-bit weights (default True: onnxruntime's remedy for u8s8 saturation on x86 CPUs
            without VNNI, see module docstring).
        op_types: op types to quantize (default: all onnxruntime supports, e.g. Conv, Add, Mul, Sigmoid, Concat,
            MaxPool, Resize, Split); ``["Conv"]`` quantizes only the convolutions (Ultralytics' own choice).
        preprocess: run ``quant_pre_process`` first (recommended by onnxruntime; node names are preserved).
        progress: tqdm bar over calibration images.

    Returns:
        ``{"path", "excluded_nodes" (names left FP32), "excluded_summary" (module: op counts), "exclude_rule",
        "n_calib", "method", "split", "seed", "imgsz", "per_channel", "activations", "weights": "int8",
        "reduce_range", "format": "QDQ", "op_types", "preprocessed", "n_quantized_tensors", "fp32_bytes",
        "int8_bytes"}``.
        The same information (minus the path) is stored in the file's metadata under ``detkd_quantization``.

    Raises:
        DataError: missing ONNX file or a split without images. ConfigError: bad method / exclude / activations.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    from detkd.bench.onnx import _sample_files

    src = Path(onnx_path)
    if not src.is_file():
        raise DataError(f"ONNX file not found: {src}")
    if method not in METHODS:
        raise ConfigError(f"quantize method={method!r}: use one of {sorted(METHODS)}")
    if activations not in ("uint8", "int8"):
        raise ConfigError(f"quantize activations={activations!r}: use 'uint8' or 'int8'")
    if int(n_calib) < 1:
        raise ConfigError(f"quantize n_calib={n_calib}: need at least 1 calibration image")
    target = Path(out) if out is not None else src.with_name(f"{src.stem}.int8.onnx")
    target.parent.mkdir(parents=True, exist_ok=True)
    files = _sample_files(data_yaml, split, int(n_calib), seed)

    fp32 = onnx.load(str(src))
    tmp = Path(tempfile.mkdtemp(prefix=".detkd-int8-", dir=target.parent))
    try:
        model_in, preprocessed = src, False
        if preprocess:
            # Symbolic shape inference gives up on the in-graph anchor arithmetic of a dynamic export, so only
            # ONNX shape inference and onnxruntime's basic optimisations run.
            pre = tmp / "pre.onnx"
            try:
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
                model_in, preprocessed = pre, True
            except Exception as e:  # quantizing the raw export still works; say so
                warnings.warn(f"quant_pre_process failed on {src} ({type(e).__name__}: {e}); quantizing it as is")
        model = onnx.load(str(model_in))
        names = {n.name for n in model.graph.node}
        if isinstance(exclude, str):
            if exclude not in ("auto", "head"):
                raise ConfigError(f"quantize exclude={exclude!r}: use 'auto', 'head', a list of node names or None")
            excluded = head_decode_nodes(model, "decode" if exclude == "auto" else "head")
        elif exclude is None:
            excluded = []
        else:
            excluded = [str(e) for e in exclude]
            unknown = [e for e in excluded if e not in names]
            if unknown:
                import difflib

                hint = difflib.get_close_matches(unknown[0], sorted(names), n=3)
                raise ConfigError(f"quantize exclude: node(s) {unknown[:5]} not in the (pre-processed) graph of {src}" +
                                  (f"; did you mean {hint}?" if hint else ""))  # fmt: skip
        inp = model.graph.input[0].name
        reader = CalibrationReader(files, imgsz, inp, progress)
        q_tmp = tmp / "int8.onnx"
        try:  # onnxruntime prints calibration chatter to stdout; the tqdm bar (stderr) shows progress
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(model_in), str(q_tmp), reader,
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(op_types) if op_types else None,
                    per_channel=bool(per_channel),
                    reduce_range=bool(reduce_range),
                    activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded,
                    calibrate_method=getattr(CalibrationMethod, METHODS[method]),
                    extra_options={"CalibStridedMinMax": _stride(len(files))},
                )  # fmt: skip
        finally:
            reader.close()
        qm = onnx.load(str(q_tmp))
        info: dict[str, Any] = {
            "excluded_nodes": excluded,
            "excluded_summary": _summarise(model, excluded),
            "exclude_rule": exclude if isinstance(exclude, str) or exclude is None else "list",
            "n_calib": len(files), "method": method, "split": split, "seed": int(seed), "imgsz": int(imgsz),
            "per_channel": bool(per_channel), "activations": activations, "weights": "int8",
            "reduce_range": bool(reduce_range), "format": "QDQ", "op_types": list(op_types) if op_types else "all",
            "preprocessed": preprocessed,
            "n_quantized_tensors": sum(n.op_type == "QuantizeLinear" for n in qm.graph.node),
        }  # fmt: skip
        # keep the export's metadata (names, stride, imgsz, ... read by predict_onnx) and record ours
        have = {p.key for p in qm.metadata_props}
        for p in fp32.metadata_props:
            if p.key not in have:
                qm.metadata_props.add(key=p.key, value=p.value)
        for p in list(qm.metadata_props):
            if p.key == "detkd_quantization":
                qm.metadata_props.remove(p)
        qm.metadata_props.add(key="detkd_quantization", value=json.dumps(info))
        onnx.save(qm, str(q_tmp))
        os.replace(q_tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"path": str(target), **info, "fp32_bytes": src.stat().st_size, "int8_bytes": target.stat().st_size}


def int8_report(
    fp32_onnx: str | os.PathLike,
    int8_onnx: str | os.PathLike,
    data_yaml: str | os.PathLike,
    imgsz: int,
    threads: int | None = None,
    *,
    split: str = "val",
    out_dir: str | os.PathLike | None = None,
    max_drop_pts: float = MAX_DROP_PTS,
    progress: bool = True,
) -> dict[str, Any]:
    """mAP of an FP32 export and its INT8 model on ``split`` (`evaluate_model`, same letterbox / NMS settings),
    in **mAP points (0-100)**: ``fp32_map50_95_pts``, ``int8_map50_95_pts``, ``drop_map50_95_pts = fp32 - int8``
    (positive = INT8 is worse) and the same for mAP50. ``ok = drop_map50_95_pts <= max_drop_pts`` (1.0); when
    not ok, ``warning`` is a sentence naming the layers left in FP32 (read from the INT8 file's
    ``detkd_quantization`` metadata)."""
    import onnx

    from detkd.bench.onnx import _map_pts
    from detkd.eval.run import evaluate_model

    f32, i8 = Path(fp32_onnx), Path(int8_onnx)
    for p in (f32, i8):
        if not p.is_file():
            raise DataError(f"ONNX file not found: {p}")
    out = Path(out_dir) if out_dir else i8.parent / f"int8_report_{i8.stem}"
    kw = {"split": split, "imgsz": int(imgsz), "threads": threads, "voc": False, "progress": progress}
    (a32, a50_32), (a8, a50_8) = (_map_pts(evaluate_model(p, data_yaml, out_dir=out / tag, **kw))
                                  for p, tag in ((f32, "fp32"), (i8, "int8")))  # fmt: skip
    meta = {p.key: p.value for p in onnx.load(str(i8), load_external_data=False).metadata_props}
    q = json.loads(meta.get("detkd_quantization", "{}"))
    drop = a32 - a8
    res: dict[str, Any] = {
        "fp32": str(f32), "int8": str(i8), "split": split, "imgsz": int(imgsz),
        "fp32_map50_95_pts": a32, "int8_map50_95_pts": a8, "drop_map50_95_pts": drop,
        "fp32_map50_pts": a50_32, "int8_map50_pts": a50_8, "drop_map50_pts": a50_32 - a50_8,
        "max_drop_pts": float(max_drop_pts), "ok": bool(drop <= max_drop_pts),
        "excluded_summary": q.get("excluded_summary"), "out_dir": str(out),
    }  # fmt: skip
    if not res["ok"]:
        kept = q.get("excluded_summary") or "none recorded"
        res["warning"] = (
            f"INT8 loses {drop:.2f} mAP50-95 points ({a32:.2f} -> {a8:.2f}) on '{split}', more than {max_drop_pts:g}; "
            f"left in FP32: {kept}. Try exclude='head', method='percentile' or 'entropy', or more calibration images."
        )
    return res
