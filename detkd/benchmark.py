"""Budgets and the resumable stage runner shared by `detkd demo` and ``tools/kd_benchmark.py``.

A *stage* is one Ultralytics training run (teacher, baseline, a distilled student, ...) in ``runs/<name>``. A
stage whose ``results.csv`` logged every epoch is reused; an interrupted one continues from its ``last.pt`` with
Ultralytics' ``resume`` (trained again from the start when that checkpoint cannot be resumed). Runs are
deterministic per seed on CPU; a resumed one is close to, not bit-identical with, an uninterrupted one. Before each stage one progress line
says which stage it is, how many are done, the time spent and an ETA from the seconds per epoch measured on the
stages finished so far (Ultralytics' ``time`` column), scaled by the relative cost of each kind of stage.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from detkd.assets import FEMTO_YAML
from detkd.integrations.recipes import DEFAULT_RECIPE


@dataclass(frozen=True)
class Budget:
    """Data size, models and epochs of one benchmark regime. Students always share epochs, data and seed."""

    n_train: int
    n_val: int
    imgsz: int
    teacher: str
    student: str
    teacher_epochs: int
    student_epochs: int
    batch: int = 16
    n_test: int = 0          # in-distribution test split: the split the tables report (val is for choosing)
    ood_cameras: int = 0     # unseen cameras for the test_ood split
    n_test_ood: int = 0
    distill: dict = field(default_factory=lambda: dict(DEFAULT_RECIPE))
    device: str = "cpu"
    # every stage (teacher and students): AdamW at lr0 0.004 reaches in 30-40 epochs what Ultralytics' `auto` choice
    # (AdamW, lr0 0.00111 for 5 classes) reaches in 60 (measured on the bench data, seed 0; see README "Benchmark")
    optimizer: str = "AdamW"
    lr0: float | None = 0.004
    # Ultralytics accumulates gradients up to a nominal batch of 64 by default (4 batches of 16 per optimizer step):
    # nbs = batch steps the optimizer after every batch, 4x the updates per epoch for the same compute; the femto
    # student reached 15.1 val mAP50-95 at epoch 27 of 40 instead of epoch 40 (seed 0; see README "Benchmark")
    nbs: int | None = 16
    description: str = ""

    @property
    def report_split(self) -> str:
        return "test" if self.n_test else "val"


BUDGETS: dict[str, Budget] = {
    # smoke test: every stage runs, the numbers mean nothing (the test suite and CI use it)
    "quick": Budget(64, 24, 96, "yolov8n.yaml", str(FEMTO_YAML), 2, 2, 16, n_test=24, ood_cameras=2, n_test_ood=24,
                    description="smoke test: 2 epochs on 64 frames; the numbers mean nothing"),
    # `detkd demo`: a reduced version of the benchmark regime, 20 min 39 s alone on 2 CPU cores (seed 0): the teacher
    # (9 min) beside the baseline and the 10%-labels student (5.5 min each), then the distilled (9.5 min) and the
    # pseudo-labelled student side by side, then evaluation and the CPU bench (~2 min). Neither curve is flat at
    # these epochs (README "Benchmark").
    "default": Budget(600, 150, 192, "yolov8n.yaml", str(FEMTO_YAML), 20, 30, 16, n_test=150, ood_cameras=2,
                      n_test_ood=150, description="reduced benchmark regime: teacher 20 epochs, students 30"),
    # tools/kd_benchmark.py: teacher + 3 seeds x baseline / Ultralytics / detkd (+ baseline at 2N) on 2 CPU cores,
    # two stages at a time. Learning curves (AdamW lr0 0.004, nbs 16; val mAP50-95): yolov8n 45.7 at 100 epochs
    # (+6.2% over its last 20 epochs); the femto student 31.0 / 30.1 / 30.0 at 100 (seeds 0-2; +6% to +10% over its
    # last 20): the teacher stays 1.5x / +15 points above it (see README "Benchmark")
    "bench": Budget(600, 150, 192, "yolov8n.yaml", str(FEMTO_YAML), 100, 100, 16, n_test=300, ood_cameras=2,
                    n_test_ood=300, description="benchmark regime: teacher 100 epochs, students 100"),
    # GPU: bigger data and models (hours on a CPU)
    "full": Budget(2000, 500, 256, "yolov8s.yaml", "yolov8n.yaml", 80, 60, 16, n_test=500, ood_cameras=2,
                   n_test_ood=500, description="GPU benchmark regime"),
}

# Relative cost of an epoch per kind of stage, in units of a student epoch (measured on 2 CPU cores with the
# default pair; the runner replaces the unit by what it measures).
COST = {"teacher": 2.0, "student": 1.0, "distilled": 1.8, "ultralytics": 1.6,
        "distilled_unlabeled": 3.6}  # an epoch over the labeled frames at ratio 0.5 has twice the steps


def budget(name: str, device: str = "cpu") -> Budget:
    return replace(BUDGETS[name], device=device)


def say(prefix: str, msg: str) -> None:
    print(f"[{prefix}] {msg}", flush=True)


def finished(results_csv: Path, epochs: int) -> bool:
    """True when an earlier run of this stage logged all its epochs (an interrupted one resumes, see train_run)."""
    return _epochs_logged(results_csv) >= epochs


def _seconds(results_csv: Path) -> float | None:
    """Training seconds of a finished run (Ultralytics' cumulative ``time`` column), None if absent."""
    try:
        rows = [r.split(",") for r in results_csv.read_text().splitlines() if r.strip()]
        i = [h.strip() for h in rows[0]].index("time")
        return float(rows[-1][i])
    except (OSError, ValueError, IndexError):
        return None


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s"


def train_run(model_cfg: str, data: Path, project: Path, name: str, epochs: int, b: Budget, threads: int, seed: int,
              distill_yaml: Path | None = None, ultralytics_teacher: Path | None = None) -> Path:
    """Train with Ultralytics: plain, with detkd (``distill_yaml``) or with Ultralytics' own feature KD
    (``ultralytics_teacher``: ``distill_model=<teacher .pt>``). Returns best.pt (last.pt if no best)."""
    import torch
    from ultralytics import YOLO

    from detkd.integrations.ultralytics_env import atomic_dataset_caches

    atomic_dataset_caches()  # stages that start together scan the same labels
    if distill_yaml is not None:
        os.environ["DETKD_THREADS"] = str(threads)
    last = project / name / "weights" / "last.pt"
    done = _epochs_logged(project / name / "results.csv")
    if last.is_file() and 0 < done < epochs:  # an interrupted stage continues from its last epoch
        say("stage", f"{name}: resuming after epoch {done} of {epochs} from {last}")
        try:
            return _resume(last, threads, distill_yaml is not None)
        except Exception as e:  # noqa: BLE001 - e.g. a last.pt cut short by the kill: train the stage again
            say("stage", f"{name}: could not resume ({type(e).__name__}: {str(e)[:200]}); training it from the start")
    model = YOLO(model_cfg, task="detect")
    model.add_callback("on_pretrain_routine_start", lambda tr: torch.set_num_threads(threads))
    device = "0" if b.device == "cuda" else "cpu"
    kw = dict(data=str(data), epochs=epochs, imgsz=b.imgsz, batch=b.batch, device=device, workers=0,
              project=str(project), name=name, exist_ok=True, seed=seed, deterministic=True, amp=b.device == "cuda",
              plots=False, verbose=False, close_mosaic=max(1, epochs // 4))
    if b.lr0 is not None:  # an explicit optimizer: no bias warm-up from 0.1 (Ultralytics does the same for `auto`)
        kw.update(optimizer=b.optimizer, lr0=b.lr0, warmup_bias_lr=0.0)
    if b.nbs is not None:
        kw["nbs"] = b.nbs
    if distill_yaml is not None:
        from detkd.integrations.ultralytics import DistillTrainer

        model.train(trainer=DistillTrainer, distill_model=str(distill_yaml), **kw)
    elif ultralytics_teacher is not None:
        model.train(distill_model=str(ultralytics_teacher), **kw)
    else:
        model.train(**kw)
    return _best(Path(model.trainer.save_dir))


def _best(run: Path) -> Path:
    """A finished run's best.pt (last.pt when it has no best)."""
    best = run / "weights" / "best.pt"
    return best if best.exists() else run / "weights" / "last.pt"


def _epochs_logged(results_csv: Path) -> int:
    """Epoch rows in a run's results.csv (0 when there is none)."""
    try:
        return len([x for x in results_csv.read_text().splitlines()[1:] if x.strip()])
    except OSError:
        return 0


def _resume(last: Path, threads: int, detkd: bool) -> Path:
    """Ultralytics' own ``resume=True`` from ``last.pt`` (its arguments, optimizer, EMA and epoch; detkd's adapters
    and schedules from ``last.kd.pt``). Not bit-identical to an uninterrupted run: the data order restarts."""
    import torch
    from ultralytics import YOLO

    model = YOLO(str(last))
    model.add_callback("on_pretrain_routine_start", lambda tr: torch.set_num_threads(threads))
    if detkd:
        from detkd.integrations.ultralytics import DistillTrainer

        model.train(resume=True, trainer=DistillTrainer)
    else:
        model.train(resume=True)
    return _best(Path(model.trainer.save_dir))


def _train_logged(log: Path, *args) -> Path:
    """:func:`train_run` in a worker process, its stdout and stderr (file descriptors included) in ``log``."""
    import sys

    from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

    ensure_ultralytics_offline()
    saved = os.dup(1), os.dup(2)
    with open(log, "a", buffering=1) as f:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            return train_run(*args)
        finally:  # a pooled worker may train another stage next: its output must not land in this log
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@dataclass
class Stage:
    name: str           # run folder under runs/
    kind: str           # teacher | student | distilled | ultralytics (for the ETA)
    model: str
    epochs: int
    seed: int = 0
    distill: dict | None = None          # detkd recipe (kind "distilled")
    teacher_from: str | None = None      # stage whose best.pt is the teacher
    data: Any = None                     # None: the runner's data; a path; or a callable(runner) -> data.yaml,
                                         # called only when the stage trains (e.g. pseudo-labels from the teacher)


class StageRunner:
    """Runs stages in order, reusing finished ones, with a progress line and an ETA; writes ``progress.json``."""

    def __init__(self, out: Path, data_yaml: Path, b: Budget, threads: int, stages: list[Stage], prefix: str,
                 jobs: int = 1, idle_work: Callable[[str, Path], None] | None = None):
        self.out, self.data, self.b, self.threads, self.stages, self.prefix = out, data_yaml, b, threads, stages, prefix
        self.jobs = max(1, int(jobs))  # > 1: that many stages at once, each in its own process with `threads`
        # jobs > 1: idle_work(name, weights) runs here, on `threads` threads, for each stage finished in this run, while
        # a job slot would otherwise stay empty (no stage left to start); e.g. evaluate it while the last one trains
        self.idle_work, self._idle_queue = idle_work, []
        self.runs = out / "runs"
        self.weights: dict[str, Path] = {}
        self.t0 = time.time()
        self.unit: list[float] = []  # seconds per cost unit, one entry per measured stage

    def _log(self, st: Stage) -> Path:
        return self.runs / st.name / "results.csv"

    def _done(self, st: Stage) -> bool:
        return self._finished(st.name, st.epochs)

    def _finished(self, name: str, epochs: int) -> bool:
        run = self.runs / name
        return (run / "weights" / "best.pt").exists() and finished(run / "results.csv", epochs)

    def _eta(self, todo: list[Stage]) -> str:
        if not self.unit:
            return "ETA after the first stage"
        unit = sorted(self.unit)[len(self.unit) // 2]
        return "ETA " + _fmt_s(sum(COST[s.kind] * s.epochs * unit for s in todo) / min(self.jobs, len(todo) or 1))

    def _measure(self, st: Stage) -> None:
        sec = _seconds(self._log(st))
        if sec:
            self.unit.append(sec / (COST[st.kind] * st.epochs))

    def finished_stages(self) -> dict[str, Path]:
        """best.pt of every stage that has finished (trains nothing; safe beside a run training the others)."""
        for st in self.stages:  # reused stages calibrate the ETA too
            if st.name not in self.weights and self._done(st):
                self._measure(st)
                self.weights[st.name] = self.runs / st.name / "weights" / "best.pt"
        return dict(self.weights)

    def run(self) -> dict[str, Path]:
        self.finished_stages()
        if self.jobs > 1:
            self._run_parallel()
        else:
            for st in self.stages:
                if st.name not in self.weights:
                    self.weights[st.name] = train_run(*self._start(st))
                    self._measure(st)
                    self._write_progress()
        self._write_progress()
        return self.weights

    def _start(self, st: Stage, threads: int | None = None) -> tuple:
        """Announce ``st`` and return the arguments of its :func:`train_run` (``threads``: default the runner's)."""
        threads = threads or self.threads
        n = len(self.stages)
        todo = [s for s in self.stages if s.name not in self.weights]
        say(self.prefix, f"stage {self.stages.index(st) + 1}/{n} {st.name}: {Path(st.model).stem}, {st.epochs} epochs, "
                         f"seed {st.seed}, {threads} threads ({n - len(todo)}/{n} done, "
                         f"{_fmt_s(time.time() - self.t0)} so far, {self._eta(todo)})")
        teacher = self.weights.get(st.teacher_from) if st.teacher_from else None
        kd_yaml = None
        if st.kind in ("distilled", "distilled_unlabeled"):
            import yaml

            kd_yaml = self.out / f"{st.name}.distill.yaml"
            kd_yaml.write_text(yaml.safe_dump({"teacher": str(teacher), "distill": st.distill}, sort_keys=False))
        data = st.data(self) if callable(st.data) else Path(st.data) if st.data else self.data
        return (st.model, data, self.runs, st.name, st.epochs, self.b, threads, st.seed, kd_yaml,
                teacher if st.kind == "ultralytics" else None)

    def _run_parallel(self) -> None:
        """Up to ``jobs`` stages at once, each in a fresh (spawned) process whose output goes to ``runs/<name>.log``;
        a stage that needs a teacher starts once the teacher's stage has finished."""
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        names = {s.name for s in self.stages}
        pending = [s for s in self.stages if s.name not in self.weights]
        for s in pending:
            if s.teacher_from and s.teacher_from not in names:
                raise ValueError(f"stage {s.name}: its teacher stage {s.teacher_from!r} is not in this run")
        running: dict = {}
        self.runs.mkdir(parents=True, exist_ok=True)
        import sys

        fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}  # one process per stage
        with ProcessPoolExecutor(self.jobs, mp_context=mp.get_context("spawn"), **fresh) as ex:
            while pending or running:
                for st in [s for s in pending if not s.teacher_from or s.teacher_from in self.weights]:
                    if len(running) >= self.jobs:
                        break
                    log = self.runs / f"{st.name}.log"
                    alone = not running and len(pending) == 1  # the last stage, alone: every job's threads
                    args = self._start(st, self.threads * self.jobs if alone else self.threads)
                    running[ex.submit(_train_logged, log, *args)] = st
                    say(self.prefix, f"  {st.name} runs in the background; its output: {log}")
                    pending.remove(st)
                startable = any(not s.teacher_from or s.teacher_from in self.weights for s in pending)
                idle = running and len(running) < self.jobs and not any(f.done() for f in running)
                if self._idle_queue and idle and not startable:
                    name = self._idle_queue.pop(0)
                    self.idle_work(name, self.weights[name])
                    continue
                finished_now, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished_now:
                    st = running.pop(fut)
                    try:
                        self.weights[st.name] = fut.result()
                    except BaseException as e:
                        for other in running:
                            other.cancel()
                        raise RuntimeError(f"stage {st.name} failed: {e} (its output: {self.runs / (st.name + '.log')})") \
                            from e
                    self._measure(st)
                    self._write_progress()
                    say(self.prefix, f"  {st.name} finished ({_fmt_s(time.time() - self.t0)} so far)")
                    if self.idle_work is not None:
                        self._idle_queue.append(st.name)

    def _write_progress(self) -> None:
        """``progress.json``: every stage of this run, and those another run on the same folder listed (e.g. two
        ``kd_benchmark.py`` commands with different rows), each with its state on disk now."""
        p = self.out / "progress.json"
        try:
            earlier = json.loads(p.read_text())
            earlier = earlier if isinstance(earlier, dict) else {}
        except (OSError, ValueError):
            earlier = {}
        for name, st in list(earlier.items()):  # another run's stage: re-read whether it has finished since
            if isinstance(st, dict) and isinstance(st.get("epochs"), int):
                done = self._finished(name, st["epochs"])
                secs = _seconds(self.runs / name / "results.csv") if done else None
                earlier[name] = {**st, "done": done, "seconds": secs}
        state = {**earlier, **{s.name: {"done": self._done(s), "epochs": s.epochs, "kind": s.kind, "seed": s.seed,
                                        "seconds": _seconds(self._log(s)) if self._done(s) else None}
                               for s in self.stages}}
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, p)


FEW_FRACTION = 0.1  # few-label rows: the share of the train frames that keep their labels


def few_label_split(out: Path, data_yaml: Path, frac: float = FEW_FRACTION, seed: int = 0) -> dict[str, Path]:
    """Split the train frames into a labeled ``frac`` and an unlabeled rest (deterministic from ``seed``).

    Writes ``few/labeled.yaml`` (train: the labeled frames listed ``1/frac`` times, so an epoch has the full set's
    steps; val: the full val split), ``few/labeled_unique.yaml`` (each labeled frame once) and
    ``few/unlabeled.txt``. Returns their paths.
    """
    import random

    import yaml

    few = out / "few"
    paths = {"labeled": few / "labeled.yaml", "unique": few / "labeled_unique.yaml", "unlabeled": few / "unlabeled.txt"}
    d = yaml.safe_load(data_yaml.read_text())
    root = Path(d["path"])
    imgs = sorted((root / d["train"]).glob("*.jpg"))
    want = json.dumps({"seed": seed, "frac": frac, "train": [p.name for p in imgs]}, sort_keys=True)
    marker = few / "split.json"  # the split is made again when the seed, the share or the train frames change
    if all(p.exists() for p in paths.values()) and marker.is_file() and marker.read_text() == want:
        return paths
    few.mkdir(parents=True, exist_ok=True)

    def write(p: Path, text: str) -> None:  # atomic: a stage starting now reads the old file or the new one
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, p)

    keep = set(random.Random(seed).sample(range(len(imgs)), k=max(1, round(frac * len(imgs)))))
    labeled = [str(p) for i, p in enumerate(imgs) if i in keep]
    write(few / "labeled_x.txt", "\n".join(labeled * max(1, round(1 / frac))) + "\n")
    write(few / "labeled_1.txt", "\n".join(labeled) + "\n")
    base = {"path": str(root), "val": d["val"], "names": d["names"]}
    write(paths["labeled"], yaml.safe_dump({**base, "train": str(few / "labeled_x.txt")}))
    write(paths["unique"], yaml.safe_dump({**base, "train": str(few / "labeled_1.txt")}))
    write(paths["unlabeled"], "\n".join(str(p) for i, p in enumerate(imgs) if i not in keep) + "\n")
    write(marker, want)
    return paths


def pseudo_label_data(out: Path, data_yaml: Path, b: Budget, prefix: str, teacher: str = "teacher", seed: int = 0):
    """A stage's data callable: the real labeled frames of :func:`few_label_split` plus the ``teacher`` stage's
    pseudo-labels (`detkd pseudo-label`, per-class F1-best thresholds on val) on the unlabeled rest (the split of
    ``seed``), in
    ``few/pseudo_<key>``: one folder per teacher checkpoint (path, size, mtime) and labeled split, so a retrained
    teacher or another split gets new labels and a folder another stage is training on is never rewritten."""
    def make(runner) -> Path:
        import hashlib

        from detkd.pseudo import pseudo_label

        few = few_label_split(out, data_yaml, seed=seed)
        weights = Path(runner.weights[teacher])
        st = weights.stat()
        split = hashlib.sha1((out / "few" / "split.json").read_bytes()).hexdigest()[:10]  # which frames are labeled
        stamp = f"{weights} {st.st_size} {st.st_mtime_ns} split {split}"
        dst = out / "few" / f"pseudo_{hashlib.sha1(stamp.encode()).hexdigest()[:10]}"
        marker = dst / ".complete"
        if not (dst / "data.yaml").exists() or not marker.is_file() or marker.read_text() != stamp:
            say(prefix, f"pseudo-labelling the unlabeled {1 - FEW_FRACTION:.0%} of the train frames with the teacher "
                        f"({weights})")
            sources = [p for p in few["unlabeled"].read_text().split() if p]
            pseudo_label(weights, sources, dst, conf="auto", val_data=data_yaml, merge=few["unique"], imgsz=b.imgsz,
                         progress=False, device="0" if b.device == "cuda" else "cpu")
            marker.write_text(stamp)
        return dst / "data.yaml"
    return make


def make_data(out: Path, b: Budget, seed: int, prefix: str) -> Path:
    """Generate (or reuse) the built-in data for budget ``b``; returns data.yaml."""
    from detkd.data.synth import generate

    data_yaml = out / "data.yaml"
    marker = out / ".complete"
    want = json.dumps({"seed": seed, "n_train": b.n_train, "n_val": b.n_val, "imgsz": b.imgsz, "n_test": b.n_test,
                       "ood_cameras": b.ood_cameras, "n_test_ood": b.n_test_ood}, sort_keys=True)
    if data_yaml.exists() and marker.is_file() and marker.read_text() == want:
        return data_yaml
    say(prefix, f"generating the security-camera data: {b.n_train} train / {b.n_val} val / {b.n_test} test frames "
                f"+ {b.n_test_ood} frames of {b.ood_cameras} unseen cameras, {b.imgsz} px, seed {seed}")
    generate(out, seed=seed, n_train=b.n_train, n_val=b.n_val, imgsz=b.imgsz, n_test=b.n_test,
             ood_cameras=b.ood_cameras, n_test_ood=b.n_test_ood or None, progress=False)
    marker.write_text(want)
    return data_yaml
