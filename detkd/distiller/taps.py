"""Taps: outputs of named modules, recorded during a forward by hooks that exist only while recording.

A tap name is a name from ``model.named_modules()`` (``""`` is the model itself), optionally ``name:0`` /
``name:key`` for one element of a tuple / list / dict output. DDP / DataParallel (``.module``) and
``torch.compile`` (``._orig_mod``) wrappers are unwrapped, so names never need a ``module.`` prefix.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Any, Iterable, Iterator

from torch import Tensor, nn

from detkd.distiller.util import split_name
from detkd.errors import ConfigError

__all__ = ["MODEL_OUTPUT", "Taps", "find_module", "pick", "select", "unwrap"]

MODEL_OUTPUT = ""  # the root module's name in named_modules(): its tap is the model's own output


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def find_module(model: nn.Module, name: str, role: str) -> nn.Module:
    model = unwrap(model)
    try:  # walks the dotted path: every step of a training looks its taps up, named_modules() would visit them all
        return model.get_submodule(name)
    except AttributeError:
        pass
    mods = dict(model.named_modules())
    if name not in mods:
        close = difflib.get_close_matches(name, [m for m in mods if m], n=3, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ConfigError(f"{role} has no module named '{name}'{hint} (names come from model.named_modules())")
    return mods[name]


def pick(out: Any, sel: str | None, name: str) -> Any:
    """Element ``sel`` of a tuple / list / dict output (``out`` itself when ``sel`` is None)."""
    if sel is None:
        return out
    if not isinstance(out, (list, tuple, dict)):
        raise ConfigError(f"tap '{name}': the module output is a {type(out).__name__}, not a tuple/list/dict; "
                          f"drop ':{sel}'")
    try:
        if isinstance(out, dict):
            return out[sel] if sel in out or not sel.isdigit() else out[int(sel)]
        return out[int(sel)]
    except (IndexError, KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"tap '{name}': cannot take element {sel!r} of a {type(out).__name__} output ({e})") from e


def select(out: Any, sel: str | None, name: str) -> Tensor:
    """:func:`pick`, which must give a tensor."""
    out = pick(out, sel, name)
    if not isinstance(out, Tensor):
        hint = f"'{name}:0'" if isinstance(out, (list, tuple)) else f"'{name}:<key>'"
        raise ConfigError(f"tap '{name}': module output is a {type(out).__name__}, not a tensor; name one element "
                          f"with {hint}")
    return out


class _Hook:
    """Forward hook storing a module's output in ``store[key]``.

    A copy or pickle of a model taken while it is registered (e.g. a deep copy inside ``record()``) gets an inert
    hook: no store, nothing recorded, no detkd object reachable from it.
    """

    def __init__(self, store: dict | None, key: str):
        self.store, self.key = store, key

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.store is not None:
            self.store[self.key] = output

    def __deepcopy__(self, memo: dict) -> _Hook:
        return _Hook(None, self.key)

    def __reduce__(self):
        return _Hook, (None, self.key)


class Taps:
    """The outputs of ``names`` in one model, recorded inside :meth:`recording` (hooks removed on exit, also on an
    exception). ``role`` ("student" / "teacher") names the model in errors. Copies and pickles keep the names and
    drop what was recorded."""

    def __init__(self, names: Iterable[str], role: str):
        self.names = list(dict.fromkeys(names))
        self.role = role
        self.out: dict[str, Any] = {}  # module name -> its output; cleared in place (hooks hold this dict)

    def check(self, model: nn.Module) -> None:
        """Fail now, naming close matches, on a name ``model`` does not have."""
        for name in self.names:
            find_module(model, split_name(name)[0], self.role)

    @contextlib.contextmanager
    def recording(self, model: nn.Module) -> Iterator[Taps]:
        self.out.clear()
        handles = []
        try:
            for mod in dict.fromkeys(split_name(n)[0] for n in self.names):
                handles.append(find_module(model, mod, self.role).register_forward_hook(_Hook(self.out, mod)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def has(self, name: str) -> bool:
        return split_name(name)[0] in self.out

    def output(self, name: str, label: str | None = None) -> Any:
        """The recorded output of tap ``name`` (``label`` names it in errors)."""
        mod, sel = split_name(name)
        return pick(self.out[mod], sel, label or name)

    def tensor(self, name: str) -> Tensor:
        mod, sel = split_name(name)
        return select(self.out[mod], sel, name)

    def clear(self) -> None:
        self.out.clear()

    def __deepcopy__(self, memo: dict) -> Taps:
        return Taps(self.names, self.role)

    def __reduce__(self):
        return Taps, (self.names, self.role)
