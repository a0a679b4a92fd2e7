"""CPU latency, throughput and peak memory of one detector on one engine.

What is timed: the model's forward pass on a ``(B, 3, imgsz, imgsz)`` float32 tensor (PyTorch eager, fused
Conv+BN, ``inference_mode``) or the same array through an onnxruntime ``InferenceSession`` (CPU provider,
all graph optimisations). Letterboxing and NMS are not included: they are the same for every model of a
comparison and would blur the model-to-model ratio.

- latency: ``runs`` single-image forwards after ``warmup`` untimed ones; p50 / p95 / mean / min in ms.
- throughput: for each batch size, images per second = B / median time of one batch forward.
- memory: peak resident set size of the process (``ru_maxrss``) and its growth over the process's RSS just
  before the model was loaded (run each measurement in a fresh process, as `detkd.bench.run` does, for a peak
  that belongs to one model).

The thread count is set for the measurement (``torch.set_num_threads`` / ORT ``intra_op_num_threads``, one
inter-op thread) and restored afterwards; it and the CPU model are part of every result.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from detkd.errors import DataError

ENGINES = ("pytorch", "onnxruntime")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover - psutil ships with Ultralytics
        return float("nan")


def _peak_rss_mb() -> float:
    """Peak resident memory of this process, MiB. On Linux ``VmHWM`` (reset by ``exec``: a worker started by a
    big parent reports its own peak; ``ru_maxrss`` keeps the parent's from before the ``exec``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 2**10  # bytes on macOS, KiB on Linux


def model_format(path: str | os.PathLike) -> str:
    """``"ultralytics"`` for an Ultralytics ``.pt``, ``"onnx"`` for ``.onnx``; a clear `DataError` otherwise."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"model file not found: {p}")
    suf = p.suffix.lower()
    if suf == ".onnx":
        return "onnx"
    if suf == ".pt":
        from detkd.bench.onnx import load_detector  # the one detection-checkpoint check (Detect head, task)

        try:
            load_detector(p)
        except DataError as e:
            raise DataError(f"{p}: not an Ultralytics detection checkpoint ({e}). detkd bench reads Ultralytics .pt "
                            "files and ONNX files; export other PyTorch detectors with torch.onnx.export and bench "
                            "the .onnx") from None
        return "ultralytics"
    raise DataError(f"{p}: unsupported model file '{suf}' (expected an Ultralytics .pt or an .onnx)")


def onnx_precision(path: str | os.PathLike) -> str:
    """``"int8"`` when the graph holds quantize / QLinear / integer ops, ``"fp16"`` for a float16 input, else ``"fp32"``."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in m.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul"}:
        return "int8"
    inp = [i for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]
    if inp and inp[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
        return "fp16"
    return "fp32"


# ---------------------------------------------------------------------------------------------------------
# runners: f(x: np.ndarray (B, 3, H, W) float32) -> None
# ---------------------------------------------------------------------------------------------------------
def torch_runner(weights: str | os.PathLike, threads: int) -> tuple[Callable[[np.ndarray], None], dict]:
    """An Ultralytics ``.pt`` loaded fused, float32, eval; forward under ``inference_mode``."""
    import torch

    from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

    ensure_ultralytics_offline()
    from ultralytics.nn.tasks import load_checkpoint

    torch.set_num_threads(threads)
    model, _ = load_checkpoint(str(weights), fuse=True)
    model.float().eval()

    def run(x: np.ndarray) -> None:
        with torch.inference_mode():
            model(torch.from_numpy(x))

    return run, {"engine": "pytorch", "precision": "fp32", "batch_dynamic": True}


def ort_runner(onnx_path: str | os.PathLike, threads: int) -> tuple[Callable[[np.ndarray], None], dict]:
    """`detkd.bench.onnx.ort_session`: CPU provider, ``threads`` intra-op threads, one inter-op thread."""
    from detkd.bench.onnx import ort_session

    try:
        sess = ort_session(onnx_path, threads)
    except Exception as e:  # noqa: BLE001 - onnxruntime's load errors are about the user's file
        raise DataError(f"{onnx_path}: onnxruntime cannot load it ({type(e).__name__}: {e})") from None
    inp = sess.get_inputs()[0]
    dtype = np.float16 if "float16" in inp.type else np.float32
    b_dim = inp.shape[0]

    def run(x: np.ndarray) -> None:
        sess.run(None, {inp.name: x.astype(dtype, copy=False)})

    return run, {"engine": "onnxruntime", "precision": onnx_precision(onnx_path),
                 "batch_dynamic": not isinstance(b_dim, int), "fixed_batch": b_dim if isinstance(b_dim, int) else None}


def _times_ms(fn: Callable[[np.ndarray], None], x: np.ndarray, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn(x)
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn(x)
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def _pct(v: Sequence[float], q: float) -> float:
    """The ``q`` quantile with linear interpolation (numpy's default), e.g. p95 of 50 runs."""
    return float(np.percentile(np.asarray(v, dtype=np.float64), q))


def measure(path: str | os.PathLike, engine: str, imgsz: int, threads: int = 1, *, batch_sizes: Sequence[int] = (1,),
            runs: int = 50, warmup: int = 10) -> dict:
    """Latency (batch 1), throughput (each of ``batch_sizes``) and peak memory of ``path`` on ``engine``.

    Returns ``{"p50", "p95", "mean", "min" (ms per image at batch 1), "throughput": {B: images/s},
    "peak_rss_mb", "model_rss_mb" (peak minus the RSS before loading), "engine", "precision", "threads",
    "imgsz", "runs", "warmup", "cpu", "skipped": [why a batch size was not run]}``.
    """
    if engine not in ENGINES:
        raise DataError(f"unknown engine '{engine}'; choose from {list(ENGINES)}")
    if runs < 1 or warmup < 0 or threads < 1:
        raise DataError(f"runs ({runs}) and threads ({threads}) must be >= 1 and warmup ({warmup}) >= 0")
    import torch

    prev = torch.get_num_threads()
    base = _rss_mb()
    try:
        fn, meta = (torch_runner if engine == "pytorch" else ort_runner)(path, threads)
        rng = np.random.default_rng(0)
        x1 = rng.random((1, 3, imgsz, imgsz), dtype=np.float32)
        lat = _times_ms(fn, x1, runs, warmup)
        thr, skipped = {}, []
        for b in batch_sizes:
            b = int(b)
            if b < 1:
                raise DataError(f"batch sizes must be >= 1, got {b}")
            if not meta.get("batch_dynamic", True) and b != meta.get("fixed_batch"):
                skipped.append(f"batch {b}: the ONNX model has a fixed batch of {meta.get('fixed_batch')} "
                               "(export with dynamic=True)")
                continue
            if b == 1:
                thr[1] = 1000.0 / statistics.median(lat)
                continue
            xb = rng.random((b, 3, imgsz, imgsz), dtype=np.float32)
            tb = _times_ms(fn, xb, max(3, runs // b), max(1, warmup // b))
            thr[b] = b * 1000.0 / statistics.median(tb)
    finally:
        torch.set_num_threads(prev)
    peak = _peak_rss_mb()
    return {"p50": statistics.median(lat), "p95": _pct(lat, 95), "mean": statistics.fmean(lat), "min": min(lat),
            "throughput": thr, "peak_rss_mb": peak, "model_rss_mb": peak - base, "engine": meta["engine"],
            "precision": meta["precision"], "threads": int(threads), "imgsz": int(imgsz), "runs": int(runs),
            "warmup": int(warmup), "cpu": cpu_model(), "skipped": skipped}


def torch_latency(weights: str | Path, imgsz: int, threads: int = 1, runs: int = 30, warmup: int = 5) -> dict:
    """Eager PyTorch FP32 latency of one ``imgsz`` image (fused Conv+BN, inference mode), in milliseconds:
    ``{"p50", "p95", "runs", "threads", "imgsz", "engine", "cpu"}`` (the form `detkd report` takes)."""
    r = measure(weights, "pytorch", imgsz, threads, runs=runs, warmup=warmup)
    return {k: r[k] for k in ("p50", "p95", "runs", "threads", "imgsz", "engine", "cpu")}
