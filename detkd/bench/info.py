"""Size and compute of a model file: parameters, GFLOPs at an input size, file size.

`model_info` reads an Ultralytics ``.pt``; `onnx_info` an ONNX file (parameters = initializer elements,
GFLOPs = 2 x multiply-adds of Conv / ConvTranspose / Gemm / MatMul nodes on the shapes ONNX's shape
inference gives for a ``(1, 3, imgsz, imgsz)`` input), so a PyTorch model and its export are counted alike.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from detkd.errors import DataError

PathLike = str | os.PathLike


def _count_gflops(model, imgsz: int) -> float:
    """GFLOPs (2 x multiply-adds) of Conv2d / ConvTranspose2d / Linear layers in one forward pass of a
    ``(1, 3, imgsz, imgsz)`` zero image — the layers that carry >99% of a YOLO's compute; used when
    Ultralytics' thop-based `get_flops` is unavailable."""
    import torch
    from torch import nn

    macs = [0]

    def conv_hook(m, inp, out):
        k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]  # (C_in / groups) * kh * kw per output
        if isinstance(m, nn.ConvTranspose2d):  # weight (C_in, C_out / groups, kh, kw): count per input element
            macs[0] += inp[0].numel() * m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
        else:
            macs[0] += out.numel() * k

    def linear_hook(m, inp, out):
        macs[0] += out.numel() * m.in_features

    convs = (nn.Conv2d, nn.ConvTranspose2d)
    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, convs)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        p = next(model.parameters())
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, 3, imgsz, imgsz, dtype=p.dtype, device=p.device))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return 2.0 * macs[0] / 1e9


def format_gflops(g: float | None, missing: str = "—", undefined: str = "n/a") -> str:
    """GFLOPs with at least two significant digits and no exponent: ``165``, ``28``, ``8.7``, ``0.43``, ``0.012``
    (a tiny model at a small image size would read ``0.0`` or ``0.01`` with a fixed number of decimals)."""
    if g is None:
        return missing
    g = float(g)
    if not math.isfinite(g):
        return undefined
    if g == 0:
        return "0"
    return f"{g:.{max(0, 1 - math.floor(math.log10(abs(g))))}f}"


def model_info(weights_path: PathLike, imgsz: int) -> dict:
    """Parameters, GFLOPs at ``imgsz`` and file size (MB, 10^6 bytes) of an Ultralytics ``.pt``.

    GFLOPs come from Ultralytics' `get_flops` (thop); when that returns 0 (thop missing or failing) a
    forward-hook count of the conv / linear layers (`_count_gflops`) is used instead.
    """
    p = Path(weights_path)
    if not p.is_file():
        raise DataError(f"weights not found: {p}")
    from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

    ensure_ultralytics_offline()
    from ultralytics.nn.tasks import load_checkpoint
    from ultralytics.utils.torch_utils import get_flops

    from detkd.checkpoints import check_checkpoint

    check_checkpoint(p, "model")
    model, _ = load_checkpoint(str(p))
    model = model.float()
    gflops = float(get_flops(model, imgsz))
    if not gflops > 0:
        gflops = _count_gflops(model, imgsz)
    return {"params": int(sum(q.numel() for q in model.parameters())), "gflops": gflops,
            "size_mb": p.stat().st_size / 1e6, "imgsz": int(imgsz)}  # fmt: skip


def onnx_info(path: PathLike, imgsz: int) -> dict:
    """Parameters, GFLOPs at ``imgsz`` and file size (MB) of an ONNX model (see the module docstring).

    Quantized (QDQ) graphs count their INT8 weight initializers as parameters and their convolutions'
    multiply-adds like FP32 ones, so an FP32 export and its INT8 version report the same GFLOPs.
    """
    import numpy as np
    import onnx
    from onnx import shape_inference

    p = Path(path)
    if not p.is_file():
        raise DataError(f"ONNX file not found: {p}")
    try:
        model = onnx.load(str(p))
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
        raise DataError(f"{p}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    inits = {t.name: t for t in model.graph.initializer}
    init_names = set(inits)
    # the weights that are parameters: initializers feeding compute (skip QDQ scales / zero points and shapes)
    skip = set()
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            skip.update(n.input[1:])
        elif n.op_type in ("Reshape", "Resize", "Slice", "Split", "Expand", "Tile", "Pad", "Unsqueeze", "Squeeze"):
            skip.update(n.input[1:])
    params = int(sum(int(np.prod(t.dims)) for name, t in inits.items() if name not in skip))
    # fix the input to (1, 3, imgsz, imgsz) and infer shapes
    g_inputs = [i for i in model.graph.input if i.name not in init_names]
    if g_inputs:
        dims = g_inputs[0].type.tensor_type.shape.dim
        for d, v in zip(dims, (1, 3, imgsz, imgsz)):
            d.ClearField("dim_param")
            d.dim_value = v
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference is best effort; GFLOPs become None
        return {"params": params, "gflops": None, "size_mb": p.stat().st_size / 1e6, "imgsz": int(imgsz)}
    shapes: dict[str, list[int]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
    for name, t in inits.items():
        shapes[name] = list(t.dims)
    # a DequantizeLinear's output has its input's shape (weights of QDQ convs)
    for n in inferred.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in shapes and n.output[0] not in shapes:
            shapes[n.output[0]] = shapes[n.input[0]]
    macs = 0
    known = True
    for n in inferred.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "QLinearConv", "ConvInteger"):
            w = shapes.get(n.input[3] if n.op_type == "QLinearConv" else n.input[1])
            out, inp = shapes.get(n.output[0]), shapes.get(n.input[0])
            if not w or not out or 0 in out or (n.op_type == "ConvTranspose" and (not inp or 0 in inp)):
                known = False
                continue
            k = int(np.prod(w[1:]))
            macs += (int(np.prod(inp)) * int(np.prod(w[1:])) if n.op_type == "ConvTranspose" else int(np.prod(out)) * k)
        elif n.op_type in ("Gemm", "MatMul"):
            a, out = shapes.get(n.input[0]), shapes.get(n.output[0])
            if not a or not out or 0 in a or 0 in out:
                known = False
                continue
            macs += int(np.prod(out)) * a[-1]
    return {"params": params, "gflops": 2.0 * macs / 1e9 if (macs or known) else None,
            "size_mb": p.stat().st_size / 1e6, "imgsz": int(imgsz)}
