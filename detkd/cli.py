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


def _not_ready(verb: str):
    def run(args: argparse.Namespace) -> int:
        print(f"detkd {verb}: not available in this version yet.", file=sys.stderr)
        return 2

    return run


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="detkd",
        description="Knowledge distillation for object detectors (logits, boxes, FPN features).",
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for verb, help_ in VERBS.items():
        sp = sub.add_parser(verb, help=help_, description=help_)
        sp.set_defaults(func=_not_ready(verb))
    sub.choices["doctor"].set_defaults(func=_cmd_doctor)
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
