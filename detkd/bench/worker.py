"""Measurements in a process of their own (so its peak memory belongs to one model).

Two modes:

- ``python -m detkd.bench.worker JSON``: one `detkd.bench.latency.measure` call (JSON holds its keyword arguments);
  the result is printed as one line ``DETKD_BENCH_RESULT <json>``.
- ``python -m detkd.bench.worker --serve JSON`` (JSON: ``path``, ``engine``, ``imgsz``, ``threads``): load the model
  once, print ``DETKD_BENCH_RESULT {"ready": true, <engine, precision, batch shape>}``, then answer one JSON
  command per stdin line with one result line: ``{"cmd": "time", "batch": B, "runs": N, "warmup": W}`` ->
  ``{"ms": [N times]}``; ``{"cmd": "stats"}`` -> ``{"peak_rss_mb", "model_rss_mb"}``; ``{"cmd": "quit"}`` (or end
  of input) ends it. `WorkerSession` is the parent's side: `detkd.bench.latency.measure_interleaved` keeps one
  such worker per bench row alive and asks each in turn for a batch of timed runs, so every row is timed
  round-robin while each keeps its own process (and peak memory). Between commands a worker waits on its input
  and uses no CPU.

A user error is printed as ``DETKD_BENCH_ERROR <message>`` with exit status 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

MARK, ERR = "DETKD_BENCH_RESULT ", "DETKD_BENCH_ERROR "


def _reply(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def serve(spec: dict) -> int:
    from detkd.bench.latency import LocalSession
    from detkd.errors import DetkdError

    try:
        s = LocalSession(**spec)
    except DetkdError as e:
        print(ERR + str(e), flush=True)
        return 2
    _reply({"ready": True, **s.meta})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd.get("cmd")
        if op == "time":
            _reply({"ms": s.time(int(cmd["batch"]), int(cmd["runs"]), int(cmd.get("warmup", 0)))})
        elif op == "stats":
            _reply(s.stats())
        elif op == "quit":
            break
        else:
            print(ERR + f"unknown worker command {op!r}", flush=True)
            return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    if argv and argv[0] == "--serve":
        return serve(json.loads(argv[1]))
    args = json.loads(argv[0])
    from detkd.bench.latency import measure
    from detkd.errors import DetkdError

    try:
        r = measure(**args)
    except DetkdError as e:
        print(ERR + str(e), flush=True)
        return 2
    _reply(r)
    return 0


class WorkerSession:
    """The parent's handle on one ``--serve`` worker: the same ``meta`` / ``time`` / ``stats`` / ``close`` as
    `detkd.bench.latency.LocalSession`, answered by a fresh process. The process starts at construction;
    `wait_ready` waits until its model is loaded (start all workers first, then wait: they load in parallel)."""

    def __init__(self, path: str | os.PathLike, engine: str, imgsz: int, threads: int = 1):
        self.path, self.engine = str(path), engine
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        self._err = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        spec = {"path": self.path, "engine": engine, "imgsz": int(imgsz), "threads": int(threads)}
        self.proc = subprocess.Popen([sys.executable, "-m", "detkd.bench.worker", "--serve", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     env=env, bufsize=1)
        self.meta: dict = {}

    def _fail(self) -> RuntimeError:
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._err.seek(0)
        tail = "\n".join(self._err.read().strip().splitlines()[-15:])
        return RuntimeError(f"benchmark worker failed for {self.path} ({self.engine}), exit {rc}:\n{tail}")

    def _read(self) -> dict:
        from detkd.errors import DataError

        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise self._fail()
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
            if line.startswith(ERR):
                self.proc.wait()
                raise DataError(line[len(ERR):].strip())

    def _ask(self, **cmd) -> dict:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._fail() from None
        return self._read()

    def wait_ready(self) -> dict:
        r = self._read()
        r.pop("ready", None)
        self.meta = r
        return r

    def time(self, batch: int, runs: int, warmup: int = 0) -> list[float]:
        return self._ask(cmd="time", batch=int(batch), runs=int(runs), warmup=int(warmup))["ms"]

    def stats(self) -> dict:
        return self._ask(cmd="stats")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._err.close()


if __name__ == "__main__":
    sys.exit(main())
