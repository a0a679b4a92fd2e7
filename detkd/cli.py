"""The `detkd` command line: one verb per job.

Each verb's implementation lives in its own layer (data, eval, report, bench, integrations); this module
only parses arguments, turns `DetkdError`s into one clear line on stderr, and sets the exit code.
"""

from __future__ import annotations

import argparse
import sys

VERBS = {
    "train": "distil a teacher into a student (Ultralytics YOLO): detkd train CONFIG.yaml [key=value ...]",
    "eval": "COCO / VOC mAP of a model (.pt or .onnx) on a dataset",
    "report": "before/after report (Markdown, HTML, JSON) for teacher, baseline and distilled student",
    "bench": "CPU latency / throughput / size of one or more models (PyTorch eager and ONNX Runtime)",
    "demo": "the whole story offline: built-in data, teacher, baseline, distilled student, report",
    "data": "datasets: synth (built-in security-camera scenes), convert, validate",
    "doctor": "check this installation: versions, threads, offline settings",
}


def _cmd_doctor(args: argparse.Namespace) -> int:
    import platform

    import detkd

    lines = [f"detkd {detkd.__version__}", f"python {platform.python_version()} ({platform.machine()})"]
    try:
        import torch

        lines.append(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}")
    except ImportError:
        lines.append("torch: NOT INSTALLED")
    for mod in ("torchvision", "ultralytics", "pycocotools", "albumentations", "cv2", "onnxruntime"):
        try:
            m = __import__(mod)
            lines.append(f"{mod} {getattr(m, '__version__', '?')}")
        except ImportError:
            lines.append(f"{mod}: not installed")
    print("\n".join(lines))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from detkd.train import load_train_config, train

    cfg = load_train_config(args.config, args.overrides)
    save_dir = train(cfg)
    print(f"detkd train: done. Weights: {save_dir / 'weights' / 'best.pt'} (a plain Ultralytics model)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from detkd.eval.run import evaluate_model

    m = evaluate_model(args.model, args.data, split=args.split, imgsz=args.imgsz, out_dir=args.out,
                       conf=args.conf, iou=args.iou, batch=args.batch, threads=args.threads, voc=not args.no_voc)
    print(m["summary"].rstrip())
    if "voc" in m:
        print(f"VOC mAP@0.5: {m['voc']['mAP50_auc']:.4f} (area under curve), {m['voc']['mAP50_07']:.4f} (VOC07 11-point)")
    print("per-class AP50-95: " + ", ".join(f"{k} {v['AP']:.3f}" for k, v in m["per_class"].items()))
    print(f"written: {m['out_dir']}/metrics.json, detections.json")
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
                evaluate=False if args.no_map else None, names=args.names, out_dir=args.out, isolate=not args.in_process)
    print(format_table(res))
    print(f"written: {args.out}/bench.json, bench.md (embed in a report with `bench: {args.out}/bench.json`)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from detkd.demo import run_demo

    budget = "quick" if args.quick else "full" if args.full else "default"
    run_demo(args.out, budget=budget, threads=args.threads, seed=args.seed, skip_existing=not args.fresh)
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_cmd == "synth":
        from detkd.data.synth import generate

        s = generate(args.out, seed=args.seed, n_train=args.train, n_val=args.val, imgsz=args.imgsz,
                     workers=args.workers)
        print(f"detkd data synth: wrote {args.out} (data.yaml, annotations/instances_{{train,val}}.json)")
        for k, v in s.items():
            if k != "paths":
                print(f"  {k}: {v}")
        return 0
    if args.data_cmd == "convert":
        from detkd.data.convert import convert

        r = convert(args.src, args.dst, to=args.to, split=args.split, strict=args.strict)
        print(r.summary())
        return 0
    if args.data_cmd == "validate":
        from detkd.data.validate import validate_dataset

        r = validate_dataset(args.path, split=args.split, strict=args.strict)
        print(r.summary())
        return 0
    print("detkd data: choose one of synth, convert, validate (see detkd data --help)", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="detkd",
        description="Knowledge distillation for object detectors (logits, boxes, FPN features).",
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for verb, help_ in VERBS.items():
        sub.add_parser(verb, help=help_, description=help_)
    sub.choices["doctor"].set_defaults(func=_cmd_doctor)

    tr = sub.choices["train"]
    tr.add_argument("config", help="detkd train config (teacher, student, data, distill, Ultralytics args)")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=50 distill.logits.weight=2")
    tr.set_defaults(func=_cmd_train)

    ev = sub.choices["eval"]
    ev.add_argument("model", help="Ultralytics .pt or exported .onnx")
    ev.add_argument("--data", required=True, help="COCO json / VOC root / Ultralytics data yaml")
    ev.add_argument("--split", default="val")
    ev.add_argument("--imgsz", type=int, default=640)
    ev.add_argument("--out", default=None, help="output folder (default: beside the model)")
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
    de.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    de.add_argument("--seed", type=int, default=0)
    de.add_argument("--fresh", action="store_true", help="redo every stage even if its output exists")
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
    cv = dsub.add_parser("convert", help="COCO / VOC -> Ultralytics layout, or back to COCO json")
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.add_argument("--to", choices=["yolo", "coco"], default="yolo")
    cv.add_argument("--split", default="val")
    cv.add_argument("--strict", action="store_true", help="turn warnings into errors")
    va = dsub.add_parser("validate", help="check a dataset and print a summary of every problem found")
    va.add_argument("path")
    va.add_argument("--split", default="val")
    va.add_argument("--strict", action="store_true", help="turn warnings into errors")
    da.set_defaults(func=_cmd_data)
    return p


def main(argv: list[str] | None = None) -> int:
    from detkd.errors import DetkdError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except DetkdError as e:
        print(f"detkd {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"detkd {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
