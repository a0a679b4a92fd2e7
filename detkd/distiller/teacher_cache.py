"""The per-sample teacher output cache (``teacher_runtime.cache``) and the input fingerprint that keeps it honest."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["TeacherCache", "fingerprint", "fingerprint_match", "first_tensor", "take"]


_FP_STRIDE = 31  # input fingerprint: every 31st value of a sample (31 is prime: no alignment with H, W or C)


def fingerprint(x: Tensor) -> Tensor:
    """``(N, 3)`` float64 per-sample ``[sum, weighted sum, sum of abs]`` over a strided subsample of ``x``.

    The weights are a fixed cosine pattern, so flips, shifts and colour changes move the weighted sum.
    """
    sub = x.detach().reshape(x.shape[0], -1)[:, ::_FP_STRIDE].double()
    w = torch.cos(torch.arange(sub.shape[1], dtype=torch.float64, device=sub.device) * 0.7549)
    return torch.stack((sub.sum(1), sub @ w, sub.abs().sum(1)), 1)


def fingerprint_match(a: Tensor, b: Tensor) -> bool:
    tol = 1e-9 * float(max(a[2], b[2])) + 1e-12
    return bool((a[:2] - b[:2]).abs().max() <= tol)


def first_tensor(inputs: Any) -> Tensor | None:
    if isinstance(inputs, Tensor):
        return inputs
    if isinstance(inputs, (tuple, list)):
        return next((x for x in inputs if isinstance(x, Tensor)), None)
    return None


def take(inputs: Any, idx: Tensor, n: int) -> Any:
    """The samples ``idx`` of a batch: a tensor, or each batch-sized tensor of a tuple/list of arguments."""
    if isinstance(inputs, Tensor):
        return inputs.index_select(0, idx.to(inputs.device))
    return type(inputs)(x.index_select(0, idx.to(x.device)) if isinstance(x, Tensor) and x.dim() and x.shape[0] == n
                        else x for x in inputs)


class TeacherCache:
    """Per-sample teacher tensors, keyed by sample id (``str``), in memory or in a directory.

    An entry is ``{"t": {name: tensor without the batch dim}, "shape": input shape (without N), "fp":
    fingerprint or None, "meta": the teacher's non-default DenseOutputs fields (a softmax head) or None}``.
    Bounded by ``max_items`` / ``max_bytes`` (None: no bound): once full, new keys are not stored and a replaced
    entry must still fit. ``offload`` keeps memory entries on the CPU (a directory cache always loads to the CPU).
    A directory cache writes ``<dir>/<namespace>/<sha1(key)>.pt`` atomically;
    the namespace (set by :meth:`bind`) names the teacher and settings, so a changed teacher never reads old
    entries. Copies share the cache (``copy.deepcopy`` returns it); a pickle is an empty cache with the same
    settings (a memory cache is never shipped to another process).
    """

    def __init__(self, where: str = "memory", max_items: int | None = None, max_bytes: int | None = None,
                 offload: bool = True):
        self.where, self.max_items, self.max_bytes, self.offload = where, max_items, max_bytes, offload
        self.namespace: str | None = None
        self._mem: dict[str, dict] = {}
        self._sizes: dict[str, int] = {}
        self.nbytes = 0

    @property
    def on_disk(self) -> bool:
        return self.where != "memory"

    @property
    def directory(self) -> Path | None:
        return Path(self.where).expanduser() / self.namespace if self.on_disk and self.namespace else None

    def bind(self, namespace: str) -> None:
        """Use entries of ``namespace`` (a directory cache counts what that folder already holds)."""
        if namespace == self.namespace:
            return
        self.clear()
        self.namespace = namespace
        d = self.directory
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
            for f in d.glob("*.pt"):
                self._sizes[f.stem] = f.stat().st_size
            self.nbytes = sum(self._sizes.values())

    def clear(self) -> None:
        """Forget every entry held in memory (files of a directory cache stay)."""
        self._mem.clear()
        self._sizes.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._sizes)

    def _file(self, key: str) -> Path:
        return self.directory / f"{hashlib.sha1(key.encode()).hexdigest()}.pt"

    def _id(self, key: str) -> str:
        return hashlib.sha1(key.encode()).hexdigest() if self.on_disk else key

    def get(self, key: str) -> dict | None:
        if not self.on_disk:
            return self._mem.get(key)
        if self._id(key) not in self._sizes:
            return None
        try:
            return torch.load(self._file(key), map_location="cpu", weights_only=True)
        except Exception:  # a partial or foreign file: a miss, rewritten by put()
            return None

    def put(self, key: str, tensors: dict[str, Tensor], shape: list[int], fp: Tensor | None,
            meta: dict | None = None) -> bool:
        """Store one sample's tensors; False when a bound leaves no room."""
        k = self._id(key)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        old = self._sizes.get(k, 0)
        if (self.max_items is not None and k not in self._sizes and len(self._sizes) >= self.max_items) or (
                self.max_bytes is not None and self.nbytes - old + size > self.max_bytes):
            return False
        entry = {"t": tensors, "shape": list(shape), "fp": fp, "meta": meta}
        if self.on_disk:
            path = self._file(key)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save(entry, tmp)
            os.replace(tmp, path)
            size = path.stat().st_size
        else:
            self._mem[k] = entry
        self._sizes[k] = size
        self.nbytes += size - old
        return True

    def __deepcopy__(self, memo: dict) -> TeacherCache:
        return self

    def __reduce__(self):
        return TeacherCache, (self.where, self.max_items, self.max_bytes, self.offload)
