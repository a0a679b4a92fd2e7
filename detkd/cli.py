"""The `detkd` command line: one verb per job.

Each verb's implementation lives in its own layer (data, eval, report, bench, integrations); this module
only parses arguments, turns `DetkdError`s into one clear line on stderr, and sets the exit code.
"""

from __future__ import annotations

import argparse
import sys

VERBS = {
    "train": "distil a teacher into a student (Ultralytics YOLO, or torchvision with framework: torchvision): "
             "detkd train CONFIG.yaml [key=value ...]",
    "sweep": "search distillation knobs with short pruned trials (Optuna): detkd sweep CONFIG.yaml --space K=V1,V2 ...",
    "eval": "COCO / VOC mAP of a model (.pt or .onnx) on a dataset",
    "report": "before/after report (Markdown, HTML, JSON) for teacher, baseline and distilled student",
    "bench": "CPU latency / throughput / size of one or more models (PyTorch eager and ONNX Runtime)",
    "demo": "the whole story offline: built-in data, teacher, baseline, distilled student, report",
    "data": "datasets: synth (built-in security-camera scenes), convert, validate",
    "pseudo-label": "hard-label distillation: a teacher labels images / video frames into a training dataset",
    "doctor": "check this installation: versions, threads, offline settings",
}


# package (import name, distribution name) -> the commands that need it. `detkd doctor` checks each one.
NEEDS = {
    ("torch", "torch"): "all",
    ("torchvision", "torchvision"): "all",
    ("ultralytics", "ultralytics"): "train (YOLO), eval, bench, demo, sweep, pseudo-label",
    ("pycocotools", "pycocotools"): "eval, demo, report",
    ("cv2", "opencv-python"): "data, eval, bench, demo, pseudo-label",
    ("albumentations", "albumentations"): "train, demo, sweep (Ultralytics' blur / gray / CLAHE, p=0.01; optional)",
    ("yaml", "PyYAML"): "all",
    ("onnx", "onnx"): "bench, demo (ONNX export, INT8)",
    ("onnxruntime", "onnxruntime"): "bench, demo, eval MODEL.onnx",
    ("optuna", "optuna"): "sweep",
    ("faster_coco_eval", "faster-coco-eval"): "eval --engine faster (optional)",
}
OPTIONAL = {"faster_coco_eval", "albumentations"}


def _cmd_doctor(args: argparse.Namespace) -> int:
    import importlib
    import os
    import platform

    from importlib import metadata

    import detkd
    from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

    ensure_ultralytics_offline()  # before importing Ultralytics: no DNS check, no settings file in ~/.config
    lines = [f"detkd {detkd.__version__}", f"python {platform.python_version()} ({platform.machine()})"]
    missing = []
    for (mod, dist), needed_by in NEEDS.items():
        try:
            m = importlib.import_module(mod)
            try:
                ver = metadata.version(dist)
            except metadata.PackageNotFoundError:
                ver = getattr(m, "__version__", "?")
            lines.append(f"  ok       {dist:<18} {ver:<12} needed by: {needed_by}")
        except Exception as e:  # ImportError, or a broken install raising something else
            tag = "optional" if mod in OPTIONAL else "MISSING"
            lines.append(f"  {tag:<8} {dist:<18} {'-':<12} needed by: {needed_by} ({type(e).__name__})")
            if mod not in OPTIONAL:
                missing.append(dist)
    try:
        import torch

        lines.append(f"torch threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}")
    except Exception:
        pass
    from detkd.checkpoints import trusted

    lines.append(f"checkpoint loading: {'TRUSTED (full unpickler; DETKD_TRUST_CHECKPOINTS set)' if trusted() else 'safe (weights only)'}")
    lines.append(f"onnxruntime telemetry: {'off' if os.environ.get('ORT_DISABLE_TELEMETRY') == '1' else 'ON'}")
    if missing:
        lines.append(f"missing: {', '.join(missing)} -> pip install -c constraints.txt {' '.join(missing)} "
                     "(or reinstall detkd: pip install -c constraints.txt -e .)")
    print("\n".join(lines))
    return 1 if missing else 0


def _cmd_train(args: argparse.Namespace) -> int:
    from detkd.train import load_train_config, train

    cfg = load_train_config(args.config, args.overrides)
    save_dir = train(cfg)
    if cfg.get("framework") != "torchvision":  # the torchvision loop says where its weights are itself
        print(f"detkd train: done. Weights: {save_dir / 'weights' / 'best.pt'} (a plain Ultralytics model)")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from detkd.sweep import run_sweep

    res = run_sweep(args.config, args.space, overrides=args.overrides, trials=args.trials, epochs=args.epochs,
                    sampler=args.sampler, pruner=args.pruner, out=args.out, seed=args.seed, metric=args.metric,
                    min_epochs=args.min_epochs, startup_trials=args.startup_trials)
    return 0 if res["best"] is not None else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from detkd.errors import EvalError
    from detkd.eval.run import evaluate_detections, evaluate_model

    if (args.model is None) == (args.detections is None):
        raise EvalError("give a model file (MODEL.pt / MODEL.onnx), or --detections DETS.json to score existing "
                        "detections, not both")  # fmt: skip
    if args.detections is not None:
        model_only = [o for o, v in (("--imgsz", args.imgsz), ("--class-map", args.class_map)) if v is not None]
        if model_only:
            raise EvalError(f"{', '.join(model_only)} applies to a model; --detections are scored as written")
        dets = Path(args.detections)
        out = args.out or dets.parent / f"eval_{dets.stem}"
        m = evaluate_detections(dets, args.data, split=args.split, engine=args.engine, out_dir=out,
                                voc=not args.no_voc)  # fmt: skip
        written = "metrics.json"
    else:
        m = evaluate_model(args.model, args.data, split=args.split, imgsz=args.imgsz, out_dir=args.out,
                           conf=args.conf, iou=args.iou, batch=args.batch, threads=args.threads, voc=not args.no_voc,
                           engine=args.engine, class_map=args.class_map,
                           log=lambda s: print(f"detkd eval: {s}", flush=True))  # fmt: skip
        written = "metrics.json, detections.json"
    print(m["summary"].rstrip())
    if "voc" in m:
        print(f"VOC mAP@0.5: {m['voc']['mAP50_auc']:.4f} (area under curve), {m['voc']['mAP50_07']:.4f} (VOC07 11-point)")
    print("per-class AP50-95: " + ", ".join(f"{k} {v['AP']:.3f}" for k, v in m["per_class"].items()))
    print(f"written: {m['out_dir']}/{written}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from detkd.report.report import report_from_spec

    paths = report_from_spec(args.spec, out_dir=args.out)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from detkd.bench.run import bench, format_table

    engines = ["pytorch", "onnxruntime"] if args.engine == "both" else [args.engine]
    res = bench(args.models, imgsz=args.imgsz, threads=args.threads, batch_sizes=args.batch, runs=args.runs,
                warmup=args.warmup, engines=engines, int8=args.int8, data=args.data, n_calib=args.calib,
                evaluate=False if args.no_map else None, names=args.names, out_dir=args.out, isolate=not args.in_process,
                budget_s=args.budget_s)
    print(format_table(res))
    print(f"written: {args.out}/bench.json, bench.md (embed in a report with `bench: {args.out}/bench.json`)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from detkd.demo import run_demo

    budget = "quick" if args.quick else "full" if args.full else "default"
    run_demo(args.out, budget=budget, threads=args.threads, seed=args.seed, skip_existing=not args.fresh,
             jobs=args.jobs, few_labels=not args.no_few_labels)
    return 0


def _voc_names(spec: str | None):
    """``--names``: None, 'voc', 'data', a file with one name per line, or 'a,b,c' -> read_voc's ``names``."""
    from pathlib import Path

    if spec is None or spec in ("voc", "data"):
        return spec
    if Path(spec).is_file():
        return [ln.strip() for ln in Path(spec).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [n.strip() for n in spec.split(",") if n.strip()]


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_cmd == "synth":
        from detkd.data.synth import generate

        s = generate(args.out, seed=args.seed, n_train=args.train, n_val=args.val, imgsz=args.imgsz,
                     workers=args.workers, n_cameras=args.cameras, n_test=args.test, ood_cameras=args.ood_cameras,
                     n_test_ood=args.test_ood)
        splits = ",".join(s["splits"])
        print(f"detkd data synth: wrote {args.out} (data.yaml, annotations/instances_{{{splits}}}.json)")
        for k, v in s.items():
            if k != "paths":
                print(f"  {k}: {v}")
        return 0
    if args.data_cmd == "convert":
        from detkd.data.convert import convert

        r = convert(args.src, args.dst, to=args.to, split=args.split, strict=args.strict, names=_voc_names(args.names))
        print(r.summary())
        return 0
    if args.data_cmd == "validate":
        from detkd.data.validate import validate_dataset

        r = validate_dataset(args.path, split=args.split, strict=args.strict, names=_voc_names(args.names))
        print(r.summary())
        return 0
    print("detkd data: choose one of synth, convert, validate (see detkd data --help)", file=sys.stderr)
    return 2


def _cmd_pseudo_label(args: argparse.Namespace) -> int:
    from detkd.pseudo import pseudo_label

    r = pseudo_label(args.teacher, args.sources, args.out, conf=args.conf, val_data=args.val_data, merge=args.merge,
                     every=args.every, imgsz=args.imgsz, iou=args.iou, max_det=args.max_det, fmt=args.format,
                     device=args.device, batch=args.batch)  # fmt: skip
    print(r.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="detkd",
        description="Knowledge distillation for object detectors (logits, boxes, FPN features).",
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--trust-checkpoints", action="store_true",
                        help="load .pt files with Ultralytics' full unpickler, which runs code pickled in the file; "
                             "only for files you trust (default: weights-only safe loading; env DETKD_TRUST_CHECKPOINTS=1)")
    for verb, help_ in VERBS.items():
        sub.add_parser(verb, help=help_, description=help_, parents=[common])
    sub.choices["doctor"].set_defaults(func=_cmd_doctor)

    tr = sub.choices["train"]
    tr.add_argument("config", help="detkd train config (teacher, student, data, distill, Ultralytics args); data: an "
                                   "Ultralytics data yaml, a COCO folder or a VOC root")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=50 distill.logits.weight=2")
    tr.set_defaults(func=_cmd_train)

    sw = sub.choices["sweep"]
    sw.add_argument("config", help="detkd train config: the base every trial starts from")
    sw.add_argument("overrides", nargs="*", help="key=value overrides of the base config, as for detkd train")
    sw.add_argument("--space", nargs="+", required=True, metavar="KEY=VALUES",
                    help="knobs to search: KEY=V1,V2,... (a list) or KEY=LO..HI[:log] (a range; random/tpe only), "
                         "e.g. distill.logits.temperature=1,2,4 distill.logits.weight=1,4,8")
    sw.add_argument("--trials", type=int, default=None, help="finished trials to reach (default: the grid's size; 20)")
    sw.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the config's)")
    sw.add_argument("--sampler", choices=["grid", "random", "tpe"], default=None,
                    help="default: grid when every knob is a list, else tpe")
    sw.add_argument("--pruner", choices=["median", "halving", "none"], default="median",
                    help="stop weak trials early: median (default), halving (successive halving) or none")
    sw.add_argument("--min-epochs", type=int, default=1, help="no trial is pruned before this many epochs (default 1)")
    sw.add_argument("--startup-trials", type=int, default=2,
                    help="median pruner: finished trials before any pruning (default 2)")
    sw.add_argument("--out", default=None, help="sweep folder (default runs/sweep/<config name>); rerun to resume")
    sw.add_argument("--metric", default="metrics/mAP50-95(B)", help="results.csv column to maximise")
    sw.add_argument("--seed", type=int, default=0, help="sampler seed")
    sw.set_defaults(func=_cmd_sweep)

    ev = sub.choices["eval"]
    ev.add_argument("model", nargs="?", default=None, help="Ultralytics .pt or exported .onnx (omit with --detections)")
    ev.add_argument("--data", required=True, help="COCO json / VOC root / Ultralytics data yaml")
    ev.add_argument("--split", default="val", help="split to score (VOC: an ImageSets list, or 'all' for every xml)")
    ev.add_argument("--detections", default=None, metavar="DETS.json",
                    help="score this COCO results file instead of running a model (category ids: the COCO json's "
                         "own; for VOC / YOLO data 1..K in class order, as detkd eval writes them)")
    ev.add_argument("--engine", choices=["pycocotools", "faster"], default="pycocotools",
                    help="COCO evaluator: pycocotools (reference) or faster (faster-coco-eval: same numbers, "
                         "several times faster; pip install faster-coco-eval)")
    ev.add_argument("--imgsz", type=int, default=None,
                    help="inference size (default: the size the model was trained / exported at, else 640)")
    ev.add_argument("--class-map", default=None, metavar="MODEL=DATASET,...",
                    help="score model class MODEL as dataset class DATASET (names, or model class indices); "
                         "MODEL=- drops a class. Classes are otherwise matched by name")
    ev.add_argument("--out", default=None, help="output folder (default: beside the model / detections file)")
    ev.add_argument("--conf", type=float, default=0.001)
    ev.add_argument("--iou", type=float, default=0.7)
    ev.add_argument("--batch", type=int, default=16)
    ev.add_argument("--threads", type=int, default=None, help="CPU threads (torch / onnxruntime)")
    ev.add_argument("--no-voc", action="store_true", help="skip VOC mAP@0.5")
    ev.set_defaults(func=_cmd_eval)

    rp = sub.choices["report"]
    rp.add_argument("spec", help="YAML listing the models (role, name, metrics json, weights, latency, results_csv)")
    rp.add_argument("--out", default=None, help="output folder (default: the spec's 'out' or report/ beside it)")
    rp.set_defaults(func=_cmd_report)

    be = sub.choices["bench"]
    be.add_argument("models", nargs="+", help="Ultralytics .pt and/or .onnx files (teacher first for its speed-ups)")
    be.add_argument("--imgsz", type=int, default=640)
    be.add_argument("--threads", type=int, default=1, help="CPU threads for every measurement (default 1)")
    be.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes for throughput (default 1 8)")
    be.add_argument("--runs", type=int, default=50, help="timed batch-1 runs (default 50)")
    be.add_argument("--warmup", type=int, default=10, help="untimed warm-up runs (default 10)")
    be.add_argument("--budget-s", type=float, default=60.0,
                    help="rows are timed round-robin until each settles or this many seconds pass (default 60)")
    be.add_argument("--engine", choices=["both", "pytorch", "onnxruntime"], default="both")
    be.add_argument("--int8", action="store_true", help="add an onnxruntime static INT8 row (needs --data)")
    be.add_argument("--data", default=None, help="dataset: INT8 calibration images and mAP of every row")
    be.add_argument("--calib", type=int, default=300, help="INT8 calibration images (default 300)")
    be.add_argument("--no-map", action="store_true", help="with --data, skip the mAP evaluation")
    be.add_argument("--names", nargs="+", default=None, help="display names, one per model")
    be.add_argument("--out", default="bench", help="output folder for bench.json / bench.md / exports")
    be.add_argument("--in-process", action="store_true", help="measure in this process (peak memory is shared)")
    be.set_defaults(func=_cmd_bench)

    de = sub.choices["demo"]
    g = de.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a few minutes (tiny data and epochs)")
    g.add_argument("--full", action="store_true", help="the real benchmark (hours on CPU)")
    de.add_argument("--out", default="detkd_demo", help="output folder (default ./detkd_demo)")
    de.add_argument("--threads", type=int, default=None, help="CPU threads in all (default: all cores)")
    de.add_argument("--jobs", type=int, default=None,
                    help="trainings at once, each in its own process with threads/jobs threads (default: 2 when "
                         "there are >= 2 threads: the teacher and the baseline train side by side)")
    de.add_argument("--seed", type=int, default=0)
    de.add_argument("--fresh", action="store_true", help="redo every stage even if its output exists")
    de.add_argument("--no-few-labels", action="store_true",
                    help="skip the few-labels story (10%% of the frames labeled, the rest unlabeled footage: a "
                         "student on the 10%% alone and one with the teacher's pseudo-labels on the rest)")
    de.set_defaults(func=_cmd_demo)

    da = sub.choices["data"]
    dsub = da.add_subparsers(dest="data_cmd", metavar="CMD")
    sy = dsub.add_parser("synth", help="generate the built-in security-camera dataset (offline, deterministic)")
    sy.add_argument("--out", required=True)
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--train", type=int, default=2000)
    sy.add_argument("--val", type=int, default=500)
    sy.add_argument("--imgsz", type=int, default=320)
    sy.add_argument("--workers", type=int, default=1)
    sy.add_argument("--cameras", type=int, default=8, help="cameras shared by train, val and test (default 8)")
    sy.add_argument("--test", type=int, default=0, metavar="N", help="frames of an in-distribution 'test' split")
    sy.add_argument("--ood-cameras", type=int, default=0, metavar="K",
                    help="K unseen cameras (never in train/val/test) for a held-out 'test_ood' split")
    sy.add_argument("--test-ood", type=int, default=None, metavar="N", help="frames of 'test_ood' (default: --val)")
    cv = dsub.add_parser("convert", help="COCO / VOC -> Ultralytics layout, or back to COCO json")
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.add_argument("--to", choices=["yolo", "coco"], default="yolo")
    va = dsub.add_parser("validate", help="check a dataset and print a summary of every problem found")
    va.add_argument("path")
    for q in (cv, va):
        q.add_argument("--split", default="val",
                       help="YOLO yaml entry, VOC ImageSets/Main list, or COCO json name; VOC: 'all' reads every xml")
        q.add_argument("--names", default=None, metavar="voc|data|A,B,...|FILE",
                       help="VOC class list: the 20 VOC classes (default when the data uses any of them; other names "
                            "are reported and their boxes skipped), 'data' (every name found, sorted), a comma list "
                            "or a file with one name per line")
        q.add_argument("--strict", action="store_true", help="turn warnings into errors")
    da.set_defaults(func=_cmd_data)

    pl = sub.choices["pseudo-label"]
    pl.add_argument("teacher", help="Ultralytics detection .pt (the teacher)")
    pl.add_argument("sources", nargs="+", metavar="SOURCE", help="folder of images (recursive), image or video file")
    pl.add_argument("--out", required=True, metavar="DATASET", help="dataset folder to write (rerun to resume)")
    pl.add_argument("--format", choices=["yolo", "coco"], default="yolo",
                    help="yolo: Ultralytics layout + data.yaml; coco: also annotations/instances_*.json")
    pl.add_argument("--conf", default="auto", metavar="auto|X",
                    help="auto (default): per-class F1-best threshold on the labeled val split; X: one threshold")
    pl.add_argument("--val-data", default=None, metavar="DATA",
                    help="labeled val split (COCO / VOC / YOLO) for --conf auto; becomes the dataset's val split")
    pl.add_argument("--merge", default=None, metavar="DATA",
                    help="labeled dataset whose train images are added (real labels win on equal stems): an "
                         "Ultralytics data yaml, a COCO folder or a VOC root (converted and cached as for detkd train)")
    pl.add_argument("--every", type=int, default=1, metavar="K", help="every K-th video frame (default 1)")
    pl.add_argument("--imgsz", type=int, default=640, help="teacher inference size (default 640)")
    pl.add_argument("--iou", type=float, default=0.7, help="NMS IoU, as in detkd eval (default 0.7)")
    pl.add_argument("--max-det", type=int, default=300)
    pl.add_argument("--batch", type=int, default=16)
    pl.add_argument("--device", default="cpu", help="Ultralytics device: cpu (default), 0, cuda:0, ...")
    pl.set_defaults(func=_cmd_pseudo_label)
    return p


def main(argv: list[str] | None = None) -> int:
    from detkd.errors import DetkdError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "trust_checkpoints", False):
        import os

        from detkd.checkpoints import TRUST_ENV

        os.environ[TRUST_ENV] = "1"
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    import os
    import traceback

    debug = os.environ.get("DETKD_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")
    try:
        return int(args.func(args) or 0)
    except DetkdError as e:
        if debug:
            traceback.print_exc()
        print(f"detkd {args.verb}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"detkd {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - not anticipated: one line, the traceback only on request
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (rerun with DETKD_DEBUG=1 for the traceback)"
        msg = " ".join(str(e).split()) or "(no message)"
        print(f"detkd {args.verb}: error: unexpected {type(e).__name__}: {msg}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
