"""Private helpers for the CPU work split of the FGD and MGD kernels: independent blocks taken by
single-threaded workers instead of one OpenMP parallel region per operation."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["one_thread_per_op", "run_blocks"]


@contextlib.contextmanager
def one_thread_per_op(device: torch.device) -> Iterator[int]:
    """On CPU with ``torch.get_num_threads() = k > 1``: operations run on one thread inside the block
    (the count is restored afterwards) and ``k`` is yielded, the number of workers for
    :func:`run_blocks`; otherwise nothing changes and 1 is yielded.

    Why: every operation on a large tensor is an OpenMP parallel region, and on a busy machine each region
    waits for its slowest thread to be scheduled (measured: about 7 ms per region, whatever its size, with
    two threads on two busy cores). The work is split into independent blocks instead, taken
    by ``k`` single-threaded workers that only wait for each other at the end (FGD's image blocks, MGD's
    kept-positions convolution).
    """
    k = torch.get_num_threads()
    if device.type != "cpu" or k <= 1:
        yield 1
        return
    torch.set_num_threads(1)
    try:
        yield k
    finally:
        torch.set_num_threads(k)


def run_blocks(
    blocks: list, body, work_shape: tuple[int, ...], like: Tensor, workers: int, zero_work: bool = False
) -> list[Tensor]:
    """Call ``body(block, work)`` for every block; ``work`` is a per-worker tensor of ``work_shape``
    (scratch, or an accumulator with ``zero_work``). Returns the workers' ``work`` tensors.

    With ``workers > 1``, this thread and ``workers - 1`` others take blocks from a shared queue (see
    :func:`one_thread_per_op`). ``body`` must write disjoint outputs.
    """
    workers = min(workers, len(blocks))
    new = like.new_zeros if zero_work else like.new_empty
    if workers <= 1:
        work = new(work_shape)
        for bi in blocks:
            body(bi, work)
        return [work]
    queue = iter(blocks)
    lock = threading.Lock()

    def worker() -> Tensor:
        work = new(work_shape)
        with torch.no_grad():  # grad mode is per thread
            while True:
                with lock:
                    bi = next(queue, None)
                if bi is None:
                    return work
                body(bi, work)

    with ThreadPoolExecutor(max_workers=workers - 1) as pool:
        futures = [pool.submit(worker) for _ in range(workers - 1)]
        works = [worker()]
        works += [fut.result() for fut in futures]  # re-raises a worker's exception
    return works
