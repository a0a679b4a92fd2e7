"""Ready distillation recipes for Ultralytics YOLO (plain data: no imports, safe to use anywhere).

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
