"""CPU latency of a detector: median / p95 per image over repeated single-image runs, threads stated."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_latency(weights: str | Path, imgsz: int, threads: int = 1, runs: int = 30, warmup: int = 5) -> dict:
    """Eager PyTorch FP32 latency of one ``imgsz`` image (fused Conv+BN, no_grad), in milliseconds."""
    import torch

    from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

    ensure_ultralytics_offline()
    from ultralytics.nn.tasks import load_checkpoint

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, _ = load_checkpoint(str(weights), fuse=True)
        model.float().eval()
        x = torch.zeros(1, 3, imgsz, imgsz)
        times = []
        with torch.inference_mode():
            for i in range(warmup + runs):
                t = time.perf_counter()
                model(x)
                if i >= warmup:
                    times.append((time.perf_counter() - t) * 1000)
    finally:
        torch.set_num_threads(prev)
    times.sort()
    return {"p50": statistics.median(times), "p95": times[min(len(times) - 1, int(0.95 * len(times)))],
            "runs": runs, "threads": threads, "imgsz": imgsz, "engine": "pytorch-eager", "cpu": cpu_model()}
