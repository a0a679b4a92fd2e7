"""Ready distillation recipes for Ultralytics YOLO and torchvision detectors (plain data: no imports, safe to use
anywhere).

A recipe says which terms, methods and method options a run turns on; it holds no number that is a key's default
(weights, temperatures, the feature method and weight of ``features: auto``): those live once, in
``detkd/config.py``'s dataclasses, and the recipe gets them from there like any written config. ``detkd train``
uses :data:`DEFAULT_RECIPE` as the ``distill:`` block of a config that has none (``key=value`` overrides then apply
to it); ``DistillTrainer`` uses it for ``distill_model=teacher.pt``.

``features: auto`` taps the layers feeding Detect (``Detect.f``) in both models; ``feature_method`` /
``feature_weight`` / ``feature_options`` apply to each of those taps.
"""

DEFAULT_RECIPE: dict = {
    # sigmoid KD normalised like Ultralytics' own cls loss (by the teacher's score mass, not the anchor count)
    "logits": {"method": "sigmoid_kd", "options": {"avg_factor": "teacher_score"}},
    "boxes": {"method": "ld"},
    "features": "auto",
}

#: ``detkd train`` with ``framework: torchvision`` and no ``distill:`` block, for sigmoid heads (RetinaNet, FCOS):
#: logits per class normalised by the teacher's score mass, decoded boxes (GIoU, teacher-confidence weighted, aligned
#: by anchor), and the FPN maps (``features: auto``: the levels of equal size in both models).
TORCHVISION_RECIPE: dict = {
    "logits": {"method": "sigmoid_kd", "options": {"avg_factor": "teacher_score"}},
    "boxes": {"method": "l1_giou"},
    "features": "auto",
}
#: The same for softmax heads with a background column (SSD / SSDlite per anchor, Faster R-CNN per RoI); the KL is
#: averaged over anchors / RoIs (``reduction: mean``) like those heads' own losses, not summed over them per image.
TORCHVISION_SOFTMAX_RECIPE: dict = {"logits": {"method": "kd", "options": {"reduction": "mean"}},
                                    "boxes": {"method": "l1_giou"}, "features": "auto"}
