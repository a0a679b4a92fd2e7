"""CPU latency, throughput and peak memory of one detector on one engine.

What is timed: the model's forward pass on a ``(B, 3, imgsz, imgsz)`` float32 tensor (PyTorch eager, fused
Conv+BN, ``inference_mode``) or the same array through an onnxruntime ``InferenceSession`` (CPU provider,
all graph optimisations). Letterboxing and NMS are not included: they are the same for every model of a
comparison and would blur the model-to-model ratio.

- latency: ``runs`` single-image forwards after ``warmup`` untimed ones; p50 / p95 / mean / min in ms.
- throughput: for each batch size, images per second = B / median time of one batch forward.
- memory: peak resident set size of the process (``ru_maxrss``) and its growth over the process's RSS just
  before the model was loaded (run each measurement in a process of its own, as `detkd.bench.run` does, for a
  peak that belongs to one model).

`measure` times one model; `measure_interleaved` (what `detkd bench` uses) times several round-robin, each in its
own worker process, until they settle or a time budget ends (`detkd.bench.noise`).

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


class LocalSession:
    """One model loaded in this process and timed on request: ``meta`` (engine, precision, batch shape),
    ``time(batch, runs, warmup)`` -> ``runs`` times in ms after ``warmup`` untimed forwards, ``stats()`` -> peak
    memory of the process and its growth since just before loading, ``close()``. `detkd.bench.worker` serves one
    of these per process; `measure_interleaved` times several of them round-robin."""

    def __init__(self, path: str | os.PathLike, engine: str, imgsz: int, threads: int = 1):
        if engine not in ENGINES:
            raise DataError(f"unknown engine '{engine}'; choose from {list(ENGINES)}")
        if threads < 1:
            raise DataError(f"threads ({threads}) must be >= 1")
        self.base = _rss_mb()
        self.fn, self.meta = (torch_runner if engine == "pytorch" else ort_runner)(path, threads)
        self.imgsz = int(imgsz)
        self._rng = np.random.default_rng(0)
        self._x: dict[int, np.ndarray] = {}

    def time(self, batch: int, runs: int, warmup: int = 0) -> list[float]:
        b = int(batch)
        if b not in self._x:
            self._x[b] = self._rng.random((b, 3, self.imgsz, self.imgsz), dtype=np.float32)
        return _times_ms(self.fn, self._x[b], int(runs), int(warmup))

    def stats(self) -> dict:
        peak = _peak_rss_mb()
        return {"peak_rss_mb": peak, "model_rss_mb": peak - self.base}

    def close(self) -> None:
        self.fn = None


def measure_interleaved(jobs: Sequence[dict], imgsz: int, threads: int = 1, *, batch_sizes: Sequence[int] = (1,),
                        runs: int = 50, warmup: int = 10, budget_s: float = 60.0, isolate: bool = True,
                        per_round: int | None = None, progress: bool = False) -> tuple[list[dict], dict]:
    """`measure` for several models at once, timed round-robin (`detkd.bench.noise.interleave`).

    ``jobs``: ``[{"path", "engine"}, ...]``. Each job gets its own session — with ``isolate`` a worker process kept
    alive for the whole measurement (`detkd.bench.worker.WorkerSession`: peak memory per model), else the model is
    loaded in this process. After ``warmup`` untimed forwards of each (one model at a time), rounds ask every
    model in turn for ``per_round`` timed batch-1 forwards (default ``min(5, runs // 3)``, at least 1), each
    batch after one untimed forward that absorbs the hand-over from the previous model; rounds go on until every
    model's spread (IQR / median of its per-round medians) is at most `detkd.bench.noise.STOP_SPREAD` and each
    has ``runs`` runs, or ``budget_s`` seconds have passed (after at least 3 rounds). Throughput at each batch size
    B > 1 is timed round-robin too (``max(3, runs // B)`` rounds of one batch after ``max(1, warmup // B)``
    warm-up batches).

    Returns ``(results, timing)``: per job, `measure`'s fields (``runs`` = the timed runs it got) plus ``spread``
    and ``rounds``; ``timing``: ``{"rounds", "per_round", "stopped", "seconds", "budget_s", "stop_spread"}``.
    """
    from detkd.bench.noise import interleave, spread

    if runs < 1 or warmup < 0 or threads < 1:
        raise DataError(f"runs ({runs}) and threads ({threads}) must be >= 1 and warmup ({warmup}) >= 0")
    bad = [int(b) for b in batch_sizes if int(b) < 1]
    if bad:
        raise DataError(f"batch sizes must be >= 1, got {bad[0]}")
    k = max(1, int(per_round) if per_round else min(5, runs // 3))
    prev = None
    if not isolate:
        import torch

        prev = torch.get_num_threads()
    sessions: list = []
    bar = None
    try:
        if isolate:
            from detkd.bench.worker import WorkerSession

            for j in jobs:
                sessions.append(WorkerSession(j["path"], j["engine"], imgsz, threads))
            for s in sessions:
                s.wait_ready()
        else:
            for j in jobs:
                sessions.append(LocalSession(j["path"], j["engine"], imgsz, threads))
        for s in sessions:
            if warmup:
                s.time(1, 0, warmup)
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc="bench (round-robin)", unit="round", dynamic_ncols=True)

        def tick(n: int, spreads: dict) -> None:
            if bar is not None:
                bar.set_postfix_str(f"worst spread {100 * max(spreads.values()):.0f}%", refresh=False)
                bar.update(1)

        keys = [str(i) for i in range(len(sessions))]
        lat = interleave({key: (lambda n, s=s: s.time(1, n, 1)) for key, s in zip(keys, sessions)}, runs=runs,
                         per_round=k, budget_s=budget_s, on_round=tick)
        thr: list[dict] = [{} for _ in sessions]
        skipped: list[list[str]] = [[] for _ in sessions]
        for b in dict.fromkeys(int(x) for x in batch_sizes):
            ok = []
            for i, s in enumerate(sessions):
                if not s.meta.get("batch_dynamic", True) and b != s.meta.get("fixed_batch"):
                    skipped[i].append(f"batch {b}: the ONNX model has a fixed batch of {s.meta.get('fixed_batch')} "
                                      "(export with dynamic=True)")
                else:
                    ok.append(i)
            if b == 1:
                for i in ok:
                    thr[i][1] = 1000.0 / statistics.median(lat["times"][keys[i]])
                continue
            for i in ok:
                sessions[i].time(b, 0, max(1, warmup // b))
            nb = max(3, runs // b)
            tb = interleave({keys[i]: (lambda n, s=sessions[i]: s.time(b, n, 0)) for i in ok}, runs=nb, per_round=1,
                            budget_s=0, min_rounds=nb, max_rounds=nb) if ok else {"times": {}}
            for i in ok:
                thr[i][b] = b * 1000.0 / statistics.median(tb["times"][keys[i]])
        stats = [s.stats() for s in sessions]
    finally:
        if bar is not None:
            bar.close()
        for s in sessions:
            s.close()
        if prev is not None:
            import torch

            torch.set_num_threads(prev)
    out = []
    cpu = cpu_model()
    for key, s, st, tp, sk in zip(keys, sessions, stats, thr, skipped):
        t = lat["times"][key]
        out.append({"p50": statistics.median(t), "p95": _pct(t, 95), "mean": statistics.fmean(t), "min": min(t),
                    "spread": spread(lat["round_p50"][key]), "rounds": lat["rounds"], "throughput": tp,
                    "peak_rss_mb": st["peak_rss_mb"], "model_rss_mb": st["model_rss_mb"],
                    "engine": s.meta["engine"], "precision": s.meta["precision"], "threads": int(threads),
                    "imgsz": int(imgsz), "runs": len(t), "warmup": int(warmup), "cpu": cpu, "skipped": sk})
    timing = {x: lat[x] for x in ("rounds", "per_round", "stopped", "seconds", "budget_s", "stop_spread")}
    return out, timing


def torch_latency(weights: str | Path, imgsz: int, threads: int = 1, runs: int = 30, warmup: int = 5) -> dict:
    """Eager PyTorch FP32 latency of one ``imgsz`` image (fused Conv+BN, inference mode), in milliseconds:
    ``{"p50", "p95", "runs", "threads", "imgsz", "engine", "cpu"}`` (the form `detkd report` takes)."""
    r = measure(weights, "pytorch", imgsz, threads, runs=runs, warmup=warmup)
    return {k: r[k] for k in ("p50", "p95", "runs", "threads", "imgsz", "engine", "cpu")}
