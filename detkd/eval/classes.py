"""Which dataset category a model's class is scored as: matched by name, never by position alone.

A detector outputs class *indices*; a dataset has named categories. Scoring index ``i`` as the dataset's
``i``-th category is only right when both lists are the same names in the same order; otherwise every box
is scored as another class (a COCO-80 model's ``person`` as a 2-class dataset's ``bicycle``) and the AP is
silently wrong. `match_classes` therefore pairs them **by name**:

* a model class whose name is a dataset class is scored as that class (in whatever order either lists them);
* a model class whose name is not in the dataset is ignored (its detections are dropped; they could only
  ever be false positives of a category the dataset does not have) and listed in `ClassMatch.describe`;
* a dataset class that has ground-truth boxes but no model class of that name is an error
  (`ClassMismatchError`): every one of its boxes would count as missed. The message names the differing
  names and the remap to pass.

``class_map`` renames model classes before matching: ``{model_name_or_index: dataset_name}``, or the
command-line string ``"model_name=dataset_name,..."`` (``--class-map``). A target of ``None``, ``""`` or
``"-"`` drops that model class. Keys may be class indices (``"0=person"``), for models without names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from detkd.errors import ClassMismatchError

__all__ = ["ClassMatch", "match_classes", "parse_class_map"]

DROP = ("", "-")
_MAX_LISTED = 10


def _list(names: Sequence[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:_MAX_LISTED])
    return shown + (f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def parse_class_map(spec: str | Mapping | None) -> dict[str, str | None]:
    """``"a=b,c=d,e=-"`` or a mapping -> ``{"a": "b", "c": "d", "e": None}`` (keys as strings; ``None`` = drop).

    Raises `ClassMismatchError` for an entry without ``=``."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).split(","):
            if not part.strip():
                continue
            k, sep, v = part.partition("=")
            if not sep or not k.strip():
                raise ClassMismatchError(
                    f"--class-map entry {part.strip()!r} is not MODEL=DATASET; write e.g. "
                    "--class-map person=pedestrian,car=vehicle"
                )
            items.append((k, v))
    out: dict[str, str | None] = {}
    for k, v in items:
        v = None if v is None else str(v).strip()
        out[str(k).strip()] = None if v in DROP else v
    return out


@dataclass
class ClassMatch:
    """The outcome of `match_classes`.

    ``category_of``: model class index -> category id (``i + 1`` for the dataset's ``i``-th class) or ``None``
    (dropped). ``pairs``: ``{model name: dataset name or None}``. ``ignored``: model classes not scored.
    ``unmatched_empty``: dataset classes without a model class (allowed only because they have no boxes).
    ``reordered``: True when a model index is scored as a different dataset position."""

    category_of: dict[int, int | None]
    pairs: dict[str, str | None]
    ignored: list[str] = field(default_factory=list)
    unmatched_empty: list[str] = field(default_factory=list)
    reordered: bool = False
    remapped: bool = False

    def describe(self) -> str:
        """One line for the user: how the classes were matched."""
        n = sum(v is not None for v in self.pairs.values())
        how = "by --class-map and name" if self.remapped else "by name"
        s = f"classes: {n} model class(es) scored as dataset classes, matched {how}"
        if self.reordered:
            s += " (the model lists them in another order than the dataset)"
        if self.ignored:
            s += "; model classes not scored (not in the dataset or mapped to -), detections dropped: "
            s += _list(self.ignored)
        if self.unmatched_empty:
            s += f"; dataset classes without a model class (no boxes in this split): {_list(self.unmatched_empty)}"
        return s

    def to_dict(self) -> dict:
        return {"model_to_dataset": dict(self.pairs), "ignored_model_classes": list(self.ignored),
                "dataset_classes_without_model_class": list(self.unmatched_empty)}  # fmt: skip


def match_classes(
    model_names: Sequence[str] | Mapping[int, str] | None,
    dataset_names: Sequence[str],
    class_map: str | Mapping | None = None,
    boxes_per_class: Sequence[int] | None = None,
    nc: int | None = None,
) -> ClassMatch:
    """Pair model classes with dataset classes by name (see the module docstring).

    Args:
        model_names: the model's class names (list, or Ultralytics' ``{index: name}``); ``None`` when the model
            carries none (then ``class_map`` must name every class by index, and ``nc`` gives the count).
        dataset_names: the dataset's class names; category id of ``dataset_names[i]`` is ``i + 1``.
        class_map: renames / drops, see `parse_class_map`.
        boxes_per_class: ground-truth boxes per dataset class in the evaluated split; a dataset class without
            a model class is an error only when it has boxes (default: every class counts as having boxes).
        nc: number of model classes when ``model_names`` is None.

    Raises:
        ClassMismatchError: one line naming the differing names and the ``--class-map`` to pass.
    """
    ds_names = [str(n) for n in dataset_names]
    index_of = {n: i for i, n in enumerate(ds_names)}
    cmap = parse_class_map(class_map)
    if isinstance(model_names, Mapping):
        model_names = [str(model_names[i]) for i in sorted(model_names)]
    names_known = model_names is not None
    if names_known:
        m_names = [str(n) for n in model_names]
    else:
        if nc is None:
            raise ClassMismatchError(
                "the model has no class names and its class count is unknown; pass --class-map 0=NAME,1=NAME,..."
            )
        m_names = [str(i) for i in range(int(nc))]

    # which model class each class_map key means
    target: dict[int, str | None] = {}
    for k, v in cmap.items():
        if k in m_names and names_known:
            i = m_names.index(k)
        elif k.isdigit() and int(k) < len(m_names):
            i = int(k)
        else:
            what = f"model classes: {_list(m_names)}" if names_known else f"model class indices: 0..{len(m_names) - 1}"
            raise ClassMismatchError(f"--class-map {k}={v or '-'}: '{k}' is not a model class ({what})")
        if v is not None and v not in index_of:
            raise ClassMismatchError(
                f"--class-map {k}={v}: '{v}' is not a dataset class (dataset classes: {_list(ds_names)})"
            )
        target[i] = v

    if not names_known:
        missing = [i for i in range(len(m_names)) if i not in target]
        if missing:
            pairs = ",".join(f"{i}={ds_names[i] if i < len(ds_names) else 'NAME'}" for i in range(len(m_names)))
            raise ClassMismatchError(
                "the model has no class names (an ONNX file without Ultralytics metadata?), so detkd cannot tell "
                f"which dataset class each of its {len(m_names)} outputs is; say it with --class-map, e.g. "
                f"--class-map {pairs} "
                f"(check each pair; dataset classes: {_list(ds_names)})"
            )

    category_of: dict[int, int | None] = {}
    pairs: dict[str, str | None] = {}
    ignored: list[str] = []
    for i, m in enumerate(m_names):
        t = target[i] if i in target else m
        label = m if names_known else f"class {i}"
        if t is not None and t in index_of:
            category_of[i] = index_of[t] + 1
            pairs[label] = t
        else:
            category_of[i] = None
            pairs[label] = None
            ignored.append(label)

    covered = {c for c in category_of.values() if c is not None}
    counts = list(boxes_per_class) if boxes_per_class is not None else [1] * len(ds_names)
    uncovered = [n for j, n in enumerate(ds_names) if j + 1 not in covered]
    with_boxes = [n for n in uncovered if counts[index_of[n]] > 0]
    if with_boxes:
        spare = [m for i, m in enumerate(m_names) if i not in target and m not in index_of]
        if len(spare) == len(with_boxes):
            hint = "e.g. --class-map " + ",".join(f"{a}={b}" for a, b in zip(spare, with_boxes)) + " (check each pair)"
        else:
            hint = "--class-map MODEL_NAME=DATASET_NAME,... (MODEL_NAME=- drops a model class)"
        raise ClassMismatchError(
            f"the model's class names do not match the dataset's, so boxes would be scored as the wrong class: "
            f"dataset class(es) with boxes but no model class of that name: {_list(with_boxes)}; "
            f"model class(es) not in the dataset: {_list(spare) if spare else 'none'}. "
            f"Say which model class is which dataset class with {hint}"
        )
    reordered = any(c is not None and c != i + 1 for i, c in category_of.items())
    return ClassMatch(category_of, pairs, ignored, uncovered, reordered, remapped=bool(cmap))
