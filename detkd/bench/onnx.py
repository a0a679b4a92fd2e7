"""ONNX export of an Ultralytics detector and a numerical parity check of the export against PyTorch.

`export_onnx` runs Ultralytics' own exporter (``YOLO(pt).export(format="onnx", simplify=False, ...)``) offline:
with ``simplify=False`` the only requirement it checks is ``onnx`` (no ``onnxslim``, no ``onnxruntime``), and
`ensure_ultralytics_offline` sets ``YOLO_AUTOINSTALL=False`` / ``YOLO_OFFLINE=1``, so nothing is installed or
downloaded (the tests run the export with sockets disabled). The file is written to a private temporary
directory next to the target and moved into place with ``os.replace`` (atomic on one file system).

`onnx_parity` feeds the same letterboxed dataset images to the fused FP32 PyTorch model and to onnxruntime
and compares the decoded head output ``(B, 4 + nc, A)`` element by element; optionally it also evaluates both
files on a whole split with `detkd.eval.run.evaluate_model` (same pre-processing on both paths, see
`detkd.eval.predict`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detkd.errors import DataError
from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

__all__ = ["export_onnx", "onnx_parity", "load_detector", "letterboxed_batch", "ort_session", "RAW_TOL", "MAP_TOL_PTS"]

#: Raw-output tolerance of `onnx_parity`: ``max |y_pt - y_onnx| / max |y_pt|`` must not exceed this.
RAW_TOL = 1e-3
#: mAP tolerance of `onnx_parity`, in mAP points (0-100 scale): ``|mAP50-95(onnx) - mAP50-95(pt)| <= 0.1``.
MAP_TOL_PTS = 0.1


def _check_pt(weights: str | os.PathLike) -> Path:
    p = Path(weights)
    if not p.is_file():
        raise DataError(f"model file not found: {p}")
    if p.suffix.lower() != ".pt":
        raise DataError(f"{p}: expected an Ultralytics detection checkpoint (.pt), got '{p.suffix}'")
    from detkd.checkpoints import check_checkpoint

    return check_checkpoint(p, "model")  # a pickled payload is refused before anything is unpickled


def load_detector(weights: str | os.PathLike):
    """``ultralytics.YOLO`` for a detection ``.pt``; `DataError` naming the file when it is missing, is not an
    Ultralytics checkpoint, or holds a model for another task (classify, segment, pose, obb, ...)."""
    p = _check_pt(weights)
    ensure_ultralytics_offline()
    import torch
    from ultralytics import YOLO

    try:
        yolo = YOLO(str(p))
    except Exception as e:  # torch.load / pickle / Ultralytics format errors
        raise DataError(f"{p}: not a loadable Ultralytics checkpoint ({type(e).__name__}: {e})") from e
    # Check the architecture, not only Ultralytics' task guess: a checkpoint without train_args reports 'detect'.
    from ultralytics.nn.modules import OBB, Detect, Pose, Segment

    layers = getattr(yolo.model, "model", None)
    head = layers[-1] if isinstance(layers, (torch.nn.Sequential, torch.nn.ModuleList)) and len(layers) else None
    is_det = isinstance(head, Detect) and not isinstance(head, (Segment, Pose, OBB))
    if yolo.task != "detect" or not is_det:
        what = type(head).__name__ if head is not None else type(yolo.model).__name__
        raise DataError(f"{p}: a '{yolo.task}' task model whose last layer is {what}; only detection models "
                        "(a Detect head) can be exported and benchmarked")  # fmt: skip
    return yolo


def export_onnx(
    weights: str | os.PathLike,
    imgsz: int,
    out: str | os.PathLike | None = None,
    *,
    dynamic: bool = True,
    opset: int | None = None,
    progress: bool = True,
) -> Path:
    """Export an Ultralytics detection ``.pt`` to ONNX (FP32, CPU) and return the ``.onnx`` path.

    Calls ``YOLO(weights).export(format="onnx", imgsz=imgsz, simplify=False, dynamic=dynamic, opset=opset,
    device="cpu")``. Input ``images (B, 3, H, W)`` float RGB in [0, 1]; output ``output0`` is the decoded head
    ``(B, 4 + nc, A)`` (xywh in input pixels, sigmoid class scores), to be followed by NMS. ``nms`` is left at
    Ultralytics' default (None: external NMS), so YOLO26 / v10 heads export their one-to-many branch, the
    same branch Ultralytics' own PyTorch ``predict`` / ``val`` use by default. With ``dynamic=True`` (default)
    batch, height and width are symbolic (any batch size works; anchors are built in the graph from the
    feature-map shapes); with ``dynamic=False`` the model is fixed to ``(1, 3, imgsz, imgsz)``. ``opset``
    defaults to Ultralytics' choice (18 with torch 2.x), which onnxruntime's static quantization accepts (it
    rejects >= 21). The Ultralytics metadata (names, stride, imgsz, ...) is kept in the file.

    Args:
        weights: Ultralytics detection checkpoint (``.pt``).
        imgsz: square export size (also the tracing size of a dynamic export).
        out: output path; default ``<weights without .pt>.onnx`` next to the weights. Written atomically.
        dynamic, opset: as above.
        progress: let Ultralytics log the export (False: its logger is set to WARNING meanwhile).

    Raises:
        DataError: missing file, not an Ultralytics checkpoint, or not a detection model.
    """
    yolo = load_detector(weights)
    p = Path(weights)
    target = Path(out) if out is not None else p.with_suffix(".onnx")
    target.parent.mkdir(parents=True, exist_ok=True)
    import torch

    threads = torch.get_num_threads()  # Ultralytics' select_device('cpu') changes the global thread count
    logger = logging.getLogger("ultralytics")
    level = logger.level
    if not progress:
        logger.setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix=".detkd-export-", dir=target.parent))
    try:
        # The exporter names its output after model.pt_path: point it into the private directory so that an
        # existing <stem>.onnx next to the weights is never half-overwritten.
        yolo.model.pt_path = str(tmp / "model.pt")
        extra = {"opset": int(opset)} if opset else {}
        f = yolo.export(
            format="onnx", imgsz=int(imgsz), simplify=False, dynamic=bool(dynamic), device="cpu", batch=1,
            verbose=bool(progress), **extra,
        )  # fmt: skip
        if not f or not Path(f).is_file():
            raise RuntimeError(f"Ultralytics ONNX export of {p} produced no file")
        os.replace(f, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(threads)
        logger.setLevel(level)
    return target


# --------------------------------------------------------------------------------------------------
# shared helpers (also used by detkd.bench.quantize)
# --------------------------------------------------------------------------------------------------
def _read_bgr(path: str) -> np.ndarray:
    import cv2

    im = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)  # as detkd.eval.predict / Ultralytics
    if im is None:
        raise DataError(f"cannot read image {path}")
    return im


def letterboxed_batch(files: Sequence[str | os.PathLike], imgsz: int) -> np.ndarray:
    """Images -> ``(N, 3, imgsz, imgsz)`` float32 RGB in [0, 1], pre-processed exactly like
    `detkd.eval.predict.predict_onnx`: `letterbox` (``auto=False``, pad 114), BGR -> RGB, ``/255``."""
    from detkd.eval.predict import letterbox

    x = np.stack([letterbox(_read_bgr(str(f)), int(imgsz))[..., ::-1].transpose(2, 0, 1) for f in files])
    return np.ascontiguousarray(x).astype(np.float32) / np.float32(255)


def ort_session(onnx_path: str | os.PathLike, threads: int | None = None):
    """onnxruntime ``InferenceSession`` on the CPU provider; ``threads`` sets intra-op threads (inter-op 1)."""
    import onnxruntime as ort

    p = Path(onnx_path)
    if not p.is_file():
        raise DataError(f"ONNX file not found: {p}")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    return ort.InferenceSession(str(p), sess_options=so, providers=["CPUExecutionProvider"])


def _sample_files(data_yaml: str | os.PathLike, split: str, n: int | None, seed: int) -> list[str]:
    """``n`` image files of ``split`` (all when ``n`` is None or >= the split size), a seeded sample kept in
    dataset order."""
    from detkd.data.formats import read_dataset

    files = [r.file for r in read_dataset(data_yaml, split).images]
    if not files:
        raise DataError(f"{data_yaml}: split '{split}' has no images")
    if n is not None and n < len(files):
        idx = np.sort(np.random.default_rng(seed).choice(len(files), size=int(n), replace=False))
        files = [files[i] for i in idx]
    return files


def _map_pts(metrics: dict) -> tuple[float, float]:
    """(mAP50-95, mAP50) in mAP points (0-100) from an `evaluate_model` dict (fractions)."""
    return 100.0 * float(metrics["AP"]), 100.0 * float(metrics["AP50"])


# --------------------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------------------
def onnx_parity(
    weights: str | os.PathLike,
    onnx_path: str | os.PathLike,
    data_yaml: str | os.PathLike,
    imgsz: int,
    *,
    n_images: int = 16,
    split: str = "val",
    threads: int | None = None,
    map_check: bool = True,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Compare an ONNX export with its PyTorch checkpoint on real dataset images.

    Raw check: the first ``n_images`` images of ``split`` (dataset order), letterboxed to ``imgsz`` like
    `predict_onnx`, ``x (N, 3, imgsz, imgsz)``, go through (a) the Ultralytics model loaded with
    ``load_checkpoint`` (head branch set to the export's ``end2end`` metadata, then Conv+BN fused) in eval mode,
    float32, ``torch.inference_mode``, batches of 4, taking output ``[0]`` (decoded ``(N, 4 + nc, A)``), and
    (b) onnxruntime (one run per image, batch 1, so a fixed-batch export works too). With
    ``d = |y_pt - y_onnx|`` elementwise:

    * ``max_abs_diff = max d``; ``max_abs_diff_boxes_px`` / ``max_abs_diff_scores`` over the 4 box rows
      (xywh, input pixels) and the ``nc`` score rows (probabilities) of a ``(N, 4 + nc, A)`` output;
    * ``max_rel_diff = max d / max(|y_pt|, 1e-3)`` (elementwise; magnitudes floored at 1e-3 so tiny scores
      cannot blow it up);
    * ``max_diff_over_scale = max d / max |y_pt|``; ``raw_ok`` is ``max_diff_over_scale <= RAW_TOL`` (1e-3).

    mAP check (``map_check``): `evaluate_model` on the whole ``split`` for the ``.pt`` and the ``.onnx`` (same
    letterbox, conf 0.001, IoU 0.7), reported in **mAP points (0-100)**: ``pt_map50_95_pts``,
    ``onnx_map50_95_pts``, ``delta_map50_95_pts = onnx - pt`` (and the same for mAP50);
    ``map_ok = |delta_map50_95_pts| <= MAP_TOL_PTS`` (0.1 point = 0.001 as a fraction).
    ``ok = raw_ok and map_ok`` (``map_ok`` is None and ignored without the mAP check).

    Args:
        weights: the Ultralytics ``.pt``; onnx_path: its export; data_yaml: a dataset `read_dataset` reads.
        imgsz: input size (must match a fixed-shape export). n_images: images for the raw comparison.
        split: dataset split. threads: torch and onnxruntime intra-op threads (default: unchanged).
        out_dir: where the two evaluations write (default ``<onnx dir>/parity_<onnx stem>``).
        progress: tqdm bars of the evaluations.
    """
    import torch

    p = _check_pt(weights)
    load_detector(p)  # clear error for a non-detection / foreign checkpoint
    from ultralytics.nn.tasks import load_checkpoint

    sess = ort_session(onnx_path, threads)
    files = _sample_files(data_yaml, split, None, 0)[: max(int(n_images), 1)]
    x = letterboxed_batch(files, imgsz)

    prev = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(int(threads))
        model, _ = load_checkpoint(str(p), fuse=False)
        meta = sess.get_modelmeta().custom_metadata_map or {}
        if hasattr(model, "end2end"):  # pick the head branch the export used (one-to-many unless end2end)
            model.end2end = str(meta.get("end2end", "False")) == "True"
        model = model.fuse(verbose=False) if hasattr(model, "fuse") else model
        model.float().eval()
        outs = []
        with torch.inference_mode():
            for s in range(0, len(x), 4):  # chunks of 4 images bound the memory of large models
                y = model(torch.from_numpy(x[s : s + 4]))
                outs.append((y[0] if isinstance(y, (list, tuple)) else y).float().numpy())
        y_pt = np.concatenate(outs)
    finally:
        torch.set_num_threads(prev)
    name = sess.get_inputs()[0].name
    y_ox = np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))]).astype(np.float32)
    if y_ox.shape != y_pt.shape:
        raise RuntimeError(f"output shapes differ: PyTorch {y_pt.shape} vs ONNX {y_ox.shape} ({onnx_path})")

    d = np.abs(y_pt.astype(np.float64) - y_ox.astype(np.float64))
    ref = np.abs(y_pt.astype(np.float64))
    scale = float(ref.max()) if ref.size else 0.0
    res: dict[str, Any] = {
        "weights": str(p),
        "onnx": str(onnx_path),
        "imgsz": int(imgsz),
        "split": split,
        "n_images": len(files),
        "output_shape": list(y_pt.shape),
        "max_abs_diff": float(d.max()),
        "max_rel_diff": float((d / np.maximum(ref, 1e-3)).max()),
        "max_diff_over_scale": float(d.max() / scale) if scale > 0 else float(d.max()),
        "output_scale": scale,
        "raw_tolerance_over_scale": RAW_TOL,
    }
    head = model.model[-1] if hasattr(model, "model") else None
    nc = getattr(head, "nc", None)
    if nc is not None and not getattr(head, "end2end", False) and y_pt.ndim == 3 and y_pt.shape[1] == 4 + nc:
        res["max_abs_diff_boxes_px"] = float(d[:, :4].max())
        res["max_abs_diff_scores"] = float(d[:, 4:].max()) if nc else 0.0
    res["raw_ok"] = bool(res["max_diff_over_scale"] <= RAW_TOL)

    res["map_ok"] = None
    if map_check:
        from detkd.eval.run import evaluate_model

        out = Path(out_dir) if out_dir else Path(onnx_path).parent / f"parity_{Path(onnx_path).stem}"
        kw = {"split": split, "imgsz": int(imgsz), "threads": threads, "voc": False, "progress": progress}
        prev = torch.get_num_threads()  # evaluate_model / Ultralytics' predict change the global thread count
        try:
            m_pt = evaluate_model(p, data_yaml, out_dir=out / "pt", **kw)
            m_ox = evaluate_model(onnx_path, data_yaml, out_dir=out / "onnx", **kw)
        finally:
            torch.set_num_threads(prev)
        (a_pt, a50_pt), (a_ox, a50_ox) = _map_pts(m_pt), _map_pts(m_ox)
        res.update({
            "pt_map50_95_pts": a_pt, "onnx_map50_95_pts": a_ox, "delta_map50_95_pts": a_ox - a_pt,
            "pt_map50_pts": a50_pt, "onnx_map50_pts": a50_ox, "delta_map50_pts": a50_ox - a50_pt,
            "map_tolerance_pts": MAP_TOL_PTS, "map_ok": bool(abs(a_ox - a_pt) <= MAP_TOL_PTS), "out_dir": str(out),
        })  # fmt: skip
    res["ok"] = bool(res["raw_ok"] and res["map_ok"] is not False)
    return res
