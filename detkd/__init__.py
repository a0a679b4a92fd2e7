"""detkd — knowledge distillation for object detectors.

A large teacher detector teaches a small student through three signals: classification logits,
box-regression outputs and FPN feature / attention maps. See README.md and docs/DESIGN.md.
"""

import os as _os

# onnxruntime's native code sends telemetry unless this is set before it is imported (any detkd import comes first).
_os.environ["ORT_DISABLE_TELEMETRY"] = "1"

__version__ = "0.1.0"

__all__ = ["__version__", "Distiller", "DistillConfig", "load_config"]


def __getattr__(name):  # lazy: `import detkd` stays cheap (no torch import for `detkd --help`)
    if name == "Distiller":
        from detkd.distiller import Distiller

        return Distiller
    if name in ("DistillConfig", "load_config"):
        from detkd import config

        return getattr(config, name)
    raise AttributeError(f"module 'detkd' has no attribute {name!r}")
